"""What every simulated feed shares: WebSocket connections, the generator loop, fan-out, REST
plumbing, counters and fault handling. A venue module subclasses Feed and supplies the wire format.

Frames are encoded once per event and written to each subscribed socket as raw WebSocket frames,
many per transport write: the simulator is the benchmark's load source, so its cost per message
must stay far below the collector's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

import orjson
from aiohttp import WSMsgType, web
from loguru import logger as log

from marketprism.sim.faults import FaultState, RestRule
from marketprism.sim.market import Instrument
from marketprism.sim.series import Series, now_ms


# (subscription key, encoded payload, data type counted in stats, how many records it carries)
Event = tuple[object, bytes, str, int]
Wrap = tuple[bytes, bytes] | None

TICK_S = 0.01
MAX_STEPS_PER_TICK = 500
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
SLOW_CONSUMER_S = 5.0
MALFORMED = b"<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"


@dataclass(frozen=True)
class Options:
    host: str = "127.0.0.1"
    port: int = 8090
    feeds: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ("BTC-USDT", "ETH-USDT")
    rate: float = 10.0
    speed: float = 1.0
    seed: int = 1
    checksum: str = "real"


class RestError(Exception):
    def __init__(self, status: int, body: object):
        super().__init__(status)
        self.status = status
        self.body = body


def ws_frame(payload: bytes) -> bytes:
    """An unmasked server-to-client text frame (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        return b"\x81" + bytes((n,)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


class Conn:
    """One client socket and what it subscribed to (key -> envelopes to wrap each payload in)."""

    def __init__(self, feed: "Feed", ws: web.WebSocketResponse, transport, conn_id: str):
        self.feed = feed
        self.ws = ws
        self.transport = transport
        self.id = conn_id
        self.subs: dict[object, list[Wrap]] = {}
        self.tasks: list[asyncio.Task] = []
        self.state: dict[str, object] = {}

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, payloads: list[bytes]) -> None:
        if self.alive():
            self.transport.write(b"".join([ws_frame(p) for p in payloads]))
            self.feed.frames += len(payloads)

    def send(self, obj: object) -> None:
        self.write([orjson.dumps(obj)])

    def subscribe(self, key: object, wrap: Wrap = None) -> bool:
        wraps = self.subs.setdefault(key, [])
        if wrap in wraps:
            return False
        if not wraps:
            self.feed.want(key, 1)
        wraps.append(wrap)
        return True

    def unsubscribe(self, key: object, wrap: Wrap = None) -> None:
        wraps = self.subs.get(key, [])
        if wrap in wraps:
            wraps.remove(wrap)
        if not wraps and self.subs.pop(key, None) is not None:
            self.feed.want(key, -1)

    def unsubscribe_all(self) -> None:
        for key in list(self.subs):
            self.feed.want(key, -1)
        self.subs.clear()

    def close_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()


class Feed:
    """Base of every venue feed. Subclasses set `ws_paths` and implement the hooks below."""

    ws_paths: tuple[str, ...] = ()
    # Trade history: a venue keeps its trades for its history endpoints. `tape_size` trades per instrument
    # (Binance, OKX: kept structurally by the venue module, whether streamed or not); `frame_tape` > 0 keeps
    # that many streamed trade frames per subscription key instead (Bybit: its trade ids exist only in frames).
    tape_size: int = 20_000
    frame_tape: int = 0

    def __init__(self, name: str, opts: Options, series: Series):
        self.name = name
        self.opts = opts
        self.series = series
        self.rng = random.Random(f"{opts.seed}:{name}")
        self.instruments: dict[str, Instrument] = {}
        self.conns: set[Conn] = set()
        self.sent: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.frames = 0
        self.rest_requests = 0
        self.faults = FaultState()
        self._timers: list[list] = []
        self._conn_seq = 0
        self._wanted: dict[object, int] = {}   # key -> sockets subscribed, so unwanted frames are never built
        self.tapes: dict[str, deque] = {}      # instrument id -> its recent trades (venue-defined tuples)
        self.trade_frames: dict[object, deque] = {}   # key -> (ms, frame) of streamed trade frames

    def tape(self, inst: Instrument) -> deque:
        t = self.tapes.get(inst.id)
        if t is None:
            t = self.tapes[inst.id] = deque(maxlen=self.tape_size)
        return t

    # ---- hooks for venues -------------------------------------------------------------------
    def rest_routes(self) -> list[tuple[str, Callable[[web.Request], object]]]:
        return []

    def on_open(self, conn: Conn, request: web.Request) -> None:
        pass

    def on_text(self, conn: Conn, text: str) -> None:
        pass

    def trade_events(self, inst: Instrument, ms: int) -> list[Event]:
        return []

    def depth_events(self, inst: Instrument, diff, ms: int) -> list[Event]:
        return []

    def error_body(self, status: int) -> object:
        return {"error": status}

    # ---- helpers for venues -----------------------------------------------------------------
    def every(self, real_s: float, fn: Callable[[int], list[Event]]) -> None:
        """Run fn(now_ms) on a real-world cadence (sped up by --speed) while clients are connected."""
        self._timers.append([self.series.cadence(real_s), 0.0, fn])

    def count(self, data_type: str, n: int = 1) -> None:
        for dt in data_type.split("+"):
            self.sent[dt] = self.sent.get(dt, 0) + n

    def count_served(self, data_type: str, n: int = 1) -> None:
        self.served[data_type] = self.served.get(data_type, 0) + n

    def skipped(self, inst: Instrument) -> bool:
        """True when a skip_sequence fault eats this book message (its sequence is still used)."""
        return bool(self.faults.skips) and self.faults.take_skip(inst.id, inst.symbol)

    def next_conn_id(self) -> str:
        self._conn_seq += 1
        return f"{self.rng.getrandbits(32):08x}-{self._conn_seq}"

    def wanted(self, key: object) -> bool:
        return key in self._wanted

    def want(self, key: object, delta: int) -> None:
        n = self._wanted.get(key, 0) + delta
        if n > 0:
            self._wanted[key] = n
        else:
            self._wanted.pop(key, None)

    # ---- WebSocket ----------------------------------------------------------------------------
    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=True, max_msg_size=1 << 20)
        await ws.prepare(request)
        conn = Conn(self, ws, request.transport, self.next_conn_id())
        self.conns.add(conn)
        try:
            self.on_open(conn, request)
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        self.on_text(conn, msg.data)
                    except Exception:  # one bad request must not end the client's session
                        log.exception("{}: error handling {!r}", self.name, msg.data[:200])
        finally:
            self.conns.discard(conn)
            conn.unsubscribe_all()
            conn.close_tasks()
        return ws

    # ---- generation ---------------------------------------------------------------------------
    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        last, carry = loop.time(), 0.0
        while True:
            # Sleep what is left of the tick: a tick spent generating must not also be spent idle.
            await asyncio.sleep(max(0.0, last + TICK_S - loop.time()))
            now = loop.time()
            elapsed, last = now - last, now
            if not self.conns or self.faults.stale():
                carry = 0.0
                continue
            due = self.opts.rate * elapsed + carry
            n = int(due)
            carry = due - n
            # A backlog past a few ticks means the machine cannot keep up: send less rather than
            # spiral into ever larger, ever later batches (stats report what was really sent).
            n = min(n, max(1, int(self.opts.rate * TICK_S * 4)), MAX_STEPS_PER_TICK)
            ms = now_ms()
            events = self.fast_events(n, ms) if n else []
            events += self.timed_events(now, ms)
            if events:
                self.broadcast(self.truncate(events))
            await self.backpressure()

    def fast_events(self, n: int, ms: int) -> list[Event]:
        events: list[Event] = []
        for inst in self.instruments.values():
            for _ in range(n):
                inst.flip = not inst.flip
                if inst.flip:
                    if self.frame_tape:
                        trades = self.trade_events(inst, ms)
                        for key, data, _dtype, _n in trades:
                            kept = self.trade_frames.get(key)
                            if kept is None:
                                kept = self.trade_frames[key] = deque(maxlen=self.frame_tape)
                            kept.append((ms, data))
                        events += trades
                    else:
                        events += self.trade_events(inst, ms)
                else:
                    events += self.depth_events(inst, inst.step(), ms)
        return events

    def timed_events(self, now: float, ms: int) -> list[Event]:
        events: list[Event] = []
        for timer in self._timers:
            cadence, due, fn = timer
            if now >= due:
                timer[1] = now + cadence if now - due > cadence else due + cadence
                events += fn(ms)
        return events

    def truncate(self, events: list[Event]) -> list[Event]:
        if not self.faults.truncations:
            return events
        for i, (key, data, dtype, n) in enumerate(events):
            if self.wanted(key) and self.faults.take_truncation(dtype):
                events[i] = (key, data[: len(data) // 2], "truncated", 0)
                break
        return events

    def broadcast(self, events: list[Event]) -> None:
        delivered = [False] * len(events)
        for conn in list(self.conns):
            subs = conn.subs
            if not subs:
                continue
            out: list[bytes] = []
            for i, (key, data, _dtype, _n) in enumerate(events):
                wraps = subs.get(key)
                if wraps is None:
                    continue
                delivered[i] = True
                for w in wraps:
                    out.append(data if w is None else w[0] + data + w[1])
            if out:
                conn.write(out)
        for i, (_key, _data, dtype, n) in enumerate(events):
            if delivered[i] and n:
                self.count(dtype, n)

    async def backpressure(self) -> None:
        """Wait for slow readers; drop one that stays behind, as the exchanges do."""
        for conn in list(self.conns):
            tr = conn.transport
            if not conn.alive() or tr.get_write_buffer_size() <= HIGH_WATER:
                continue
            deadline = time.monotonic() + SLOW_CONSUMER_S
            while conn.alive() and tr.get_write_buffer_size() > LOW_WATER:
                if time.monotonic() > deadline:
                    log.warning("{}: dropping slow consumer {}", self.name, conn.id)
                    tr.abort()
                    break
                await asyncio.sleep(0.005)

    # ---- faults -------------------------------------------------------------------------------
    def inject(self, fault: dict) -> None:
        kind = fault["type"]
        if kind == "drop":
            self.faults.note("drop")
            for conn in list(self.conns):
                if fault.get("mode", "close") == "close":
                    asyncio.ensure_future(conn.ws.close(code=1001, message=b"simulated drop"))
                elif conn.transport is not None:
                    conn.transport.abort()
        elif kind == "malformed":
            self.faults.note("malformed", int(fault["count"]) or 1)
            for conn in list(self.conns):
                conn.write([MALFORMED] * max(1, int(fault["count"])))
        else:
            self.faults.arm(fault)

    # ---- REST ---------------------------------------------------------------------------------
    def rest(self, fn: Callable[[web.Request], object]) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            self.rest_requests += 1
            rule, delay = self.faults.take_rest(request.path)
            if delay:
                await asyncio.sleep(delay)
            if rule is not None:
                return self.rest_fault(rule)
            try:
                body = fn(request)
            except RestError as exc:
                return web.Response(body=orjson.dumps(exc.body), status=exc.status, content_type="application/json")
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        return handler

    def rest_fault(self, rule: RestRule) -> web.Response:
        headers = {}
        if rule.retry_after is not None or rule.status in (418, 429, 503):
            headers["Retry-After"] = str(int(rule.retry_after if rule.retry_after is not None else 1))
        return web.Response(body=orjson.dumps(self.error_body(rule.status)), status=rule.status,
                            headers=headers, content_type="application/json")

    def stats(self) -> dict:
        return {"sent": dict(self.sent), "served": dict(self.served), "frames": self.frames,
                "connections": len(self.conns), "rest_requests": self.rest_requests,
                "faults": dict(self.faults.applied)}


def query_int(request: web.Request, name: str, default: int | None, lo: int = 1, hi: int = 1 << 62) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return max(lo, min(hi, int(raw)))
    except ValueError:
        raise RestError(400, {"error": f"bad {name}"}) from None
