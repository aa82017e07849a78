"""`marketprism storage-cold` as a process on its own chDB directory (hot and cold in one store, as embedded):
killed with SIGKILL in the middle of a catch-up, restarted, and the cold tier ends up whole, without
duplicates, with the watermark where it belongs; `--check` answers from its health port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from marketprism.bus.server import free_port

WINDOW_S, WINDOWS, PER_WINDOW = 60, 60, 1000
W = WINDOW_S * 1000
T0 = (int(time.time() * 1000) - 2 * 86400_000) // W * W  # two days ago, on a window boundary
KEY = "exchange, market_type, symbol, trade_id"

# Run in a child: the test process already holds the session chDB (one data directory per process).
PREPARE = f"""
import sys
from marketprism.store import schema
from marketprism.store.client import connect
client = connect(sys.argv[1])
schema.apply(client, 30)
step = {W // PER_WINDOW}
client.command("INSERT INTO marketprism_hot.trades SELECT 'binance', 'spot', 'BTC-USDT', 'BTCUSDT', "
               "fromUnixTimestamp64Milli(toInt64({T0} + number * " + str(step) + "), 'UTC'), "
               "fromUnixTimestamp64Milli(toInt64({T0} + number * " + str(step) + " + 50), 'UTC'), "
               "toString(number), 61837.63, 0.001, 'buy' FROM numbers({WINDOWS * PER_WINDOW})")
"""


def health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def watermark(port: int) -> int:
    body = health(port)
    return (body or {}).get("storage_cold", {}).get("tables", {}).get("trades", {}).get("watermark_ms") or 0


def wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


def query(env: dict, sql: str) -> list[list[str]]:
    res = subprocess.run([sys.executable, "-m", "marketprism", "query", sql], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line.split("\t") for line in res.stdout.splitlines()[1:]]


def test_killed_mid_catch_up_then_resumed_without_loss_or_duplicates(tmp_path):
    url = f"chdb://{tmp_path / 'clickhouse'}"
    subprocess.run([sys.executable, "-c", PREPARE, url], check=True, timeout=120)
    port = free_port()
    env = {**os.environ, "MARKETPRISM_CLICKHOUSE_URL": url, "MARKETPRISM_HEALTH_PORT": str(port),
           "MARKETPRISM_ARCHIVE_WINDOW_S": str(WINDOW_S), "MARKETPRISM_ARCHIVE_DELAY_S": "10",
           "MARKETPRISM_ARCHIVE_INTERVAL_S": "1", "MARKETPRISM_LOG_LEVEL": "WARNING"}
    log = open(tmp_path / "cold.log", "w")
    start = lambda: subprocess.Popen([sys.executable, "-m", "marketprism", "storage-cold"], env=env,  # noqa: E731
                                     stdout=subprocess.DEVNULL, stderr=log)
    first = start()
    try:
        reached = wait_for(lambda: watermark(port) >= T0 + 15 * W, 60)
        assert reached, (tmp_path / "cold.log").read_text()[-2000:]
        first.send_signal(signal.SIGKILL)  # in the middle of the catch-up: some window is being copied
        first.wait(timeout=10)
        assert watermark(port) == 0  # gone
        second = start()
        final = T0 + (WINDOWS - 1) * W  # the newest window is still inside the 10 s lag of the data's clock
        assert wait_for(lambda: watermark(port) == final, 60), (tmp_path / "cold.log").read_text()[-2000:]
        check = subprocess.run([sys.executable, "-m", "marketprism", "storage-cold", "--check"], env=env, timeout=30)
        assert check.returncode == 0
        body = health(port)["storage_cold"]
        assert body["status"] == "healthy" and body["failed_windows"] == 0
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=30) == 0
    finally:
        for proc in (first, locals().get("second")):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
    archived = (WINDOWS - 1) * PER_WINDOW
    # one query process (each chDB start costs seconds): cold rows and keys, hot keys before the watermark,
    # windows whose latest outcome is 'failed', the stored watermark
    (result,) = query(env, f"""SELECT
        (SELECT count() FROM marketprism_cold.trades), (SELECT uniqExact({KEY}) FROM marketprism_cold.trades),
        (SELECT uniqExact({KEY}) FROM marketprism_hot.trades
         WHERE timestamp < fromUnixTimestamp64Milli(toInt64({final}), 'UTC')),
        (SELECT count() FROM (SELECT argMax(status, updated_at) AS s FROM marketprism_cold.archive_windows
         GROUP BY table_name, window_start) WHERE s = 'failed'),
        (SELECT toUnixTimestamp64Milli(argMax(watermark, updated_at)) FROM marketprism_cold.archive_watermarks
         WHERE table_name = 'trades')""")
    assert [int(v) for v in result] == [archived, archived, archived, 0, final]
