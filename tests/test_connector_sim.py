"""The connection loop and REST path against the simulator (records collected in memory, no bus): venue
heartbeats, the forced reconnect before Binance's 24 h limit, stale connections, the REST budget's
Retry-After and block handling, and instrument metadata loaded from each venue's instrument endpoint."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from loguru import logger

from conftest import wait_for
from marketprism import records
from marketprism.collector import instruments
from marketprism.collector.service import Collector
from marketprism.ops import metrics
from marketprism.settings import FEEDS, load
from marketprism.sim import start

FAST = {"reconnect_max_s": 0.2, "connect_timeout_s": 5.0}


def settings_for(url: str, feeds, **overrides):
    env = {"MARKETPRISM_FEEDS": ",".join(feeds), "MARKETPRISM_SYMBOLS": "BTC-USDT"}
    for feed in feeds:
        env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = url.replace("http://", "ws://") + f"/{feed}"
        env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"{url}/{feed}"
    return load(environ=env, **{**FAST, **overrides})


class Frames:
    """A recorder: every WS frame and REST body the collector receives, as text."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, str, str]] = []

    def write(self, feed: str, received_at: int, source: str, data) -> None:
        self.frames.append((feed, source, data if isinstance(data, str) else data.decode()))

    def count(self, *parts: str) -> int:
        return sum(all(p in text for p in parts) for _, _, text in self.frames)


@asynccontextmanager
async def running(settings, prepare=None):
    """A collector publishing into a list; `prepare(collector)` runs before its connections open."""
    published: list[records.Record] = []

    async def publish(subject, payload, msg_id, token=None):
        published.append(records.decode(payload))

    frames = Frames()
    collector = Collector(settings, publish, frames)
    if prepare:
        prepare(collector)
    task = asyncio.create_task(collector.run())
    try:
        yield collector, published, frames
    finally:
        collector.stop()
        await asyncio.wait_for(task, 10)


def reconnects(feed: str) -> float:
    return metrics.RECONNECTS.labels(feed=feed)._value.get()


def of(published, dt: str) -> list:
    return [r for r in published if records.data_type(r) == dt]


@pytest_asyncio.fixture
async def sim():
    simulator = await start(port=0, symbols="BTC-USDT", rate=40, speed=100, seed=7)
    yield simulator
    await simulator.stop()


# -- heartbeats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("feed, answer", [("okx", ("pong",)), ("bybit_spot", ('"op":"ping"', '"ret_msg":"pong"')),
                                          ("bybit_linear", ('"op":"ping"', '"ret_msg":"pong"'))])
async def test_keepalive_pings_are_sent_and_answered(sim, feed, answer):
    def fast_pings(c):
        c.feeds[feed].ping_interval_s = 0.2
    before = reconnects(feed)
    async with running(settings_for(sim.url, (feed,), data_types=("trade",)), fast_pings) as (c, published, frames):
        assert await wait_for(lambda: frames.count(*answer) >= 4, 5), frames.frames[-3:]
        assert len(c.connected) == 1
    assert reconnects(feed) == before
    assert of(published, "trade")


async def test_deribit_heartbeat_test_requests_are_answered(sim):
    # speed 100: the simulator sends test_request every 30 s / 100 and closes a socket that left one unanswered
    before = reconnects("deribit")
    async with running(settings_for(sim.url, ("deribit",), data_types=("trade",))) as (c, published, frames):
        assert await wait_for(lambda: frames.count('"type":"test_request"') >= 5, 5)
        assert sim.stats()["feeds"]["deribit"]["connections"] == 1
        assert frames.count('"result":{"version"') >= 4  # the answers to our public/test
    assert reconnects("deribit") == before
    sub = c.feeds["deribit"].subscriptions(("BTC-USDT",), ("trade",))[0]
    assert '"method":"public/set_heartbeat","params":{"interval":30}' in sub.messages[0]


async def test_binance_server_pings_are_answered_with_their_payload():
    """Binance pings every connection ("When you receive a ping, you must send a pong with a copy of ping's
    payload"); aiohttp's autoping answers. The simulator does not ping, so a small server does."""
    pongs: asyncio.Queue = asyncio.Queue()

    async def stream(request):
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.ping(b"binance-ping")
        await pongs.put(await ws.receive(timeout=5))
        await asyncio.sleep(3)
        return ws

    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    settings = load(environ={"MARKETPRISM_FEEDS": "binance_spot", "MARKETPRISM_SYMBOLS": "BTC-USDT",
                             "MARKETPRISM_BINANCE_SPOT_WS_URL": url.replace("http", "ws"),
                             "MARKETPRISM_BINANCE_SPOT_REST_URL": url}, data_types=("trade",), **FAST)
    try:
        async with running(settings):
            pong = await asyncio.wait_for(pongs.get(), 5)
    finally:
        await runner.cleanup()
    assert (pong.type, pong.data) == (aiohttp.WSMsgType.PONG, b"binance-ping")


# -- connection age, stale connections ----------------------------------------------------------------------
async def test_binance_connection_is_renewed_before_its_age_limit_and_the_book_resyncs(sim):
    def short_lived(c):
        c.feeds["binance_spot"].max_connection_age_s = 1.0
    before = reconnects("binance_spot")
    settings = settings_for(sim.url, ("binance_spot",), data_types=("trade", "orderbook"), book_interval_ms=0)
    async with running(settings, short_lived) as (c, published, _):
        assert await wait_for(lambda: reconnects("binance_spot") - before >= 2, 6)
        renewed = len(of(published, "orderbook"))
        assert await wait_for(lambda: len(of(published, "orderbook")) > renewed, 5)
    gaps = [(g.stream_type, g.reason) for g in of(published, "gap")]
    assert gaps.count(("orderbook", "disconnect")) >= 3  # two renewals and the stop
    assert ("trade", "disconnect") not in gaps  # trade ids continue across the renewal: nothing to report
    assert sim.stats()["feeds"]["binance_spot"]["served"]["orderbook"] >= 3  # one REST snapshot per connection


async def test_a_stale_connection_is_renewed_and_every_stream_on_it_gets_a_gap(sim):
    def fast_pings(c):
        c.feeds["okx"].ping_interval_s = 0.2  # pongs keep coming while the data is stale
    settings = settings_for(sim.url, ("okx",), data_types=("trade", "orderbook"), idle_timeout_s=0.6)
    async with running(settings, fast_pings) as (c, published, frames):
        assert await wait_for(lambda: {r.market_type for r in of(published, "trade")} == {"spot", "perpetual"}, 5)
        last_trade = max(r.received_at for r in of(published, "trade"))
        sim.inject({"type": "stale", "feed": "okx", "seconds": 2})
        silent_from = time.time_ns() // 1_000_000
        assert await wait_for(lambda: any(r.received_at > silent_from + 2000 for r in of(published, "trade")), 8)
    stale = [g for g in of(published, "gap") if g.reason == "stale"]
    assert {(g.market_type, g.stream_type) for g in stale} >= {("spot", "trade"), ("perpetual", "trade"),
                                                               ("spot", "orderbook"), ("perpetual", "orderbook")}
    first = min((g for g in stale if g.stream_type == "trade"), key=lambda g: g.started_at)
    assert last_trade - 1000 <= first.started_at <= silent_from + 200  # from the last data before the silence
    assert all(g.started_at <= g.ended_at for g in stale)
    assert frames.count("pong") >= 5


# -- REST: one budget per venue --------------------------------------------------------------------------
def rest_requests(sim, feed: str) -> int:
    return sim.stats()["feeds"][feed]["rest_requests"]


@asynccontextmanager
async def rest_only(sim, feeds):
    collector = Collector(settings_for(sim.url, feeds), publish=None)
    async with aiohttp.ClientSession() as collector._session:
        yield collector


async def test_retry_after_pauses_every_request_of_the_venue(sim):
    sim.inject({"type": "rest_status", "feed": "binance_usdm", "status": 429, "retry_after": 2, "count": 1})
    async with rest_only(sim, ("binance_usdm",)) as c:
        feed = c.feeds["binance_usdm"]
        assert await c.get(feed, "/fapi/v1/openInterest?symbol=BTCUSDT") is None
        limited_at, sent = time.monotonic(), rest_requests(sim, "binance_usdm")

        async def timed(path):
            body = await c.get(feed, path)
            return body, time.monotonic() - limited_at
        paths = ("/fapi/v1/openInterest?symbol=BTCUSDT", "/fapi/v1/depth?symbol=BTCUSDT&limit=1000",
                 "/futures/data/globalLongShortAccountRatio?symbol=BTCUSDT&period=5m&limit=30")
        tasks = [asyncio.create_task(timed(p)) for p in paths]
        await asyncio.sleep(1.5)
        assert rest_requests(sim, "binance_usdm") == sent  # nothing reached the venue during Retry-After
        done = await asyncio.gather(*tasks)
        assert c.health()["rest_paused_s"] == {}
    assert all(body is not None and waited >= 1.9 for body, waited in done), [w for _, w in done]


async def test_geo_block_is_reported_once_and_not_retried_in_a_loop(sim):
    sim.inject({"type": "rest_status", "feed": "binance_spot", "status": 451, "count": 2})
    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m.record["message"]), level="ERROR")
    try:
        async with rest_only(sim, ("binance_spot",)) as c:
            feed = c.feeds["binance_spot"]
            venue = c.budgets.venue("binance_spot")
            assert await c.get(feed, "/api/v3/depth?symbol=BTCUSDT&limit=1000") is None
            assert c.health()["blocked"] == {"binance_spot": "HTTP 451 on /api/v3/depth?symbol=BTCUSDT&limit=1000"}
            assert c.health()["rest_paused_s"]["binance_spot"] > 290  # asked again only after 300 s
            venue.paused_until = 0  # as if the 300 s had passed: asked once more, still blocked
            assert await c.get(feed, "/api/v3/exchangeInfo?symbol=BTCUSDT") is None
            assert "binance_spot" in c.blocked and rest_requests(sim, "binance_spot") == 2
            waiting = [asyncio.create_task(c.get(feed, "/api/v3/exchangeInfo?symbol=BTCUSDT")) for _ in range(3)]
            await asyncio.sleep(0.5)
            assert rest_requests(sim, "binance_spot") == 2 and not any(t.done() for t in waiting)  # no hot loop
            venue.paused_until = 0  # the next 300 s are over and the location is served again
            assert all(await asyncio.wait_for(asyncio.gather(*waiting), 3))
            assert c.blocked == {}
    finally:
        logger.remove(sink)
    assert len([m for m in errors if "blocked by the exchange (HTTP 451" in m]) == 1


async def test_bybit_403_holds_both_bybit_feeds_for_ten_minutes(sim):
    sim.inject({"type": "rest_status", "feed": "bybit_linear", "status": 403, "count": 1})
    async with rest_only(sim, ("bybit_spot", "bybit_linear")) as c:
        assert await c.get(c.feeds["bybit_linear"], "/v5/market/instruments-info?category=linear&symbol=BTCUSDT") is None
        assert c.health()["rest_paused_s"] == {"bybit": pytest.approx(600, abs=5)}
        spot = asyncio.create_task(c.get(c.feeds["bybit_spot"], "/v5/market/instruments-info?category=spot&symbol=BTCUSDT"))
        await asyncio.sleep(0.3)
        assert not spot.done() and rest_requests(sim, "bybit_spot") == 0
        c.stop()
        assert await asyncio.wait_for(spot, 2) is None  # a stop is not held up by the pause


# -- instrument metadata ------------------------------------------------------------------------------------
async def test_instrument_lists_load_from_every_venue(sim):
    async with rest_only(sim, FEEDS) as c:
        for name, feed in c.feeds.items():
            assert await instruments.load(feed, ("BTC-USDT",), c.get), name
    info = {name: feed.instrument_info for name, feed in c.feeds.items()}
    assert info["binance_spot"]["BTCUSDT"].symbol == "BTC-USDT"
    assert info["binance_usdm"]["BTCUSDT"].symbol == "BTC-USDT"
    assert info["bybit_spot"]["BTCUSDT"].symbol == info["bybit_linear"]["BTCUSDT"].symbol == "BTC-USDT"
    swap = info["okx"]["BTC-USDT-SWAP"]
    assert (swap.symbol, swap.contract_value, swap.inverse) == ("BTC-USDT", "0.01", False)
    assert info["okx"]["BTC-USDT"].contract_value is None
    perp = info["deribit"]["BTC-PERPETUAL"]
    assert perp.symbol == "BTC-USD" and perp.inverse and perp.contract_value is not None


async def test_the_collector_loads_metadata_before_it_connects(sim):
    async with running(settings_for(sim.url, ("okx", "bybit_linear"), data_types=("trade",))) as (c, published, _):
        assert await wait_for(lambda: {r.exchange for r in of(published, "trade")} == {"okx", "bybit"}, 5)
        assert set(c.feeds["okx"].instrument_info) == {"BTC-USDT", "BTC-USDT-SWAP"}
        assert set(c.feeds["bybit_linear"].instrument_info) == {"BTCUSDT"}
