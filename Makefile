# Two commands on a fresh machine (python3 and make): `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPOSE ?= docker compose
DOCKERFILES := collector/Dockerfile storage-hot/Dockerfile storage-cold/Dockerfile

.PHONY: run test audit lock demo bench lint up down ps logs e2e clean soak

$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q -e '.[embedded,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/marketprism run

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

# pip-audit on requirements.lock: fails on a reported vulnerability; says so in one line when no vulnerability
# service can be reached (fatal only with AUDIT_REQUIRED=1; see .ci/audit.py)
audit: $(STAMP)
	$(BIN)/pip install -q -e '.[audit]'
	$(BIN)/python .ci/audit.py requirements.lock

# Re-pin requirements.lock (the runtime dependencies, with hashes) after a change of pyproject.toml's
# dependencies; `make lock LOCK_ARGS=--upgrade` moves every pin to the newest release.
lock: $(STAMP)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		$(LOCK_ARGS) --output-file requirements.lock pyproject.toml

# 10 minutes of the real processes with random faults (tests/test_soak.py); figures printed and in <tmp>/soak.json
soak: $(STAMP)
	MARKETPRISM_SOAK_S=600 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_soak.py -s

demo: $(STAMP)
	$(BIN)/marketprism demo

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/marketprism bench

lint: $(STAMP)
	$(BIN)/hadolint --config .hadolint.yaml $(DOCKERFILES)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_compose.py

# Docker Compose (needs a Docker engine with Compose v2 and BuildKit)
up:
	$(COMPOSE) up -d --build --wait

down:
	$(COMPOSE) down

ps:
	$(COMPOSE) ps

logs:
	$(COMPOSE) logs -f --tail=200

e2e: $(STAMP)
	$(BIN)/pip install -q -e '.[e2e]'
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/test_e2e_compose.py

clean:
	rm -rf $(VENV) data
