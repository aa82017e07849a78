"""Configuration is validated at start, as a user runs the roles: every role and task, as a real process, stops
on an unknown MARKETPRISM_* variable, a wrong type, an unknown YAML key, an unreachable NATS or ClickHouse and an
unusable data_dir with exit != 0 and one stderr line naming the setting -- never a traceback.

Configuration errors exit 2 before anything is logged, so stderr is exactly that one line. Unreachable servers
exit 1; the roles may log their retries first, so there every stderr line but the last must be a formatted log
line. Each group of processes runs concurrently and each process is bounded by a subprocess timeout: with
MARKETPRISM_CONNECT_TIMEOUT_S=2 a role that still retried for the old ~38 s would be killed and fail."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from marketprism.bus.server import free_port
from marketprism.ops.cli import _setting_of
from marketprism.settings import ConfigError, check_env_names, env_names, load
from marketprism.store.client import StoreError

ROOT = Path(__file__).parent.parent
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (TRACE|DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)\s")
ALL_COMMANDS = (("collector",), ("storage-hot",), ("storage-cold",), ("run",), ("init",), ("query", "SELECT 1"),
                ("status",))
CONFIG_BOUND_S = 30  # a configuration error exits before any connection is tried
CONNECT_BOUND_S = 25  # connect_timeout_s=2 plus start-up on a loaded machine; the old retry loop took ~38 s


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    env.update(MARKETPRISM_DATA_DIR=str(tmp_path / "data"), MARKETPRISM_CONNECT_TIMEOUT_S="2",
               MARKETPRISM_HEALTH_PORT=str(free_port()), MARKETPRISM_METRICS_PORT=str(free_port()))
    env.update(extra)
    return env


def _run_all(tmp_path: Path, cases: dict[str, tuple[tuple[str, ...], dict]], bound_s: float) -> dict:
    """Start every case at once (each in its own directory), then collect (code, stderr) per case."""
    procs = {}
    for name, (args, extra) in cases.items():
        cwd = tmp_path / re.sub(r"\W", "_", name)
        cwd.mkdir()
        procs[name] = subprocess.Popen([sys.executable, "-m", "marketprism", *args], env=_env(cwd, **extra),
                                       cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=bound_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # only the processes this test started
            _, err = proc.communicate()
            for other in procs.values():
                if other.poll() is None:
                    other.kill()
            pytest.fail(f"{name}: did not exit within {bound_s} s; stderr tail: {err[-500:]}")
        results[name] = (proc.returncode, err)
    return results


def _config_error(name: str, code: int, err: str) -> str:
    """Exit 2 and exactly one stderr line, the configuration error; returns that line."""
    assert "Traceback" not in err, (name, err[-2000:])
    assert code == 2, (name, code, err[-2000:])
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("marketprism: configuration error: "), (name, err[-2000:])
    return lines[0]


def _runtime_error(name: str, code: int, err: str) -> str:
    """Exit 1, no traceback, every stderr line a log line except the last, the error; returns the last line."""
    assert "Traceback" not in err, (name, err[-2000:])
    assert code == 1, (name, code, err[-2000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("marketprism: "), (name, err[-2000:])
    strays = [line for line in lines[:-1] if not LOG_LINE.match(line)]
    assert not strays, (name, strays)
    return lines[-1]


def test_unknown_environment_variable_names_it_and_the_closest_setting(tmp_path):
    cases = {" ".join(args): (args, {"MARKETPRISM_NATS_URI": "nats://127.0.0.1:4222"}) for args in ALL_COMMANDS}
    cases["two typos"] = (("init",), {"MARKETPRISM_DPETH": "5", "MARKETPRISM_FOOBAR": "1"})
    results = _run_all(tmp_path, cases, CONFIG_BOUND_S)
    for args in ALL_COMMANDS:
        line = _config_error(" ".join(args), *results[" ".join(args)])
        assert line == ("marketprism: configuration error: MARKETPRISM_NATS_URI: unknown environment variable "
                        "(did you mean MARKETPRISM_NATS_URL?)"), line
    line = _config_error("two typos", *results["two typos"])
    assert "MARKETPRISM_DPETH: unknown environment variable (did you mean MARKETPRISM_DEPTH?)" in line, line
    assert "MARKETPRISM_FOOBAR: unknown environment variable (see README: Configuration)" in line, line


def test_wrong_type_and_unknown_yaml_key_name_the_key(tmp_path):
    (tmp_path / "typo.yaml").write_text("depth: 10\nnats_uri: nats://127.0.0.1:4222\n")
    (tmp_path / "type.yaml").write_text("batch_rows: many\n")
    cases = {f"{' '.join(args)} env type": (args, {"MARKETPRISM_DEPTH": "abc"})
             for args in (("collector",), ("storage-hot",), ("run",))}
    cases["storage-cold yaml key"] = (("--config", str(tmp_path / "typo.yaml"), "storage-cold"), {})
    cases["init yaml key via env"] = (("init",), {"MARKETPRISM_CONFIG": str(tmp_path / "typo.yaml")})
    cases["query yaml type"] = (("--config", str(tmp_path / "type.yaml"), "query", "SELECT 1"), {})
    cases["health port float"] = (("status",), {"MARKETPRISM_HEALTH_PORT": "80.5"})
    results = _run_all(tmp_path, cases, CONFIG_BOUND_S)
    for name in cases:
        line = _config_error(name, *results[name])
        if "env type" in name:
            assert line.endswith("depth: Expected `int`, got `str` (MARKETPRISM_DEPTH='abc')"), line
        elif "yaml key" in name:
            assert line.endswith("config: unknown key `nats_uri` (did you mean `nats_url`?)"), line
        elif name == "query yaml type":
            assert line.endswith("batch_rows: Expected `int`, got `str`"), line
        else:
            assert line.endswith("health_port: Expected `int`, got `str` (MARKETPRISM_HEALTH_PORT='80.5')"), line


def test_unreachable_nats_fails_within_connect_timeout_naming_nats_url(tmp_path):
    url = f"nats://127.0.0.1:{free_port()}"  # nobody listens there: refused at once, retried until the budget
    with socket.socket() as silent:  # the kernel completes the handshake, nobody ever sends NATS's INFO: a try
        silent.bind(("127.0.0.1", 0))  # hangs (nats-py's own timeout is 5 s) and the budget has to cut it
        silent.listen(16)
        silent_url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        cases = {" ".join(args): (args, {"MARKETPRISM_NATS_URL": url})
                 for args in (("collector",), ("storage-hot",), ("run",), ("init", "--streams"))}
        cases["storage-hot silent"] = (("storage-hot",), {"MARKETPRISM_NATS_URL": silent_url})
        results = _run_all(tmp_path, cases, CONNECT_BOUND_S)
    for name in cases:
        line = _runtime_error(name, *results[name])
        target = silent_url if "silent" in name else url
        assert line.startswith(f"marketprism: nats_url: cannot reach NATS at {target} within 2 s "
                               "(connect_timeout_s): "), line


def test_unreachable_clickhouse_names_clickhouse_url(tmp_path):
    url = f"http://marketprism:pw@127.0.0.1:{free_port()}"  # nobody listens there
    shown = url.replace(":pw@", ":***@")
    cases = {" ".join(args): (args, {"MARKETPRISM_CLICKHOUSE_URL": url})
             for args in (("init", "--schema"), ("query", "SELECT 1"), ("storage-cold",), ("storage-cold", "--once"),
                          ("integrity",))}
    results = _run_all(tmp_path, cases, CONNECT_BOUND_S)
    for name in cases:
        line = _runtime_error(name, *results[name])
        assert line.startswith(f"marketprism: clickhouse_url: cannot open store {shown}: "), line
        assert "Connection refused" in line and "HTTPConnection" not in line, line


async def test_storage_hot_with_nats_up_and_clickhouse_unreachable(tmp_path, nats_server):
    url = f"http://127.0.0.1:{free_port()}"
    results = _run_all(tmp_path, {"storage-hot": (("storage-hot",), {"MARKETPRISM_NATS_URL": nats_server.url,
                                                                      "MARKETPRISM_CLICKHOUSE_URL": url})},
                       CONNECT_BOUND_S)
    line = _runtime_error("storage-hot", *results["storage-hot"])
    assert line.startswith(f"marketprism: clickhouse_url: cannot open store {url}: "), line


def test_unusable_data_dir_names_data_dir(tmp_path):
    (tmp_path / "a-file").write_text("")
    data = tmp_path / "a-file" / "data"  # a directory below a regular file cannot be created, even by root
    cases = {" ".join(args): (args, {"MARKETPRISM_DATA_DIR": str(data)})
             for args in (("run",), ("init", "--schema"), ("query", "SELECT 1"), ("storage-cold",))}
    results = _run_all(tmp_path, cases, CONFIG_BOUND_S)
    for name in cases:
        line = _runtime_error(name, *results[name])
        assert line.startswith("marketprism: data_dir: ") and "Not a directory" in line, line
        assert "another marketprism process" not in line, line  # not a lock problem


def test_error_mapping_names_the_setting(tmp_path):
    s = load(environ={"MARKETPRISM_DATA_DIR": str(tmp_path), "MARKETPRISM_CLICKHOUSE_URL": "http://h:1",
                      "MARKETPRISM_COLD_CLICKHOUSE_URL": "http://c:2", "MARKETPRISM_LOG_FILE": "/x/y/mp.log"})
    assert _setting_of(s, StoreError("m", "http://h:1")) == "clickhouse_url"
    assert _setting_of(s, StoreError("m", "http://c:2")) == "cold_clickhouse_url"
    assert _setting_of(load(environ={"MARKETPRISM_DATA_DIR": str(tmp_path)}),
                       StoreError("m", f"chdb://{tmp_path}/clickhouse")) == "data_dir"
    assert _setting_of(s, PermissionError(13, "Permission denied", str(tmp_path / "marketprism.lock"))) == "data_dir"
    assert _setting_of(s, PermissionError(13, "Permission denied", "/x/y")) == "log_file"
    assert _setting_of(s, OSError(28, "No space left on device", "/elsewhere")) == ""
    assert _setting_of(None, StoreError("m", "http://h:1")) == ""


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"\bMARKETPRISM_[A-Z0-9_]*[A-Z0-9]\b", text))


def test_every_name_the_project_uses_is_accepted():
    """compose files (the containers' environment), .env.example, README, docs, the package and the tests use
    only names check_env_names accepts: a rename of a setting cannot leave a deployment failing at start."""
    used: dict[str, set[str]] = {}
    for compose in ("compose.yaml", "compose.cold-test.yaml"):
        for service, body in (yaml.safe_load((ROOT / compose).read_text())["services"]).items():
            env = body.get("environment") or {}
            names = set(env) if isinstance(env, dict) else {item.split("=", 1)[0] for item in env}
            used[f"{compose}:{service}"] = {n for n in names if n.startswith("MARKETPRISM_")}
    files = [ROOT / ".env.example", ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "marketprism").rglob("*.py")),
             *[p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != Path(__file__).name]]
    for path in files:
        used[str(path.relative_to(ROOT))] = _names_in(path.read_text())
    known = env_names()
    unknown = {where: names - known for where, names in used.items() if names - known}
    assert not unknown, unknown
    assert used["compose.yaml:collector-sim"] >= {"MARKETPRISM_OKX_WS_URL", "MARKETPRISM_OKX_REST_URL"}
    # the non-setting names reach only the clickhouse container, never a marketprism role
    assert used["compose.yaml:clickhouse"] == {"MARKETPRISM_CH_PASSWORD", "MARKETPRISM_CH_RO_PASSWORD"}
    check_env_names({"MARKETPRISM_TAG": "0.1.0", "MARKETPRISM_NATS_PASSWORD_FILE": "/run/secrets/nats",
                     "MARKETPRISM_E2E_COLD": "1", "MARKETPRISM_CONFIG": "x.yaml", "OTHER": "x"})
    with pytest.raises(ConfigError, match=r"^MARKETPRISM_NATS_URL_FILES: unknown environment variable \(did you "
                                          r"mean MARKETPRISM_NATS_URL_FILE\?\)$"):
        check_env_names({"MARKETPRISM_NATS_URL_FILES": "x"})
