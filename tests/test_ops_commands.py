"""`diagnose`, `status`, `health` and `query` as a user runs them, as processes: diagnose names the process
on a taken port and a stale instance lock; against a running embedded instance (fed by the simulator) every
command answers, diagnose finds nothing wrong and measures each venue's clock; after that instance is
killed, diagnose reports its stale lock and the nats-server it left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from marketprism.bus.server import free_port
from marketprism.settings import FEEDS


def cli(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "marketprism", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def findings(proc) -> dict[str, dict]:
    return {f["subject"]: f for f in json.loads(proc.stdout)["findings"]}


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_diagnose_finds_a_taken_port_and_a_stale_lock(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    gone = dead_pid()
    (data / "marketprism.lock").write_text(json.dumps({"pid": gone, "port": free_port()}))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "MARKETPRISM_DATA_DIR": str(data), "MARKETPRISM_HEALTH_PORT": str(port),
               "MARKETPRISM_METRICS_PORT": str(free_port()), "MARKETPRISM_EMBEDDED_NATS_PORT": str(free_port())}
        proc = cli("diagnose", "--offline", "--json", "--timeout", "1", env=env)
    assert proc.returncode == 1, proc.stderr
    found = findings(proc)
    port_finding = found[f"port {port} (health of every role)"]
    assert port_finding["level"] == "fail"
    assert f"taken by pid {os.getpid()} (" in port_finding["detail"] and "not marketprism" in port_finding["detail"]
    assert "MARKETPRISM_HEALTH_PORT" in port_finding["action"]
    lock = found["instance lock"]
    assert lock["level"] == "warn" and f"stale lock {data / 'marketprism.lock'}: pid {gone} is gone" in lock["detail"]
    assert f"rm {data / 'marketprism.lock'}" in lock["action"]
    assert found["nats"]["level"] == "ok"  # no URL, no run: the managed one is simply not running
    text = cli("diagnose", "--offline", "--timeout", "1", env={**env, "MARKETPRISM_HEALTH_PORT": str(free_port())})
    assert text.returncode == 0 and text.stdout.startswith("WARN  instance lock: stale lock")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


def test_commands_against_a_running_embedded_instance(tmp_path: Path):
    sim_port, health_port, metrics_port, nats_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "MARKETPRISM_DATA_DIR": str(tmp_path / "data"), "MARKETPRISM_HEALTH_PORT": str(health_port),
           "MARKETPRISM_METRICS_PORT": str(metrics_port), "MARKETPRISM_EMBEDDED_NATS_PORT": str(nats_port),
           "MARKETPRISM_GRACE_S": "0", "MARKETPRISM_LOG_LEVEL": "INFO",
           "MARKETPRISM_FEEDS": ",".join(FEEDS), "MARKETPRISM_LOG_FILE": str(tmp_path / "log" / "run.log")}
    for feed in FEEDS:
        env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = f"ws://127.0.0.1:{sim_port}/{feed}"
        env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"http://127.0.0.1:{sim_port}/{feed}"
    sim = subprocess.Popen([sys.executable, "-m", "marketprism", "simulate", "--port", str(sim_port), "--speed", "20"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = subprocess.Popen([sys.executable, "-m", "marketprism", "run"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    nats_pid = None
    try:
        deadline, health = time.monotonic() + 40, None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            health = cli("health", "--json", env=env)
            body = json.loads(health.stdout)["endpoints"].get("run", {}).get("body") or {}
            if health.returncode == 0 and body["storage_hot"]["inserted"] > 0 and body["storage_hot"]["consumers"]:
                break
        assert health.returncode == 0, health.stdout[-2000:]
        assert body["collector"]["coverage"]["trade/okx/perpetual"]["stale_after_s"] == 60

        status = cli("status", "--json", env=env)
        assert status.returncode == 0, status.stdout
        rows = {r["component"].strip(): r for r in json.loads(status.stdout)["components"]}
        assert rows["run"]["state"] == "healthy" and rows["run"]["version"]
        assert rows["nats"]["state"] == "up" and rows["clickhouse"]["state"] == "up"
        assert "hot rows" in rows["clickhouse"]["details"]
        table = cli("health", env=env)
        assert table.returncode == 0 and "DATA TYPE" in table.stdout and "volatility_index  deribit" in table.stdout

        diag = cli("diagnose", "--json", env=env)
        found = findings(diag)
        problems = {k: f for k, f in found.items() if f["level"] == "fail" and not k.startswith("disk")}
        assert problems == {}, diag.stdout
        assert found[f"port {nats_port} (managed nats-server of run)"]["level"] == "ok"
        assert found[f"port {metrics_port} (metrics of run/collector)"]["detail"].startswith("marketprism metrics")
        assert {f"clock vs {feed}" for feed in FEEDS} <= {k for k, f in found.items() if f["level"] == "ok"}

        code, text = _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert b'marketprism_coverage_age_seconds{data_type="trade"' in text
        assert b"marketprism_consumer_pending_messages{" in text
        query = cli("query", "SELECT count() FROM marketprism_hot.trades", env=env)
        assert query.returncode == 0 and int(query.stdout.splitlines()[1]) > 0
        assert " INFO    marketprism.ops.roles: marketprism run: health on" in (tmp_path / "log" / "run.log").read_text()

        nats_pid = int(Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()[0])
        run.send_signal(signal.SIGKILL)  # dies without releasing anything
        run.wait(timeout=10)
        diag = cli("diagnose", "--offline", "--json", "--timeout", "1", env=env)
        found = findings(diag)
        assert diag.returncode == 1
        assert found["instance lock"]["level"] == "warn" and f"pid {run.pid} is gone" in found["instance lock"]["detail"]
        left = found[f"port {nats_port} (managed nats-server of run)"]
        assert left["level"] == "fail" and f"kill {nats_pid}" in left["action"]
    finally:
        for pid in (nats_pid,):
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in (run, sim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
