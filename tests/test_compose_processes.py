"""Every command compose.yaml runs, run as processes exactly as compose starts them.

The commands and environment variable names come from compose.yaml itself (sim profile): only the
addresses change — service host names become local ports, /data a temp dir — and the real
nats/nats-server.conf runs with its three users, so least-privilege permissions are exercised too.
One deviation, forced by the embedded store: there is no ClickHouse server here, so the storage roles use
one chDB directory, which only one process may open. storage-hot therefore drains and exits before
storage-cold opens the same directory (in compose they run side by side against the server).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from marketprism.bus.server import binary, free_port
from marketprism.records import TABLE_FOR

ROOT = Path(__file__).resolve().parents[1]
PERP = ("binance", "okx", "deribit", "bybit")
REQUIRED_CELLS = {  # DESIGN.md §2, as data_type/exchange/market_type (Deribit dated futures are not simulated)
    *(f"{dt}/{ex}/{mt}" for dt in ("trade", "orderbook") for ex, mt in (
        ("binance", "spot"), ("binance", "perpetual"), ("okx", "spot"), ("okx", "perpetual"),
        ("deribit", "perpetual"), ("bybit", "spot"), ("bybit", "perpetual"))),
    *(f"{dt}/{ex}/perpetual" for dt in ("funding_rate", "open_interest") for ex in PERP),
    *(f"liquidation/{ex}/perpetual" for ex in ("binance", "okx", "bybit")),
    *(f"lsr_top_position/{ex}/perpetual" for ex in ("binance", "okx")),
    *(f"lsr_all_account/{ex}/perpetual" for ex in ("binance", "okx", "bybit")),
    "volatility_index/deribit/options",
}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
SECRETS = {"NATS_ADMIN_PASSWORD": "adm-3f9c", "NATS_COLLECTOR_PASSWORD": "col-8a1e",
           "NATS_STORAGE_PASSWORD": "sto-77b2", "CLICKHOUSE_PASSWORD": "ch-51d0"}


def services() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def interpolate(value: str, dotenv: dict) -> str:
    def sub(m):
        name = m.group(1)
        if name in dotenv:
            return dotenv[name]
        default = re.match(r"\$\{[^:}]+:?-([^}]*)\}", m.group(0))
        return default.group(1) if default else ""
    return VAR.sub(sub, str(value))


class Local:
    """Maps compose's network (service names, fixed ports, /data) onto this machine."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = {"nats": free_port(), "sim": free_port(), 8085: free_port(), 8086: free_port(),
                      8087: free_port()}
        self.store = f"chdb://{tmp / 'clickhouse'}"

    def env(self, service: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
        for key, value in (service.get("environment") or {}).items():
            value = interpolate(value, SECRETS)
            value = value.replace("nats://nats:4222", f"nats://127.0.0.1:{self.ports['nats']}")
            value = value.replace("sim:8090", f"127.0.0.1:{self.ports['sim']}")
            if key == "MARKETPRISM_CLICKHOUSE_URL":
                assert re.fullmatch(r"http://marketprism:[^@]+@clickhouse:8123", value)
                value = self.store
            elif key == "MARKETPRISM_DATA_DIR":
                value = str(self.tmp / "data")
            elif key == "MARKETPRISM_HEALTH_HOST":
                value = "127.0.0.1"  # compose binds 0.0.0.0 inside its network; a test stays on loopback
            elif key == "MARKETPRISM_HEALTH_PORT":
                value = str(self.ports[int(value)])
            env[key] = value
        return env

    def command(self, service: dict) -> list[str]:
        cmd = [str(c) for c in service["command"]]
        if cmd[0] == "simulate":
            cmd = ["simulate", "--host", "127.0.0.1", "--port", str(self.ports["sim"]), "--speed", "20"]
        return [sys.executable, "-m", "marketprism", *cmd]


def healthcheck(service: dict, env: dict) -> int:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "marketprism"
    return subprocess.run([sys.executable, "-m", "marketprism", *test[2:]], env=env, capture_output=True,
                          timeout=30).returncode


def wait_healthy(service, env, proc, timeout_s=60) -> None:
    deadline = time.monotonic() + timeout_s
    while healthcheck(service, env) != 0:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{proc.args} not healthy in {timeout_s}s"
        time.sleep(0.5)


def health(env: dict) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{env['MARKETPRISM_HEALTH_PORT']}/health", timeout=5) as r:
        return json.loads(r.read())


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


@pytest.fixture
def nats(tmp_path):
    port = free_port()
    env = {**os.environ, **SECRETS}
    proc = subprocess.Popen([binary(), "-c", str(ROOT / "nats" / "nats-server.conf"), "-js", "-sd",
                             str(tmp_path / "nats"), "-a", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket
    deadline = time.monotonic() + 15
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
        time.sleep(0.05)
    yield port
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)


def test_compose_commands_as_processes(tmp_path, nats):
    svc = services()
    local = Local(tmp_path)
    local.ports["nats"] = nats
    procs: list[subprocess.Popen] = []
    log = open(tmp_path / "roles.log", "w")

    def start(name: str) -> tuple[subprocess.Popen, dict]:
        env = local.env(svc[name])
        proc = subprocess.Popen(local.command(svc[name]), env=env, stdout=log, stderr=log)
        procs.append(proc)
        return proc, env

    try:
        for name in ("nats-init", "clickhouse-init"):  # one-shot: completed successfully, twice (idempotent)
            for _ in range(2):
                res = subprocess.run(local.command(svc[name]), env=local.env(svc[name]), capture_output=True,
                                     text=True, timeout=120)
                assert res.returncode == 0, res.stderr
        sim, _ = start("sim")
        hot, hot_env = start("storage-hot")
        wait_healthy(svc["storage-hot"], hot_env, hot)
        collector, col_env = start("collector-sim")
        wait_healthy(svc["collector-sim"], col_env, collector)
        tables = {t for dt, t in TABLE_FOR.items() if dt != "gap"}  # gaps appear only when continuity breaks
        deadline = time.monotonic() + 60
        while not (tables <= set(health(hot_env)["storage_hot"]["last_insert"])
                   and REQUIRED_CELLS <= set(health(col_env)["collector"]["coverage"])):
            assert time.monotonic() < deadline, (health(hot_env), REQUIRED_CELLS - set(health(col_env)["collector"]["coverage"]))
            time.sleep(1)
        assert set(health(col_env)["collector"]["coverage"]) == REQUIRED_CELLS  # and nothing unexpected
        assert stop(collector) == 0
        assert stop(hot) == 0  # drains: everything fetched is stored and acked
        cold, cold_env = start("storage-cold")
        wait_healthy(svc["storage-cold"], cold_env, cold)
        assert stop(cold) == 0
        res = subprocess.run([sys.executable, "-m", "marketprism", "query",
                              "SELECT count() FROM marketprism_hot.trades FINAL"],
                             env={**os.environ, "MARKETPRISM_CLICKHOUSE_URL": local.store}, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and int(res.stdout.splitlines()[1]) > 0, res.stderr
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()


def test_least_privilege_users(tmp_path, nats):
    """The collector user cannot consume or delete; the storage user cannot publish records."""
    import asyncio

    import nats as nats_py
    from nats.js.errors import Error as JsError
    from nats.errors import Error as NatsError

    async def scenario():
        url = f"nats://127.0.0.1:{nats}"
        admin = await nats_py.connect(url, user="admin", password=SECRETS["NATS_ADMIN_PASSWORD"])
        from marketprism.bus import streams
        await streams.ensure(admin)
        collector = await nats_py.connect(url, user="collector", password=SECRETS["NATS_COLLECTOR_PASSWORD"])
        ack = await collector.jetstream().publish("gap.binance.spot.BTC-USDT", b"{}", timeout=5)
        assert ack.stream == "MARKET_DATA"
        with pytest.raises((JsError, NatsError, asyncio.TimeoutError)):
            await collector.jetstream().delete_stream("MARKET_DATA")
        storage = await nats_py.connect(url, user="storage", password=SECRETS["NATS_STORAGE_PASSWORD"])
        sub = await storage.jetstream().pull_subscribe_bind("storage-hot", "MARKET_DATA")
        msgs = await sub.fetch(1, timeout=5)
        assert msgs[0].subject == "gap.binance.spot.BTC-USDT"
        await msgs[0].ack()
        with pytest.raises((JsError, NatsError, asyncio.TimeoutError)):
            await storage.jetstream().publish("trade.binance.spot.BTC-USDT", b"{}", timeout=2)
        for nc in (admin, collector, storage):
            await nc.close()

    asyncio.run(scenario())
