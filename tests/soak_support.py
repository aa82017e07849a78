"""What the disk-pressure and soak tests add to faults_support.Stack: settings per run, a storage-hot whose
ClickHouse can be switched off, simulator faults over HTTP, RSS samples, and the end-of-run accounting of
every trade the simulator sent (stored once, or inside a recorded gap)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import aiohttp
import nats

from faults_support import Stack, wait
from marketprism.exchanges import make_feed
from marketprism.records import KEY_FIELDS, TABLE_FOR

OUTAGE_ROLE = Path(__file__).with_name("store_outage_role.py")
FEED_OF = {("binance", "spot"): "binance_spot", ("okx", "spot"): "okx", ("okx", "perpetual"): "okx"}
TIME_SLACK_MS = 1000  # gap times are the collector's clock, trade times the simulator's: same machine


class TunedStack(Stack):
    """A Stack whose roles get extra settings; storage-hot can run with a switchable store outage."""

    def __init__(self, tmp: Path, feeds, rate: int, extra: dict[str, str] | None = None) -> None:
        super().__init__(tmp, feeds=feeds, rate=rate)
        self.extra = dict(extra or {})
        self.outage_flag = tmp / "clickhouse-down"

    def env(self, role: str) -> dict:
        env = super().env(role)
        env.update(self.extra, SOAK_STORE_OUTAGE_FLAG=str(self.outage_flag))
        return env

    def start_storage_hot_with_outage_switch(self):
        """storage-hot as `python -m marketprism storage-hot`, but every insert fails while the flag file
        exists (tests/store_outage_role.py): the outage of test_store_outage.py, in the real process."""
        proc = self._spawn("storage-hot", [sys.executable, str(OUTAGE_ROLE)])
        wait(lambda: self.health("storage-hot") is not None or proc.poll() is not None, 60, 0.3)
        assert proc.poll() is None, f"storage-hot exited with {proc.returncode}"
        return proc

    # -- the simulator's control API ---------------------------------------------------------------------
    def sim_fault(self, fault) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.sim_port}/_sim/faults", data=json.dumps(fault).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["accepted"] >= 1

    def sim_stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.sim_port}/_sim/stats", timeout=10) as resp:
            return json.loads(resp.read())

    def sent_trades(self) -> dict[str, int]:
        return {feed: s.get("trade", 0) for feed, s in self.sim_stats()["sent"].items()}

    def integrity(self, extra_env: dict[str, str]) -> tuple[int, dict]:
        env = {**self.env("integrity"), **extra_env}
        res = subprocess.run([sys.executable, "-m", "marketprism", "integrity", "--json", "--hours", "2",
                              "--settle-s", "1", "--collector-url", "http://127.0.0.1:1/health"],
                             env=env, capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode in (0, 1), res.stderr
        return res.returncode, json.loads(res.stdout)


class Witness(threading.Thread):
    """Another client of the simulated venues, subscribed to the trades the collector takes (with the
    collector's own subscription frames). The simulator, like a venue, trades only while someone listens:
    with a witness, trading goes on while the collector is down or reconnecting, so its faults really lose
    trades, and the gaps must account for them."""

    def __init__(self, sim_port: int, feeds, symbols=("BTC-USDT",)) -> None:
        super().__init__(daemon=True)
        self.base = f"ws://127.0.0.1:{sim_port}"
        self.subs = [(feed, sub) for feed in feeds for sub in make_feed(feed).subscriptions(symbols, ("trade",))]
        self.frames = 0
        self.connects = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._ready.set()
        try:
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(*(self._follow(http, feed, sub) for feed, sub in self.subs))
        except asyncio.CancelledError:
            pass

    async def _follow(self, http: aiohttp.ClientSession, feed: str, sub) -> None:
        while True:
            try:
                async with http.ws_connect(f"{self.base}/{feed}{sub.path}", autoping=True, max_msg_size=0) as ws:
                    self.connects += 1
                    for message in sub.messages:
                        await ws.send_str(message)
                    async for _ in ws:
                        self.frames += 1
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.05)  # dropped with everyone else by a disconnect fault: back at once

    def stop(self) -> None:
        self._ready.wait(10)
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self.join(10)


def update_stream(port: int, name: str, **changes) -> dict:
    """Change a stream's config in place (nats-py), as an operator would; returns the new config."""
    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        cfg = (await js.stream_info(name)).config
        for key, value in changes.items():
            setattr(cfg, key, value)
        info = await js.update_stream(cfg)
        await nc.close()
        return {k: getattr(info.config, k) for k in changes}
    return asyncio.run(go())


def stream_state(port: int, name: str) -> dict:
    async def go():
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        js = nc.jetstream()
        info = await js.stream_info(name)
        ci = await js.consumer_info(name, "storage-hot")
        await nc.close()
        return {"messages": info.state.messages, "bytes": info.state.bytes, "last_seq": info.state.last_seq,
                "max_bytes": info.config.max_bytes, "consumer_pending": ci.num_pending,
                "consumer_ack_pending": ci.num_ack_pending}
    return asyncio.run(go())


def drained(port: int) -> bool:
    states = [stream_state(port, s) for s in ("MARKET_DATA", "ORDERBOOK_SNAP")]
    return all(st["consumer_pending"] == 0 and st["consumer_ack_pending"] == 0 for st in states)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 3:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in samples) / var * 60


def duplicates(stack: Stack) -> dict[str, tuple[int, int]]:
    """table -> (rows, distinct dedup keys), over every row storage-hot wrote (no FINAL: a repeat shows)."""
    out = {}
    for dt, table in TABLE_FOR.items():
        key = ", ".join(("exchange", "market_type", "symbol", *KEY_FIELDS[dt]))
        r, k = stack.query(f"SELECT count(), uniqExact(tuple({key})) FROM marketprism_hot.{table}")[0]
        out[table] = (int(r), int(k))
    return out


def trade_accounting(stack: Stack, sent: dict[str, int]) -> dict:
    """Every hole in a trade stream's ids (the simulator's ids are consecutive per instrument) must lie in a
    recorded gap of that stream: in its id range where the gap names both ends (sequence, backpressure), else
    in its time range (restart: from the id after the last one saved, end unknown; disconnect, stale: no ids)
    as bracketed by the hole's stored neighbours.
    Returns the figures and the holes no gap explains."""
    streams = {(e, m, s): (int(lo), int(hi), int(n)) for e, m, s, lo, hi, n in stack.query(
        "SELECT exchange, market_type, symbol, min(toInt64(trade_id)), max(toInt64(trade_id)), uniqExact(trade_id) "
        "FROM marketprism_hot.trades GROUP BY 1, 2, 3")}
    holes = stack.query(
        "SELECT exchange, market_type, symbol, prev_id + 1, id - 1, prev_ts, ts FROM ("
        " SELECT exchange, market_type, symbol, id, ts,"
        "  lagInFrame(id) OVER w AS prev_id, lagInFrame(ts) OVER w AS prev_ts, row_number() OVER w AS rn"
        " FROM (SELECT DISTINCT exchange, market_type, symbol, toInt64(trade_id) AS id,"
        "       toUnixTimestamp64Milli(timestamp) AS ts FROM marketprism_hot.trades)"
        " WINDOW w AS (PARTITION BY exchange, market_type, symbol ORDER BY id"
        "              ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW))"
        " WHERE rn > 1 AND id > prev_id + 1 ORDER BY 1, 2, 3, 4")
    gaps = [(e, m, s, r, None if f == "\\N" else int(f), None if t == "\\N" else int(t), int(a), int(b))
            for e, m, s, r, f, t, a, b in stack.query(
                "SELECT DISTINCT exchange, market_type, symbol, reason, from_sequence, to_sequence, "
                "toUnixTimestamp64Milli(started_at), toUnixTimestamp64Milli(ended_at) FROM marketprism_hot.gaps "
                "WHERE stream_type = 'trade'")]
    # adjacent id ranges of one stream form one range: a stream can drop, publish its gap, and drop again
    merged: dict[tuple, list[list]] = {}
    for e, m, s, r, f, t, _, _ in sorted((g for g in gaps if g[4] is not None and g[5] is not None),
                                         key=lambda g: (g[:3], g[4])):
        runs = merged.setdefault((e, m, s), [])
        if runs and f <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], t)
        else:
            runs.append([f, t, r])
    unexplained, in_gaps, by_reason = [], 0, {}
    for e, m, s, lo, hi, prev_ts, ts in holes:
        lo, hi, prev_ts, ts = int(lo), int(hi), int(prev_ts), int(ts)
        mine = [g for g in gaps if g[:3] == (e, m, s)]
        # an exact sequence range first; an open-ended one (restart: from the last id it saved, to unknown)
        # or one without ids (disconnect, stale) must also fall between the hole's stored neighbours in time
        why = [r for f, t, r in merged.get((e, m, s), []) if f <= lo and t >= hi] + [
            r for *_, r, f, t, a, b in mine if t is None and (f is None or f <= lo)
            and a <= ts + TIME_SLACK_MS and b >= prev_ts - TIME_SLACK_MS]
        if why:
            in_gaps += hi - lo + 1
            by_reason[why[0]] = by_reason.get(why[0], 0) + hi - lo + 1
        else:
            unexplained.append({"stream": f"{e}/{m}/{s}", "ids": [lo, hi], "between_ms": [prev_ts, ts]})
    by_feed: dict[str, dict] = {}
    for (e, m, _), (lo, hi, n) in streams.items():
        feed = by_feed.setdefault(FEED_OF[(e, m)], {"sent": sent.get(FEED_OF[(e, m)], 0), "stored": 0,
                                                     "ids_in_range": 0})
        feed["stored"] += n
        feed["ids_in_range"] += hi - lo + 1
    stored = sum(f["stored"] for f in by_feed.values())
    id_range = sum(f["ids_in_range"] for f in by_feed.values())
    total_sent = sum(f["sent"] for f in by_feed.values())
    return {"sent": total_sent, "stored": stored, "lost": total_sent - stored, "ids_in_range": id_range,
            "by_feed": by_feed,
            "missing_ids_in_gaps": in_gaps, "missing_ids_by_gap_reason": by_reason,
            "missing_ids_outside_gaps": id_range - stored - in_gaps, "unexplained_holes": unexplained[:20],
            "trade_gaps": len(gaps)}
