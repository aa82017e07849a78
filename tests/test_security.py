"""Secrets never reach logs or error lines; *_FILE secrets work; URLs are redacted.

The role subprocesses run against closed loopback ports. The NATS roles retry their connection with backoff
for connect_timeout_s (10 s by default, ops/roles.py), so the two role tests take ~10 s (run concurrently)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from marketprism.bus.server import free_port
from marketprism.settings import ConfigError, load, redact

NATS_SECRET = "natsSecret-7f3a9c"
URL_SECRET = "urlSecret-41be02"
CH_SECRET = "chSecret-d93e11"
SECRETS = (NATS_SECRET, URL_SECRET, CH_SECRET)


def _env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    env.update(MARKETPRISM_DATA_DIR=str(tmp_path / "data"), MARKETPRISM_LOG_LEVEL="DEBUG",
               MARKETPRISM_NATS_URL=f"nats://alice:{URL_SECRET}@127.0.0.1:{free_port()}",
               MARKETPRISM_NATS_USER="alice", MARKETPRISM_NATS_PASSWORD=NATS_SECRET,
               MARKETPRISM_CLICKHOUSE_URL=f"http://bob:{CH_SECRET}@127.0.0.1:{free_port()}",
               MARKETPRISM_HEALTH_PORT=str(free_port()), MARKETPRISM_METRICS_PORT=str(free_port()))
    env.update(extra)
    return env


def _start(tmp_path, *args, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "marketprism", *args], env=_env(tmp_path, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)


def _finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # only the process this test started
        out, err = proc.communicate()
        pytest.fail(f"did not exit within {timeout} s; stderr tail: {err[-500:]}")
    return proc.returncode, out, err


def _assert_clean(out: str, err: str) -> None:
    for secret in SECRETS:
        assert secret not in out and secret not in err, f"{secret} leaked"
    assert "Traceback" not in err, err[-2000:]


def test_nats_roles_fail_with_one_line_and_leak_no_secret(tmp_path):
    procs = {role: _start(tmp_path / role, role) for role in ("storage-hot", "collector")
             if (tmp_path / role).mkdir() is None}
    for role, proc in procs.items():
        code, out, err = _finish(proc)
        _assert_clean(out, err)
        assert code != 0, role
        last = err.strip().splitlines()[-1]
        assert last.startswith("marketprism: nats_url: cannot reach NATS at nats://alice:***@127.0.0.1:"), (role, last)


def test_store_failure_is_one_redacted_line(tmp_path):
    code, out, err = _finish(_start(tmp_path, "init", "--schema"), timeout=60)
    _assert_clean(out, err)
    assert code != 0
    lines = err.strip().splitlines()
    assert lines[-1].startswith("marketprism: clickhouse_url: cannot open store http://bob:***@127.0.0.1:"), lines[-1]


def test_config_error_with_a_password_url_is_redacted(tmp_path):
    proc = _start(tmp_path, "init", "--schema", MARKETPRISM_CLICKHOUSE_URL=f"ftp://bob:{CH_SECRET}@h:1")
    code, out, err = _finish(proc, timeout=30)
    _assert_clean(out, err)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("marketprism: configuration error: clickhouse_url:") and "bob:***@h:1" in err, err


def test_file_secrets_are_read_and_stripped(tmp_path):
    (tmp_path / "pw").write_text(NATS_SECRET + "\n")
    (tmp_path / "ch").write_text(f"https://bob:{CH_SECRET}@ch.example:8443\n")
    s = load(environ={"MARKETPRISM_NATS_PASSWORD_FILE": str(tmp_path / "pw"),
                      "MARKETPRISM_CLICKHOUSE_URL_FILE": str(tmp_path / "ch")})
    assert s.nats_password == NATS_SECRET and s.clickhouse_url == f"https://bob:{CH_SECRET}@ch.example:8443"
    with pytest.raises(ConfigError, match=r"^MARKETPRISM_NATS_PASSWORD_FILE: cannot read "):
        load(environ={"MARKETPRISM_NATS_PASSWORD_FILE": str(tmp_path / "missing")})


@pytest.mark.parametrize("url,expected", [
    (f"nats://alice:{URL_SECRET}@10.0.0.1:4222", "nats://alice:***@10.0.0.1:4222"),
    (f"https://bob:{CH_SECRET}@ch.example:8443/?db=x", "https://bob:***@ch.example:8443/?db=x"),
    ("http://ch.example:8123", "http://ch.example:8123"),
    ("chdb:///data/clickhouse", "chdb:///data/clickhouse"),
])
def test_redact(url, expected):
    assert redact(url) == expected
