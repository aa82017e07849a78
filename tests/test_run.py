"""`marketprism run` and `marketprism simulate` as separate processes, as a user starts them: every data
type from every venue stored within seconds, health served, `query` routed through the running process,
a second `run` on the same data dir refused, SIGTERM drains and stops the managed nats-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from marketprism.bus.server import free_port
from marketprism.settings import FEEDS

EXPECTED = {  # DESIGN.md §2 coverage: table -> (exchange, market_type) pairs that must have rows
    "trades": {("binance", "spot"), ("binance", "perpetual"), ("okx", "spot"), ("okx", "perpetual"),
               ("deribit", "perpetual"), ("bybit", "spot"), ("bybit", "perpetual")},
    "orderbooks": {("binance", "spot"), ("binance", "perpetual"), ("okx", "spot"), ("okx", "perpetual"),
                   ("deribit", "perpetual"), ("bybit", "spot"), ("bybit", "perpetual")},
    "funding_rates": {("binance", "perpetual"), ("okx", "perpetual"), ("deribit", "perpetual"), ("bybit", "perpetual")},
    "open_interests": {("binance", "perpetual"), ("okx", "perpetual"), ("deribit", "perpetual"), ("bybit", "perpetual")},
    "liquidations": {("binance", "perpetual"), ("okx", "perpetual"), ("bybit", "perpetual")},
    "lsr_top_positions": {("binance", "perpetual"), ("okx", "perpetual")},
    "lsr_all_accounts": {("binance", "perpetual"), ("okx", "perpetual"), ("bybit", "perpetual")},
    "volatility_indices": {("deribit", "options")},
}


def cli(*args, env, timeout=60):
    return subprocess.run([sys.executable, "-m", "marketprism", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def present(env) -> dict[str, set]:
    out = {}
    for table in EXPECTED:
        res = cli("query", f"SELECT exchange, market_type FROM marketprism_hot.{table} GROUP BY 1, 2", env=env)
        out[table] = {tuple(line.split("\t")) for line in res.stdout.splitlines()[1:]} if res.returncode == 0 else set()
    return out


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        return json.loads(resp.read())


def test_run_stores_every_type_from_the_simulator(tmp_path: Path):
    sim_port, health_port, nats_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MARKETPRISM_DATA_DIR": str(tmp_path / "data"), "MARKETPRISM_HEALTH_PORT": str(health_port),
           "MARKETPRISM_EMBEDDED_NATS_PORT": str(nats_port), "MARKETPRISM_LOG_LEVEL": "WARNING"}
    for feed in FEEDS:
        env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = f"ws://127.0.0.1:{sim_port}/{feed}"
        env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"http://127.0.0.1:{sim_port}/{feed}"
    sim = subprocess.Popen([sys.executable, "-m", "marketprism", "simulate", "--port", str(sim_port), "--speed", "20"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = subprocess.Popen([sys.executable, "-m", "marketprism", "run"], env=env, stdout=subprocess.DEVNULL,
                           stderr=open(tmp_path / "run.log", "w"))
    try:
        deadline = time.monotonic() + 60
        seen: dict[str, set] = {}
        while time.monotonic() < deadline:
            time.sleep(1)
            seen = present(env)
            if all(EXPECTED[t] <= seen[t] for t in EXPECTED):
                break
        assert {t: EXPECTED[t] - seen.get(t, set()) for t in EXPECTED} == {t: set() for t in EXPECTED}
        body = health(health_port)
        assert body["status"] in ("starting", "healthy")
        assert body["collector"]["nats_connected"] and body["storage_hot"]["inserted"] > 0
        # read-only: a write through query is refused
        assert cli("query", "INSERT INTO marketprism_hot.trades_ingest FORMAT JSONEachRow {}", env=env).returncode == 1
        second = cli("run", env=env)
        assert second.returncode == 1
        assert second.stderr.strip() == f"marketprism: data dir {tmp_path / 'data'} is in use by marketprism pid {run.pid}"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 0
        # the managed nats-server is gone with it, and the lock was released
        import socket
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", nats_port)) != 0
        assert json.loads((tmp_path / "data" / "marketprism.lock").read_text() or "{}") == {}
    finally:
        for proc in (run, sim):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
