"""The load source of the throughput runs: Binance spot `@trade` frames, pre-encoded.

The exchange simulator models a market (a book walk per step) and costs tens of microseconds per message,
more than the collector it feeds; a throughput run needs a source far cheaper than the system under test.
This one replays the real `@trade` recording (tests/fixtures), one template per recorded frame and symbol,
with only the event/trade times (now) and the trade id (consecutive per symbol, so the collector's
continuity check holds) filled in at send time, and writes the raw WebSocket frames of a whole tick in one
transport write. It speaks the simulator's path layout and its control endpoints (`GET /_sim/stats`,
`POST /_sim/faults` with `{"type": "stale", "seconds": N}`), so a run drives either the same way.

    python -m marketprism.bench.source --port 8091 --symbols S000-USDT,S001-USDT --rate 20000
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from pathlib import Path

import orjson
from aiohttp import WSMsgType, web

from marketprism.sim.feed import ws_frame

FEED = "binance_spot"
TICK_S = 0.005
HIGH_WATER = 8 << 20  # bytes queued on a socket beyond which a tick skips it (the reader is behind)
_TIMES = re.compile(rb'"([EtT])":\d+')


def templates(recording: Path, instrument: str) -> list[tuple[bytes, tuple[int, ...]]]:
    """Each recorded frame as a %-template for one instrument; the tuple says which of (E, t, T) fills
    each placeholder, in order."""
    out = []
    for line in recording.read_bytes().splitlines():
        if not line.strip():
            continue
        frame = orjson.loads(line)
        rec_inst = frame["data"]["s"].encode()
        text = line.replace(b"%", b"%%")
        text = text.replace(rec_inst.lower() + b"@", instrument.lower().encode() + b"@")
        text = text.replace(b'"s":"' + rec_inst + b'"', b'"s":"' + instrument.encode() + b'"')
        order = tuple(b"EtT".index(m.group(1)) for m in _TIMES.finditer(text))
        out.append((_TIMES.sub(lambda m: b'"' + m.group(1) + b'":%d', text), order))
    return out


class Source:
    def __init__(self, symbols: list[str], rate: float, recording: Path) -> None:
        self.rate = rate
        self.instruments = [s.replace("-", "") for s in symbols]
        self.frames = {inst: templates(recording, inst) for inst in self.instruments}
        self.next_id = {inst: 1_000_000 for inst in self.instruments}
        self.owner: dict[str, web.WebSocketResponse] = {}  # instrument -> the socket subscribed to it
        self.transports: dict[web.WebSocketResponse, object] = {}
        self.sent = 0
        self.paused_until = 0.0
        self.started = time.monotonic()
        self._rr = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(f"/{FEED}/stream", self.ws_handler)
        app.router.add_get(f"/{FEED}/api/v3/exchangeInfo", self.exchange_info)
        app.router.add_get("/_sim/stats", self.stats)
        app.router.add_post("/_sim/faults", self.faults)
        return app

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
        await ws.prepare(request)
        self.transports[ws] = request.transport
        for name in request.query.get("streams", "").split("/"):
            inst, _, kind = name.partition("@")
            if kind == "trade" and inst.upper() in self.frames:
                self.owner[inst.upper()] = ws
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:  # a SUBSCRIBE or ping request: acknowledge, nothing else
                    await ws.send_str(orjson.dumps({"result": None, "id": orjson.loads(msg.data).get("id")}).decode())
        finally:
            self.transports.pop(ws, None)
            for inst in [i for i, w in self.owner.items() if w is ws]:
                del self.owner[inst]
        return ws

    async def exchange_info(self, request: web.Request) -> web.Response:
        """The instrument list the collector loads first (only the fields it reads)."""
        wanted = request.query.get("symbol")
        rows = [{"symbol": inst, "status": "TRADING", "baseAsset": inst[:-4], "quoteAsset": inst[-4:]}
                for inst in self.instruments if wanted in (None, inst)]
        return web.Response(body=orjson.dumps({"symbols": rows}), content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        body = {"uptime_s": round(time.monotonic() - self.started, 3), "sent": {FEED: {"trade": self.sent}}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def faults(self, request: web.Request) -> web.Response:
        fault = orjson.loads(await request.read())
        if fault.get("type") != "stale":
            return web.Response(status=400, body=b'{"error":"this source only knows stale"}')
        self.paused_until = time.monotonic() + float(fault.get("seconds", 0))
        return web.Response(body=b'{"accepted":1}', content_type="application/json")

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        last, carry = loop.time(), 0.0
        while True:
            await asyncio.sleep(max(0.0, last + TICK_S - loop.time()))
            now = loop.time()
            due, last = self.rate * (now - last) + carry, now
            if not self.owner or time.monotonic() < self.paused_until:
                carry = 0.0
                continue
            n = int(due)
            carry = due - n
            self.send(n)

    def send(self, n: int) -> None:
        """n frames, round-robin over the subscribed instruments, one write per socket."""
        ms = time.time_ns() // 1_000_000
        insts = self.instruments
        out: dict[web.WebSocketResponse, list[bytes]] = {}
        for _ in range(n):
            inst = insts[self._rr % len(insts)]
            self._rr += 1
            ws = self.owner.get(inst)
            if ws is None:
                continue
            tr = self.transports.get(ws)
            if tr is None or tr.is_closing() or tr.get_write_buffer_size() > HIGH_WATER:
                continue
            tid = self.next_id[inst]
            frames = self.frames[inst]
            template, order = frames[tid % len(frames)]
            values = (ms, tid, ms)
            out.setdefault(ws, []).append(ws_frame(template % tuple(values[i] for i in order)))
            self.next_id[inst] = tid + 1
            self.sent += 1
        for ws, frames in out.items():
            self.transports[ws].write(b"".join(frames))


async def serve(port: int, symbols: list[str], rate: float, recording: Path) -> None:
    source = Source(symbols, rate, recording)
    runner = web.AppRunner(source.app(), access_log=None, handle_signals=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await source.pump()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m marketprism.bench.source", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--symbols", required=True, help="comma list of BASE-QUOTE symbols")
    p.add_argument("--rate", type=float, required=True, help="trades per second, all symbols together")
    p.add_argument("--recording", required=True, help="a Binance spot @trade recording (JSON lines)")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.symbols.split(","), args.rate, Path(args.recording)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
