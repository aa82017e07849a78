"""`marketprism demo`: the simulator and the embedded pipeline on this machine, then a table of row counts
per table x exchange that shows whether all eight data types and all four venues have rows.

The simulator runs in this process on a free port. The pipeline is a `marketprism run` child process: chDB
allows one process per data directory, and a child is drained and stopped like any `run` (SIGTERM), with
its own data directory, a free health port and a free port for its managed nats-server. It runs in a
session of its own so that its managed nats-server can be reached by process group if it must be killed.
Rows are counted through the child's POST /query, the route `marketprism query` takes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from marketprism import sim
from marketprism.bus.server import free_port
from marketprism.records import EXCHANGES, TABLE_FOR
from marketprism.settings import ENV_PREFIX, FEEDS, Settings
from marketprism.ops.args import positive_float

TABLES = [TABLE_FOR[dt] for dt in TABLE_FOR if dt != "gap"]
# DESIGN.md §2: the venues that publish each data type (the cells the demo waits for).
EXPECTED = {
    "trades": EXCHANGES, "orderbooks": EXCHANGES, "funding_rates": EXCHANGES, "open_interests": EXCHANGES,
    "liquidations": ("binance", "okx", "bybit"), "lsr_top_positions": ("binance", "okx"),
    "lsr_all_accounts": ("binance", "okx", "bybit"), "volatility_indices": ("deribit",),
}
SIM_SPEED = 20.0  # funding, ratios and the volatility index on a seconds cadence instead of minutes
FOLLOW_INTERVAL_S = 10.0
STOP_TIMEOUT_S = 30.0
COUNT_SQL = " UNION ALL ".join(f"SELECT '{t}', exchange, count() FROM marketprism_hot.{t} GROUP BY exchange"
                               for t in [*TABLES, "gaps"])

Counts = dict[tuple[str, str], int]



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Start the simulator and the embedded pipeline (`marketprism run` on its own data dir "
                          "and free ports), print rows per table x exchange once every venue's data types have "
                          "rows (or at --timeout), stop both; exit 0 only if all eight data types and all four "
                          "venues have rows.")
    parser.add_argument("--follow", action="store_true", help="keep running and reprint the table every "
                        f"{FOLLOW_INTERVAL_S:.0f} s until Ctrl-C")
    parser.add_argument("--timeout", type=positive_float, default=25.0,
                        help="seconds to wait for every venue's rows before printing (default 25)")
    parser.add_argument("--data-dir", help="keep the demo's data here (default: a temporary directory, deleted)")


def main(args, settings: Settings) -> int:
    return asyncio.run(demo(args.timeout, args.follow, args.data_dir))


async def demo(timeout_s: float, follow: bool = False, data_dir: str | None = None) -> int:
    started = time.monotonic()
    data = Path(data_dir or tempfile.mkdtemp(prefix="marketprism-demo-")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = await sim.start(port=0, speed=SIM_SPEED)
    child = None
    try:
        health_port = free_port()
        child = start_run(data, simulator.url, health_port)
        print(f"demo: simulator on {simulator.url}, `marketprism run` pid {child.pid} with data in {data}",
              file=sys.stderr)
        counts = await wait_for_rows(health_port, child, stop, started + timeout_s)
        if counts is None and stop.is_set():
            return 130
        if counts is None:
            print(f"demo: the pipeline did not answer; its log ({data / 'run.log'}) ends with:\n"
                  + tail(data / "run.log"), file=sys.stderr)
            return 1
        ok = report(counts, time.monotonic() - started)
        if follow and not stop.is_set():
            print(f"demo: following; ask it questions with MARKETPRISM_DATA_DIR={data} marketprism query "
                  "\"SELECT ...\"; Ctrl-C stops", file=sys.stderr)
            ok = await follow_rows(health_port, child, stop, started, ok)
    finally:
        if child is not None:
            await stop_run(child)
        await simulator.stop()
        if data_dir is None:
            shutil.rmtree(data, ignore_errors=True)
    return 0 if ok else 1


def start_run(data: Path, sim_url: str, health_port: int) -> subprocess.Popen:
    """`marketprism run` against the simulator. The user's MARKETPRISM_* settings are left out: the demo
    must not write into their store, reach their NATS, or take their ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({f"{ENV_PREFIX}DATA_DIR": str(data), f"{ENV_PREFIX}HEALTH_PORT": str(health_port),
                f"{ENV_PREFIX}EMBEDDED_NATS_PORT": str(free_port()), f"{ENV_PREFIX}LOG_LEVEL": "WARNING"})
    for feed in FEEDS:
        env[f"{ENV_PREFIX}{feed.upper()}_WS_URL"] = sim_url.replace("http://", "ws://") + f"/{feed}"
        env[f"{ENV_PREFIX}{feed.upper()}_REST_URL"] = f"{sim_url}/{feed}"
    with open(data / "run.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "marketprism", "run"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)


async def stop_run(child: subprocess.Popen) -> None:
    """SIGTERM drains the run and stops its nats-server; a run that does not end is killed with its group.
    The wait must not block the event loop: the simulator runs on it, and a draining run still talks to it
    (closing handshakes of its WebSockets, a REST request in flight), which would otherwise hang until their
    own timeouts."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while child.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if child.poll() is not None:
            return
        print(f"demo: `marketprism run` pid {child.pid} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it",
              file=sys.stderr)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # its own session: the group is the run and its nats-server
    except ProcessLookupError:
        pass
    child.wait()


async def wait_for_rows(port: int, child, stop: asyncio.Event, deadline: float) -> Counts | None:
    """Counts once every expected cell has rows or at the deadline; None if the run never answered."""
    counts = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stop.is_set() and child.poll() is None:
            counts = await query_counts(http, port) or counts
            if counts is not None and not missing(counts):
                break
            if time.monotonic() >= deadline:
                break
            await sleep_unless(stop, 0.5)
    return counts


async def follow_rows(port: int, child, stop: asyncio.Event, started: float, ok: bool) -> bool:
    """Reprint the table until stopped; the verdict of the last table printed."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while not stop.is_set() and child.poll() is None:
            await sleep_unless(stop, FOLLOW_INTERVAL_S)
            counts = await query_counts(http, port)
            if counts is not None and not stop.is_set():
                ok = report(counts, time.monotonic() - started)
    if child.poll() is not None:
        print(f"demo: `marketprism run` exited with {child.returncode}", file=sys.stderr)
        return False
    return ok


async def query_counts(http: aiohttp.ClientSession, port: int) -> Counts | None:
    try:
        async with http.post(f"http://127.0.0.1:{port}/query", data=COUNT_SQL) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None  # not up yet
    counts: Counts = {}
    for line in text.splitlines()[1:]:
        table, exchange, n = line.split("\t")
        counts[(table, exchange)] = int(n)
    return counts


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


def missing(counts: Counts) -> list[str]:
    return [f"{t}/{ex}" for t, venues in EXPECTED.items() for ex in venues if not counts.get((t, ex))]


def report(counts: Counts, elapsed_s: float) -> bool:
    """Print the table; True when all eight data types and all four venues have rows."""
    print(render(counts, elapsed_s), flush=True)
    types = [t for t in TABLES if any(counts.get((t, ex)) for ex in EXCHANGES)]
    venues = [ex for ex in EXCHANGES if any(counts.get((t, ex)) for t in TABLES)]
    ok = len(types) == len(TABLES) and len(venues) == len(EXCHANGES)
    verdict = "OK" if ok else "INCOMPLETE"
    print(f"{verdict}: {len(types)}/{len(TABLES)} data types and {len(venues)}/{len(EXCHANGES)} venues have rows",
          flush=True)
    gaps = missing(counts)
    if gaps:
        print(f"no rows yet for: {', '.join(gaps)}", flush=True)
    return ok


def render(counts: Counts, elapsed_s: float) -> str:
    """Rows per table x exchange; '-' where the venue does not publish that data type."""
    width = max(len(t) for t in TABLE_FOR.values()) + 2
    lines = [f"rows in marketprism_hot after {elapsed_s:.1f} s", f"{'table':<{width}}"
             + "".join(f"{ex:>10}" for ex in EXCHANGES)]
    for table in [*TABLES, "gaps"]:
        cells = []
        for ex in EXCHANGES:
            n = counts.get((table, ex), 0)
            published = table == "gaps" or ex in EXPECTED[table]
            cells.append(f"{n:>10}" if n or published else f"{'-':>10}")
        lines.append(f"{table:<{width}}" + "".join(cells))
    return "\n".join(lines)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
