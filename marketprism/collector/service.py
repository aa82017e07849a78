"""The collector role: one generic connection loop for every feed, REST polls, book flushes, publishing.

connect -> subscribe -> read -> parse (Feed.on_message) -> publish; capped exponential backoff with
jitter; an idle watchdog; every frame is parsed under the feed's own error counting, so one bad frame
never kills a stream; a disconnect turns into gap records and book resyncs.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
from loguru import logger

from marketprism import records
from marketprism.collector.coverage import Coverage
from marketprism.exchanges import make_feed
from marketprism.exchanges.base import Feed, Subscription
from marketprism.ops import metrics
from marketprism.settings import Settings

BLOCKED_STATUSES = (403, 451)
MAX_CONNECTION_AGE_S = 23 * 3600  # Binance drops every connection at 24 h: leave earlier, on our terms


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Collector:
    def __init__(self, settings: Settings, publish, recorder=None) -> None:
        self.settings = settings
        self.publish = publish  # async (subject, payload, msg_id) -> None
        self.recorder = recorder
        self.feeds: dict[str, Feed] = {name: make_feed(name, settings.depth, settings.book_interval_ms)
                                       for name in settings.feeds}
        self.coverage = Coverage()
        self.blocked: dict[str, str] = {}
        self.connected: dict[str, int] = {}
        self.stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reported_errors: dict[str, int] = {}

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30, connect=self.settings.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            jobs = []
            for name, feed in self.feeds.items():
                symbols, types = self.settings.symbols, self.settings.data_types
                jobs += [self._ws_loop(feed, sub) for sub in feed.subscriptions(symbols, types)]
                jobs += [self._poll_loop(feed, poll.path, poll.interval_s) for poll in feed.polls(symbols, types)]
                if self.settings.book_interval_ms > 0 and "orderbook" in types:
                    jobs.append(self._flush_loop(feed))
            await asyncio.gather(*jobs)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop reading; every loop notices within a second."""
        self.stopping.set()

    async def emit(self, feed: Feed, recs: list[records.Record]) -> None:
        for rec in recs:
            dt = records.data_type(rec)
            if dt == "gap":
                metrics.GAPS.labels(exchange=rec.exchange, stream_type=rec.stream_type, reason=rec.reason).inc()
                logger.warning("gap {} {} {} {}: {} [{}..{}]", rec.exchange, rec.market_type, rec.symbol,
                               rec.stream_type, rec.reason, rec.from_sequence, rec.to_sequence)
            else:
                self.coverage.seen(dt, rec.exchange, rec.market_type)
            metrics.PUBLISHED.labels(exchange=rec.exchange, data_type=dt).inc()
            await self.publish(records.subject(rec), records.encode(rec), records.dedup_key(rec))

    async def _handle(self, feed: Feed, data, source: str) -> list[str]:
        received = now_ms()
        metrics.FRAMES.labels(feed=feed.name).inc()
        if self.recorder:
            self.recorder.write(feed.name, received, source, data)
        await self.emit(feed, feed.on_message(data, source, received))
        self._count_errors(feed)
        for path in feed.take_requests():
            self._spawn(self._fetch_until_done(feed, path))
        return feed.take_outgoing()

    def _count_errors(self, feed: Feed) -> None:
        total = sum(feed.errors.values())
        if total != self._reported_errors.get(feed.name, 0):
            for reason, n in feed.errors.items():
                metrics.PARSE_ERRORS.labels(feed=feed.name, reason=reason)._value.set(n)
            logger.warning("{}: {} unparseable frames so far ({})", feed.name, total, dict(feed.errors))
            self._reported_errors[feed.name] = total

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- WebSocket ---------------------------------------------------------------------------------
    async def _ws_loop(self, feed: Feed, sub: Subscription) -> None:
        url = self.settings.ws_url(feed.name) + sub.path
        attempt = 0
        while not self.stopping.is_set():
            opened = time.monotonic()
            try:
                await self._session_once(feed, sub, url)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                logger.warning("{}: connection to {} failed: {}", feed.name, url, e or type(e).__name__)
            finally:
                self.connected.pop(url, None)
                # Continuity ends here whether we chose to stop or the peer dropped us: both are gaps.
                await self.emit(feed, feed.on_disconnect(now_ms()))
            if self.stopping.is_set():
                break
            attempt = 0 if time.monotonic() - opened > 60 else attempt + 1
            delay = min(self.settings.reconnect_max_s, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
            metrics.RECONNECTS.labels(feed=feed.name).inc()
            await self._sleep(delay)

    async def _session_once(self, feed: Feed, sub: Subscription, url: str) -> None:
        async with self._session.ws_connect(url, autoping=True, max_msg_size=0, compress=0) as ws:
            logger.info("{}: connected {}", feed.name, url)
            self.connected[url] = now_ms()
            for frame in sub.messages:
                await ws.send_str(frame)
            pinger = asyncio.create_task(self._ping(ws, feed)) if feed.ping_frame else None
            opened = last = time.monotonic()
            try:
                while not self.stopping.is_set() and time.monotonic() - opened < MAX_CONNECTION_AGE_S:
                    try:  # short waits so that a stop is noticed within a second
                        msg = await ws.receive(timeout=1.0)
                    except asyncio.TimeoutError:
                        if time.monotonic() - last > self.settings.idle_timeout_s:
                            logger.warning("{}: no data for {}s on {}, reconnecting", feed.name,
                                           self.settings.idle_timeout_s, url)
                            return
                        continue
                    last = time.monotonic()
                    if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        for frame in await self._handle(feed, msg.data, url):
                            await ws.send_str(frame)
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                      aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        logger.warning("{}: socket closed by peer ({})", feed.name, msg.extra or msg.type.name)
                        return
            finally:
                if pinger:
                    pinger.cancel()

    async def _ping(self, ws, feed: Feed) -> None:
        while not ws.closed:
            await asyncio.sleep(feed.ping_interval_s)
            await ws.send_str(feed.ping_frame)

    # -- REST ----------------------------------------------------------------------------------------
    async def _poll_loop(self, feed: Feed, path: str, interval_s: float) -> None:
        await self._sleep(random.uniform(0, min(interval_s, 2.0)))  # spread the first requests
        while not self.stopping.is_set():
            await self._fetch(feed, path)
            await self._sleep(interval_s)

    async def _fetch_until_done(self, feed: Feed, path: str) -> None:
        """Snapshots must arrive for a book to resync: retry with backoff until one does."""
        attempt = 0
        while not self.stopping.is_set() and not await self._fetch(feed, path):
            attempt += 1
            await self._sleep(min(self.settings.reconnect_max_s, 0.5 * 2 ** attempt) * random.uniform(0.5, 1))

    async def _fetch(self, feed: Feed, path: str) -> bool:
        url = self.settings.rest_url(feed.name) + path
        try:
            async with self._session.get(url) as resp:
                body = await resp.read()
                metrics.REST.labels(feed=feed.name, status=str(resp.status)).inc()
                if resp.status == 200:
                    self.blocked.pop(feed.name, None)
                    await self._handle(feed, body, path)
                    return True
                await self._rest_failure(feed, resp, path)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            logger.warning("{}: GET {} failed: {}", feed.name, path, e or type(e).__name__)
        return False

    async def _rest_failure(self, feed: Feed, resp, path: str) -> None:
        if resp.status in (429, 418):
            wait = float(resp.headers.get("Retry-After", "5") or 5)
            metrics.RATE_LIMIT_WAITS.labels(feed=feed.name).inc()
            logger.warning("{}: rate limited ({}) on {}, waiting {}s", feed.name, resp.status, path, wait)
            await self._sleep(wait)
        elif resp.status in BLOCKED_STATUSES:
            if feed.name not in self.blocked:
                logger.error("{}: blocked by the exchange (HTTP {}) - this location cannot use {}", feed.name,
                             resp.status, self.settings.rest_url(feed.name))
            self.blocked[feed.name] = f"HTTP {resp.status} on {path}"
            await self._sleep(300)
        else:
            logger.warning("{}: GET {} answered HTTP {}", feed.name, path, resp.status)

    async def _flush_loop(self, feed: Feed) -> None:
        interval = self.settings.book_interval_ms / 1000
        while not self.stopping.is_set():
            await self._sleep(interval)
            await self.emit(feed, feed.flush_books())

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def health(self) -> dict:
        return {"coverage": self.coverage.report(), "blocked": dict(self.blocked),
                "connections": len(self.connected), "parse_errors": {n: dict(f.errors) for n, f in self.feeds.items()
                                                                      if f.errors}}
