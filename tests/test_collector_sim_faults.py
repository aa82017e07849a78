"""Every fault the simulator can inject, against the real collector, nats-server, storage-hot and chDB:
the rows and gap records in the store (and the collector's health and metrics) show that each one is
handled — reconnect, gap record, book resync, Retry-After honoured, geo-block reported. Each test runs
every venue it can at once, so one session covers the fault on all of them."""

from __future__ import annotations

import time

import aiohttp
import pytest_asyncio

from conftest import wait_for
from marketprism.ops import metrics
from marketprism.settings import FEEDS
from marketprism.sim import Simulator, make_options
from test_collector_sim_support import FEED_MARKETS, counters, feed_of, gaps, instruments, metric, now_ms, pipeline, \
    sim_settings, stored_after

BOOKS = 14  # instruments with a book: 2 symbols x (binance spot, usdm, okx spot, swap, deribit, bybit spot, linear)
FAST = {"reconnect_max_s": 0.5, "connect_timeout_s": 2.0}


def log_rest(sim: Simulator) -> list[tuple[float, str, str, int]]:
    """Wrap every REST route of the simulator: (monotonic time it arrived, feed, path with query, status)."""
    log: list[tuple[float, str, str, int]] = []
    for name, feed in sim.feeds.items():
        def rest(fn, name=name, original=feed.rest):
            handler = original(fn)

            async def logged(request):
                arrived = time.monotonic()
                resp = await handler(request)
                log.append((arrived, name, request.path_qs, resp.status))
                return resp
            return logged
        feed.rest = rest
    return log


@pytest_asyncio.fixture
async def sim():
    simulator = Simulator(make_options(port=0, rate=40, speed=20, seed=3))
    simulator.rest_log = log_rest(simulator)
    await simulator.start()
    yield simulator
    await simulator.stop()


def by_feed(rows: list[dict], reasons=None, stream_type: str | None = None) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {f: [] for f in FEEDS}
    for g in rows:
        if (reasons is None or g["reason"] in reasons) and (stream_type is None or g["stream_type"] == stream_type):
            out[feed_of(g["exchange"], g["market_type"])].append(g)
    return out


async def books_live(store) -> bool:
    return await wait_for(lambda: len(instruments(store)) == BOOKS, 15)


async def resynced_after_gap(store, wanted: dict[str, list[dict]]) -> bool:
    """Every feed has its gap, and the book of that gap's instrument stored again after it."""
    def done():
        if not all(wanted.values()):
            return False
        return all((g["exchange"], g["market_type"], g["symbol"]) in stored_after(store, g["ts"])
                   for rows in wanted.values() for g in rows)
    return await wait_for(done, 15)


# -- sequence breaks ---------------------------------------------------------------------------------------

async def test_skipped_book_message_gives_one_sequence_gap_and_a_resync_per_venue(nats_server, store, sim):
    settings = sim_settings(sim.url, nats_server.url, data_types=("orderbook",), **FAST)
    async with pipeline(settings, store) as s:
        assert await books_live(store)
        t = now_ms()
        sim.inject([{"type": "skip_sequence", "feed": f} for f in FEEDS])
        seq = {}

        def found():
            seq.update(by_feed(gaps(store, t), {"sequence"}))
            return all(seq.values())
        assert await wait_for(found, 10), {f: len(v) for f, v in seq.items()}
        assert await resynced_after_gap(store, seq)
        stopped = now_ms()
    after = [g for g in gaps(store, t) if g["ts"] < stopped]
    # one break per venue, nothing else: the skip is the only lost message
    assert sorted(feed_of(g["exchange"], g["market_type"]) for g in after) == sorted(FEEDS), after
    for g in after:
        assert (g["stream_type"], g["reason"]) == ("orderbook", "sequence")
        assert g["from_sequence"] is not None, g
    assert {f: sim.stats()["feeds"][f]["faults"] for f in FEEDS} == {f: {"skip_sequence": 1} for f in FEEDS}
    assert not any(s.collector.feeds[f].errors for f in FEEDS)


async def test_truncated_frames_are_counted_and_their_loss_is_a_gap(nats_server, store, sim):
    settings = sim_settings(sim.url, nats_server.url, data_types=("trade", "orderbook"), **FAST)
    async with pipeline(settings, store) as s:
        assert await books_live(store)
        t = now_ms()
        sim.inject([{"type": "truncated", "feed": f, "data_type": "orderbook"} for f in FEEDS]
                   + [{"type": "truncated", "feed": "binance_spot", "data_type": "trade"}])
        book_gaps, trade_gaps = {}, {}

        def found():
            book_gaps.update(by_feed(gaps(store, t), {"sequence"}, "orderbook"))
            trade_gaps.update(by_feed(gaps(store, t), {"sequence"}, "trade"))
            return all(book_gaps.values()) and trade_gaps["binance_spot"]
        assert await wait_for(found, 10), ({f: len(v) for f, v in book_gaps.items()}, trade_gaps)
        assert await resynced_after_gap(store, book_gaps)
        errors = {f: sum(s.collector.feeds[f].errors.values()) for f in FEEDS}
    assert errors == {f: 2 if f == "binance_spot" else 1 for f in FEEDS}
    # Binance spot trade ids are consecutive: the cut trade frame is a trade gap naming exactly the lost id
    (trade_gap,) = trade_gaps["binance_spot"]
    assert trade_gap["from_sequence"] == trade_gap["to_sequence"] is not None, trade_gap


async def test_malformed_frames_are_counted_and_every_stream_goes_on(nats_server, store, sim):
    settings = sim_settings(sim.url, nats_server.url, data_types=("trade", "orderbook"), **FAST)
    async with pipeline(settings, store) as s:
        assert await books_live(store)
        t = now_ms()
        sim.inject([{"type": "malformed", "feed": f, "count": 2} for f in FEEDS])
        assert await wait_for(lambda: len(stored_after(store, t + 300)) == BOOKS, 10)
        # every socket's two bad frames: a busy machine may deliver some after the books went on
        expected = {f: 2 * n_connections(s, f) for f in FEEDS}
        await wait_for(lambda: {f: sum(s.collector.feeds[f].errors.values()) for f in FEEDS} == expected, 10)
        errors = {f: dict(s.collector.feeds[f].errors) for f in FEEDS}
        stopped = now_ms()
        parse_errors = {f: sum(metric(metrics.PARSE_ERRORS, feed=f, reason=r) for r in errors[f]) for f in FEEDS}
    assert {f: sum(e.values()) for f, e in errors.items()} == expected
    assert parse_errors == {f: sum(e.values()) for f, e in errors.items()}
    assert [g for g in gaps(store, t) if g["ts"] < stopped] == []


def n_connections(session, feed: str) -> int:
    """Sockets of a feed (malformed frames go to every one)."""
    settings = session.collector.settings
    return len(session.collector.feeds[feed].subscriptions(settings.symbols, settings.data_types))


# -- lost connections ------------------------------------------------------------------------------------

async def dropped(nats_server, store, sim):
    """Drop every feed's sockets (close for half of them, TCP reset for the rest); wait for the data to
    come back. A witness socket keeps Binance spot trading meanwhile, as the real venue does (the simulator
    pauses a feed nobody listens to), so trades are really lost there. Returns (time of the drop, stop
    time, reconnects per feed, trade streams seen before)."""
    settings = sim_settings(sim.url, nats_server.url, data_types=("trade", "orderbook"), **FAST)
    before = counters(metrics.RECONNECTS)
    async with pipeline(settings, store), aiohttp.ClientSession() as http:
        assert await books_live(store)
        trades = instruments(store, "trades")
        t = now_ms()
        sim.inject([{"type": "drop", "feed": f, "mode": "close" if i % 2 else "abort"} for i, f in enumerate(FEEDS)])
        async with http.ws_connect(sim.url.replace("http", "ws") + "/binance_spot/stream?streams="
                                   "btcusdt@trade/ethusdt@trade"):
            assert await wait_for(lambda: len(stored_after(store, t + 200)) == BOOKS, 15)
        reconnects = {f: n - before[f] for f, n in counters(metrics.RECONNECTS).items()}
        stopped = now_ms()
    return t, stopped, reconnects, trades


def trade_streams_without_gap(store, trades: set, window: list[dict]) -> set:
    """Trade streams whose lost continuity is not in a gap record. Binance spot trade ids are consecutive,
    so there the truth is known: every id missing from the stored trades must lie in a `sequence` gap, and
    a stream that lost nothing needs none. Elsewhere nothing tells what was lost: a gap is required."""
    gapped = {(g["exchange"], g["market_type"], g["symbol"]) for g in window if g["stream_type"] == "trade"}
    missing = set()
    for stream in trades:
        if stream[:2] != ("binance", "spot"):
            if stream not in gapped:
                missing.add(stream)
            continue
        ids = sorted(int(r[0]) for r in store.query(
            "SELECT trade_id FROM marketprism_hot.trades FINAL WHERE exchange = 'binance' AND market_type = 'spot' "
            f"AND symbol = '{stream[2]}'").result_rows)
        covered = [(g["from_sequence"], g["to_sequence"]) for g in window if g["stream_type"] == "trade"
                   and g["reason"] == "sequence" and (g["exchange"], g["market_type"], g["symbol"]) == stream]
        for lo, hi in [(a + 1, b - 1) for a, b in zip(ids, ids[1:]) if b > a + 1]:
            if not any(f is not None and f <= lo and (to is None or to >= hi) for f, to in covered):
                missing.add(stream)
    return missing


async def test_dropped_connections_reconnect_record_gaps_and_resync_the_books(nats_server, store, sim):
    t, stopped, reconnects, trades = await dropped(nats_server, store, sim)
    assert all(n >= 1 for n in reconnects.values()), reconnects
    window = [g for g in gaps(store, t) if g["ts"] < stopped]
    book_gaps = [g for g in window if g["stream_type"] == "orderbook"]
    assert {(g["exchange"], g["market_type"], g["symbol"]) for g in book_gaps} == instruments(store)
    for g in book_gaps:  # each book came back after its own gap: resynced, not continued across it
        assert (g["exchange"], g["market_type"], g["symbol"]) in stored_after(store, g["ts"]), g
    assert trade_streams_without_gap(store, trades, window) == set()
    assert any(g["reason"] == "sequence" and g["exchange"] == "binance" for g in window)  # the witness's trades
    assert {g["reason"] for g in window} <= {"disconnect", "sequence"}


# -- stale streams -----------------------------------------------------------------------------------------

async def went_stale(nats_server, store, sim, feeds=FEEDS, ping_s: float | None = None):
    """Stop all market data for 3 s with the idle watchdog at 1 s; wait for the books to come back.
    ping_s shortens the feeds' keep-alive pings so that they are answered while the data is stale, as
    OKX's and Bybit's 20 s pings are within the default 30 s idle timeout."""
    settings = sim_settings(sim.url, nats_server.url, feeds=feeds, data_types=("trade", "orderbook"),
                            idle_timeout_s=1.0, **FAST)
    before = counters(metrics.RECONNECTS, feeds)
    async with pipeline(settings, store) as s:
        if ping_s:
            for feed in s.collector.feeds.values():
                if feed.ping_frame:
                    feed.ping_interval_s = ping_s
        n_streams = sum(2 * len(FEED_MARKETS[f][1]) for f in feeds if f != "deribit") + 2 * ("deribit" in feeds)
        assert await wait_for(lambda: len(instruments(store)) == n_streams, 15)
        trades = instruments(store, "trades")
        t = now_ms()
        sim.inject([{"type": "stale", "feed": f, "seconds": 3} for f in feeds])
        assert await wait_for(lambda: len(stored_after(store, t + 3000)) == n_streams, 15)
        reconnects = {f: n - before[f] for f, n in counters(metrics.RECONNECTS, feeds).items()}
        stopped = now_ms()
    window = [g for g in gaps(store, t) if g["ts"] < stopped]
    return reconnects, window, trades


async def test_stale_streams_are_noticed_by_the_idle_watchdog_recorded_as_gaps_and_books_resync(nats_server, store,
                                                                                                sim):
    reconnects, window, trades = await went_stale(nats_server, store, sim)
    assert all(n >= 1 for n in reconnects.values()), reconnects
    books = {(g["exchange"], g["market_type"], g["symbol"]) for g in window if g["stream_type"] == "orderbook"}
    assert books == instruments(store)
    assert trade_streams_without_gap(store, trades, window) == set()
    assert {g["reason"] for g in window} <= {"stale", "disconnect", "sequence"}


async def test_stale_streams_are_noticed_although_pings_are_answered(nats_server, store, sim):
    feeds = ("okx", "bybit_spot", "bybit_linear")
    reconnects, window, _ = await went_stale(nats_server, store, sim, feeds=feeds, ping_s=0.3)
    assert all(n >= 1 for n in reconnects.values()), reconnects
    assert {(g["exchange"], g["market_type"]) for g in window} == {("okx", "spot"), ("okx", "perpetual"),
                                                                  ("bybit", "spot"), ("bybit", "perpetual")}


# -- REST: rate limits, geo-blocks, slow snapshots ------------------------------------------------------------

async def test_retry_after_is_honoured_before_the_same_request_is_sent_again(nats_server, store, sim):
    sim.inject({"type": "rest_status", "feed": "binance_usdm", "status": 429, "retry_after": 2, "count": 1,
                "path": "/fapi/v1/depth"})
    settings = sim_settings(sim.url, nats_server.url, feeds=("binance_usdm",), data_types=("orderbook",), **FAST)
    waits = metric(metrics.RATE_LIMIT_WAITS, feed="binance_usdm")
    async with pipeline(settings, store):
        assert await wait_for(lambda: len(instruments(store)) == 2, 15)
    depth = [(at, path, status) for at, feed, path, status in sim.rest_log if "/fapi/v1/depth" in path]
    limited = [(at, path) for at, path, status in depth if status == 429]
    assert len(limited) == 1
    at, path = limited[0]
    retry = [a for a, p, status in depth if p == path and a > at]
    assert retry and retry[0] - at >= 2.0 - 0.05, (retry[:1], at)
    assert metric(metrics.RATE_LIMIT_WAITS, feed="binance_usdm") == waits + 1


async def test_retry_after_pauses_every_request_to_the_venue(nats_server, store, sim):
    sim.inject({"type": "rest_status", "feed": "binance_usdm", "status": 429, "retry_after": 2, "count": 1})
    settings = sim_settings(sim.url, nats_server.url, feeds=("binance_usdm",), **FAST)
    async with pipeline(settings, store):
        assert await wait_for(lambda: any(s == 429 for *_, s in sim.rest_log)
                              and time.monotonic() - next(a for a, *_, s in sim.rest_log if s == 429) > 2.5, 10)
    at = next(a for a, *_, s in sim.rest_log if s == 429)
    # requests already on their way when the 429 was answered are excused (50 ms)
    assert [p for a, _, p, _ in sim.rest_log if at + 0.05 < a < at + 2.0 - 0.05] == []


async def test_geo_block_is_reported_in_health_while_the_websocket_data_goes_on(nats_server, store, sim):
    sim.inject([{"type": "rest_status", "feed": "binance_usdm", "status": 451, "count": 1000},
                {"type": "rest_status", "feed": "bybit_linear", "status": 403, "count": 1000}])
    feeds = ("binance_usdm", "bybit_linear")
    # Bybit's REST carries only the account ratio (open interest and books come over the WebSocket)
    types = ("trade", "orderbook", "open_interest", "lsr_all_account")
    settings = sim_settings(sim.url, nats_server.url, feeds=feeds, data_types=types, **FAST)
    async with pipeline(settings, store) as s:
        assert await wait_for(lambda: set(s.collector.blocked) == set(feeds), 10), s.collector.blocked
        assert await wait_for(lambda: {ex for ex, _, _ in instruments(store, "trades")} == {"binance", "bybit"}, 10)
        health = s.collector.health()
    assert health["blocked"]["binance_usdm"].startswith("HTTP 451")
    assert health["blocked"]["bybit_linear"].startswith("HTTP 403")
    assert metric(metrics.REST, feed="binance_usdm", status="451") >= 1


async def test_slow_snapshot_still_syncs_the_book_without_a_gap(nats_server, store, sim):
    sim.inject({"type": "rest_delay", "feed": "binance_spot", "seconds": 1.5, "count": 2, "path": "/api/v3/depth"})
    settings = sim_settings(sim.url, nats_server.url, feeds=("binance_spot",), data_types=("orderbook",), **FAST)
    async with pipeline(settings, store):
        assert await wait_for(lambda: len(instruments(store)) == 2, 15)
        stopped = now_ms()
    assert [g for g in gaps(store) if g["ts"] < stopped] == []
    assert sim.stats()["feeds"]["binance_spot"]["faults"] == {"rest_delay": 2}
