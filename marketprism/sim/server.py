"""The simulator's aiohttp application: one path prefix per feed, plus /_sim/stats and /_sim/faults."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web
from loguru import logger as log

from marketprism.sim.binance import BinanceFeed
from marketprism.sim.bybit import BybitFeed
from marketprism.sim.deribit import DeribitFeed
from marketprism.sim.faults import parse_faults
from marketprism.sim.feed import Feed, Options
from marketprism.sim.okx import OkxFeed
from marketprism.sim.series import Series, now_ms

FEEDS: dict[str, type[Feed]] = {"binance_spot": BinanceFeed, "binance_usdm": BinanceFeed, "okx": OkxFeed,
                                "deribit": DeribitFeed, "bybit_spot": BybitFeed, "bybit_linear": BybitFeed}


class Simulator:
    """A running (or ready to run) simulator. Use `start()` from marketprism.sim to get one."""

    def __init__(self, opts: Options, faults: list[dict] | None = None):
        self.opts = opts
        self.series = Series(opts.seed, opts.speed)
        self.feeds: dict[str, Feed] = {name: FEEDS[name](name, opts, self.series) for name in opts.feeds}
        self.url = ""
        self.fault_log: list[dict] = []
        self._initial_faults = parse_faults(faults or [], opts.feeds)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._timers: list[asyncio.TimerHandle] = []
        self._started = time.monotonic()

    def app(self) -> web.Application:
        app = web.Application()
        for name, feed in self.feeds.items():
            for path in feed.ws_paths:
                app.router.add_get(f"/{name}{path}", feed.ws_handler)
            for path, fn in feed.rest_routes():
                app.router.add_get(f"/{name}{path}", feed.rest(fn))
        app.router.add_get("/_sim/stats", self._stats_handler)
        app.router.add_get("/_sim/faults", self._faults_list)
        app.router.add_post("/_sim/faults", self._faults_post)
        return app

    async def start(self) -> "Simulator":
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.host, self.opts.port, reuse_address=True)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._tasks = [asyncio.create_task(feed.pump(), name=f"sim-{name}") for name, feed in self.feeds.items()]
        for fault in self._initial_faults:
            self._schedule(fault)
        return self

    async def stop(self) -> None:
        for handle in self._timers:
            handle.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for feed in self.feeds.values():
            for conn in list(feed.conns):
                if conn.transport is not None:
                    conn.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stats(self) -> dict:
        feeds = {name: feed.stats() for name, feed in self.feeds.items()}
        return {"uptime_s": round(time.monotonic() - self._started, 3),
                "sent": {name: s["sent"] for name, s in feeds.items()}, "feeds": feeds}

    def inject(self, fault: dict | list) -> int:
        """Validate and apply (or schedule, with "at") one fault or a list; returns how many."""
        faults = parse_faults(fault, self.opts.feeds)
        for item in faults:
            self._schedule(item)
        return len(faults)

    def _schedule(self, fault: dict) -> None:
        if fault["at"] > 0:
            handle = asyncio.get_running_loop().call_later(fault["at"], self._apply, fault)
            self._timers.append(handle)
        else:
            self._apply(fault)

    def _apply(self, fault: dict) -> None:
        targets = self.feeds.values() if fault["feed"] == "*" else [self.feeds[fault["feed"]]]
        for feed in targets:
            feed.inject(fault)
        self.fault_log.append(dict(fault, applied_at=now_ms()))
        log.info("simulator fault applied: {}", fault)

    async def _stats_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _faults_list(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.fault_log), content_type="application/json")

    async def _faults_post(self, request: web.Request) -> web.Response:
        try:
            accepted = self.inject(orjson.loads(await request.read()))
        except (orjson.JSONDecodeError, ValueError) as exc:
            return web.Response(body=orjson.dumps({"error": str(exc)}), status=400, content_type="application/json")
        return web.Response(body=orjson.dumps({"accepted": accepted}), content_type="application/json")
