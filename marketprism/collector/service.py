"""The collector role: one generic connection loop for every feed, REST polls, book flushes, publishing.

connect -> subscribe -> read -> parse (Feed.on_message) -> publish; capped exponential backoff with
jitter; an idle watchdog on market data (keep-alive answers do not count); every frame is parsed under
the feed's own error counting, so one bad frame never kills a stream. Continuity:

- books: the feed reports a lost connection (Feed.on_disconnect) and resyncs by its venue's rule;
- every other stream a connection carried gets a gap from the last data frame to the first data frame
  of the next connection (or to the stop): reason `stale` when the watchdog gave up on a silent
  connection, `disconnect` otherwise. Streams whose continuity the feed checks itself (Feed.sequenced:
  Binance spot trade ids) get no such gap: the next id tells exactly what was lost, as a `sequence`
  gap with the missing ids, and a second, vaguer gap for the same loss would only be noise.

REST goes through one rate budget per venue (ratelimit.py); instrument metadata is loaded before the
connections open and refreshed hourly (instruments.py).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import aiohttp
import msgspec
from loguru import logger

from marketprism import records
from marketprism.collector import instruments
from marketprism.collector.continuity import Overflow, StreamState
from marketprism.collector.coverage import Coverage
from marketprism.collector.ratelimit import Budgets, Venue
from marketprism.exchanges import make_feed
from marketprism.exchanges.base import Feed, Subscription
from marketprism.ops import metrics
from marketprism.settings import Settings

BLOCKED_STATUSES = (403, 451)
RATE_LIMITED_STATUSES = (429, 418)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Link:
    """Continuity of one subscription across its connections: the streams it carried, when market data
    last arrived, and the gaps opened by a lost connection until data flows again."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        # (record class, market_type, symbol, instrument) of every record seen: the class rather than its
        # data type name, which is a slower attribute chain to read per record
        self.streams: dict[tuple[type, str, str, str], None] = {}
        self.last_data_ms = 0
        self.last_data = 0.0  # monotonic, for the idle watchdog
        self.lost: dict[tuple[str, str, str, str], tuple[int, str]] = {}  # (data_type, ...) -> (started_at, reason)

    def saw(self, recs: list[records.Record], at_ms: int) -> list[records.Record]:
        """A data frame arrived; returns the gaps it closes (the first data after a lost connection)."""
        self.last_data_ms, self.last_data = at_ms, time.monotonic()
        streams = self.streams
        for rec in recs:
            key = (type(rec), rec.market_type, rec.symbol, rec.instrument)
            if key not in streams:
                streams[key] = None
        return self.close(at_ms) if self.lost else []

    def lose(self, reason: str, at_ms: int) -> None:
        """The connection ended; a gap opens for each stream (kept open across failed reconnects). Books
        resync by their own rule (Feed.on_disconnect) and a gap has no continuity of its own."""
        started = self.last_data_ms or at_ms
        sequenced = self.feed.sequenced
        for cls, market_type, symbol, instrument in self.streams:
            dt = cls.__struct_config__.tag
            if dt not in sequenced and dt != "orderbook" and dt != "gap":
                self.lost.setdefault((dt, market_type, symbol, instrument), (started, reason))

    def close(self, at_ms: int) -> list[records.Record]:
        gaps = [records.Gap(exchange=self.feed.exchange, market_type=mt, symbol=symbol, instrument=inst,
                            timestamp=at_ms, received_at=at_ms, stream_type=dt, reason=reason,
                            started_at=started, ended_at=at_ms)
                for (dt, mt, symbol, inst), (started, reason) in self.lost.items()]
        self.lost.clear()
        return gaps


class Pacer:
    """Spaces the frames sent on one connection: at most `per_s` a second (None: as fast as they come)."""

    def __init__(self, per_s: float | None) -> None:
        self.gap_s = 1.0 / per_s if per_s else 0.0
        self.next_at = 0.0

    async def send(self, ws, frames) -> None:
        for frame in frames:
            if self.gap_s:
                delay = self.next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                self.next_at = time.monotonic() + self.gap_s
            await ws.send_str(frame)


class Collector:
    def __init__(self, settings: Settings, publish, recorder=None, has_room=None, state_path: Path | None = None):
        self.settings = settings
        self.publish = publish  # async (subject, payload, msg_id, token) -> None; token: see StreamState
        self.has_room = has_room  # () -> bool: can the bus take one more record now?
        self.recorder = recorder
        self.state = StreamState(state_path) if state_path else None
        self.overflow = Overflow()
        self.feeds: dict[str, Feed] = {name: make_feed(name, settings.depth, settings.book_interval_ms)
                                       for name in settings.feeds}
        self.coverage = Coverage()
        self.budgets = Budgets()
        self.blocked: dict[str, str] = {}
        self.connected: dict[int, int] = {}  # id(link) -> connected since (ms)
        self.stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reported_errors: dict[tuple[str, str], int] = {}  # (feed, reason) -> count, as in metrics
        self._error_changes: dict[str, int] = {}  # feed -> its errors' change count when last reported

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30, connect=self.settings.connect_timeout_s)
        symbols, types = self.settings.symbols, self.settings.data_types
        async with aiohttp.ClientSession(timeout=timeout) as self._session:
            # Metadata first, so that symbols are named from it from the first record; bounded, so an
            # unreachable venue only delays its feed by the connect timeout.
            await asyncio.gather(*(self._first_instruments(feed) for feed in self.feeds.values()))
            jobs = []
            if self.state:
                await self._publish_gaps(self.state.restart_gaps(now_ms()))
                jobs.append(self._save_state_loop())
            for feed in self.feeds.values():
                jobs += [self._ws_loop(feed, sub) for sub in feed.subscriptions(symbols, types)]
                jobs += [self._poll_loop(feed, poll.path, poll.interval_s) for poll in feed.polls(symbols, types)]
                jobs.append(instruments.keep_fresh(feed, symbols, self._get_recorded, self._sleep, self.stopping))
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
        if self.overflow.dropped and self._room():
            await self._publish_gaps(self.overflow.gaps())
        for rec in recs:
            dt = records.data_type(rec)
            if dt != "gap" and not self._room():
                self.overflow.drop(rec, dt)  # bounded: the backlog is at its limit; recorded as a gap later
                metrics.DROPPED.labels(exchange=rec.exchange, data_type=dt).inc()
                continue
            if dt == "gap":
                await self._publish_gaps([rec])
                continue
            self.coverage.seen(dt, rec.exchange, rec.market_type)
            metrics.TALLY.published(rec.exchange, dt, rec.received_at, rec.timestamp)
            token = self.state.token(rec, dt) if self.state else None
            await self.publish(records.subject(rec), records.encode(rec), records.dedup_key(rec), token)

    def _room(self) -> bool:
        return self.has_room is None or self.has_room()

    async def _publish_gaps(self, gaps: list[records.Record]) -> None:
        for gap in gaps:
            metrics.count_gap(gap.exchange, gap.market_type, gap.stream_type, gap.reason)
            metrics.TALLY.published(gap.exchange, "gap")
            logger.warning("gap {} {} {} {}: {} [{}..{}]", gap.exchange, gap.market_type, gap.symbol,
                           gap.stream_type, gap.reason, gap.from_sequence, gap.to_sequence)
            token = self.state.gap_token(gap) if self.state else None
            await self.publish(records.subject(gap), records.encode(gap), records.dedup_key(gap), token)

    async def _save_state_loop(self) -> None:
        while not self.stopping.is_set():
            await self._sleep(1.0)
            self.state.save()
        self.state.save()

    async def _handle(self, feed: Feed, data, source: str, link: Link | None = None) -> list[str]:
        received = now_ms()
        metrics.TALLY.frame(feed.name)
        if self.recorder:
            self.recorder.write(feed.name, received, source, data)
        feed.control_frame = False
        recs = feed.on_message(data, source, received)
        if link is not None and not feed.control_frame:
            closed = link.saw(recs, received)
            if closed:
                recs = recs + closed
        await self.emit(feed, recs)
        if feed.errors.changes != self._error_changes.get(feed.name):
            self._error_changes[feed.name] = feed.errors.changes
            self._count_errors(feed)
        for path in feed.take_requests():
            self._spawn(self._fetch_until_done(feed, path))
        return feed.take_outgoing()

    def _count_errors(self, feed: Feed) -> None:
        """The feed's error counts changed since the last call: report the increments and log the totals."""
        for reason, n in feed.errors.items():
            # increments, not the feed's totals: the counter is process-wide, the feed is not
            counted = self._reported_errors.get((feed.name, reason), 0)
            if n > counted:
                metrics.PARSE_ERRORS.labels(feed=feed.name, reason=reason).inc(n - counted)
                self._reported_errors[(feed.name, reason)] = n
        logger.warning("{}: {} unparseable frames so far ({})", feed.name, sum(feed.errors.values()),
                       dict(feed.errors))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- WebSocket ---------------------------------------------------------------------------------
    async def _ws_loop(self, feed: Feed, sub: Subscription) -> None:
        url = self.settings.ws_url(feed.name) + sub.path
        link = Link(feed)
        attempt = 0
        while not self.stopping.is_set():
            opened = time.monotonic()
            reason = "disconnect"
            try:
                reason = await self._session_once(feed, sub, url, link)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                logger.warning("{}: connection to {} failed: {}", feed.name, url, e or type(e).__name__)
            finally:
                self.connected.pop(id(link), None)
                # Continuity ends here whether we chose to stop or the peer dropped us: both are gaps.
                at = now_ms()
                book_gaps = feed.on_disconnect(at)
                if reason == "stale":
                    book_gaps = [msgspec.structs.replace(g, reason="stale") for g in book_gaps]
                await self.emit(feed, book_gaps)
                link.lose(reason, at)
            if self.stopping.is_set():
                break
            attempt = 0 if time.monotonic() - opened > 60 else attempt + 1
            delay = min(self.settings.reconnect_max_s, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)
            metrics.RECONNECTS.labels(feed=feed.name).inc()
            await self._sleep(delay)
        await self.emit(feed, link.close(now_ms()))  # the streams' gaps end with the collector

    async def _session_once(self, feed: Feed, sub: Subscription, url: str, link: Link) -> str:
        """One connection, until it is stale, dropped, too old or the collector stops; returns why."""
        async with self._session.ws_connect(url, autoping=True, max_msg_size=0, compress=0) as ws:
            logger.info("{}: connected {}", feed.name, url)
            self.connected[id(link)] = now_ms()
            pacer = Pacer(feed.sends_per_s)
            await pacer.send(ws, sub.messages)
            pinger = asyncio.create_task(self._ping(ws, feed)) if feed.ping_frame else None
            ended: list[str] = []  # why the watchdog closed the connection
            watchdog = asyncio.create_task(self._watch(ws, feed, url, link, ended))
            try:
                while True:
                    # No timeout per receive (aiohttp's timeout context costs as much as reading the frame):
                    # the watchdog closes the socket on a stop, staleness or age, which ends the receive.
                    msg = await ws.receive()
                    if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                        await pacer.send(ws, await self._handle(feed, msg.data, url, link))
                        continue
                    if ended:
                        return ended[0]
                    logger.warning("{}: socket closed by peer ({})", feed.name, msg.extra or msg.type.name)
                    return "disconnect"
            finally:
                watchdog.cancel()
                if pinger:
                    pinger.cancel()

    async def _watch(self, ws, feed: Feed, url: str, link: Link, ended: list[str]) -> None:
        """Checks once a second whether the connection should end; if so says why in `ended` and closes it."""
        idle_s = feed.idle_timeout_s or self.settings.idle_timeout_s
        max_age = feed.max_connection_age_s
        opened = time.monotonic()
        while True:
            await self._sleep(min(1.0, max_age or 1.0))
            now = time.monotonic()
            if self.stopping.is_set():
                ended.append("disconnect")
            elif max_age is not None and now - opened >= max_age:
                logger.info("{}: {} open for {}s, reconnecting before the venue drops it", feed.name, url, max_age)
                ended.append("disconnect")
            elif now - max(link.last_data, opened) > idle_s:
                logger.warning("{}: no market data for {}s on {}, reconnecting", feed.name, idle_s, url)
                ended.append("stale")
            else:
                continue
            await ws.close()
            return

    async def _ping(self, ws, feed: Feed) -> None:
        while not ws.closed:
            await asyncio.sleep(feed.ping_interval_s)
            await ws.send_str(feed.ping_frame)

    # -- instruments ---------------------------------------------------------------------------------
    async def _first_instruments(self, feed: Feed) -> None:
        try:
            await asyncio.wait_for(instruments.load(feed, self.settings.symbols, self._get_recorded),
                                   self.settings.connect_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("{}: no instrument list within {}s; naming symbols by rule until it arrives",
                           feed.name, self.settings.connect_timeout_s)

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
        body = await self.get(feed, path)
        if body is None:
            return False
        await self._handle(feed, body, path)
        return True

    async def get(self, feed: Feed, path: str, record: bool = False) -> bytes | None:
        """GET a REST path of the feed within its venue's budget; the body on HTTP 200, else None."""
        venue = self.budgets.venue(feed.name)
        while (wait := venue.reserve(path)) > 0:
            if self.stopping.is_set():
                return None
            await self._sleep(min(wait, 1.0))  # the venue's state may change meanwhile (a new pause, a stop)
        url = self.settings.rest_url(feed.name) + path
        try:
            async with self._session.get(url) as resp:
                body = await resp.read()
                metrics.REST.labels(feed=feed.name, status=str(resp.status)).inc()
                if resp.status == 200:
                    self._unblock(venue)
                    if record and self.recorder:  # bodies not passed through _handle (instrument lists)
                        self.recorder.write(feed.name, now_ms(), path, body)
                    return body
                self._refused(feed, venue, resp.status, resp.headers.get("Retry-After"), path)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            metrics.REST.labels(feed=feed.name, status="error").inc()
            logger.warning("{}: GET {} failed: {}", feed.name, path, e or type(e).__name__)
        return None

    async def _get_recorded(self, feed: Feed, path: str) -> bytes | None:
        """get() for bodies the feed reads outside _handle: replay needs them in the recording too."""
        return await self.get(feed, path, record=True)

    def _refused(self, feed: Feed, venue: Venue, status: int, retry_after: str | None, path: str) -> None:
        """A non-200 answer: rate limits and blocks hold back every request to the venue, not only this one."""
        if status in RATE_LIMITED_STATUSES:
            wait = seconds(retry_after, 5.0)
            venue.pause(wait)
            metrics.RATE_LIMIT_WAITS.labels(feed=feed.name).inc()
            logger.warning("{}: rate limited (HTTP {}) on {}; every {} request waits {}s", feed.name, status,
                           path, venue.name, wait)
        elif status in BLOCKED_STATUSES:
            venue.pause(venue.blocked_pause_s)
            if feed.name not in self.blocked:
                logger.error("{}: blocked by the exchange (HTTP {} on {}): this location (or IP) cannot use {}; "
                             "asking again every {}s", feed.name, status, path, self.settings.rest_url(feed.name),
                             venue.blocked_pause_s)
            self.blocked[feed.name] = f"HTTP {status} on {path}"
        else:
            logger.warning("{}: GET {} answered HTTP {}", feed.name, path, status)

    def _unblock(self, venue: Venue) -> None:
        for name in self.budgets.feeds_of(venue.name):
            if self.blocked.pop(name, None) is not None:
                logger.info("{}: the exchange answers again; no longer blocked", name)

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
        paused = {v.name: round(v.paused_for(), 1) for v in self.budgets.venues.values() if v.paused_for() > 0}
        return {"coverage": self.coverage.report(), "blocked": dict(self.blocked), "rest_paused_s": paused,
                "connections": len(self.connected),
                "parse_errors": {n: dict(f.errors) for n, f in self.feeds.items() if f.errors}}


def seconds(header: str | None, default: float) -> float:
    """A Retry-After in seconds (the venues send delta-seconds); the default when absent or unreadable."""
    try:
        return max(0.0, float(header)) if header else default
    except ValueError:
        return default
