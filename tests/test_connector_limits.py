"""Connection and REST limits per venue, and instrument metadata, without the network: the rate budgets
(ratelimit.py) on a fake clock, frame pacing, per-connection stream/argument limits, and how feeds use
instrument lists (and work without them, as in replay). The figures asserted are the documented ones
cited in marketprism/collector/ratelimit.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from marketprism.collector import instruments
from marketprism.collector.ratelimit import SAFETY, Budgets, Limit, Venue, Window, binance_spot, binance_usdm, okx
from marketprism.collector.service import Link, Pacer, seconds
from marketprism.exchanges import make_feed
from marketprism.exchanges.base import InstrumentInfo
from marketprism.records import Gap, OpenInterest, OrderBook, Trade
from marketprism.replay import replay

FIXTURES = Path(__file__).parent / "fixtures"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- rate budgets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, weight", [
    ("/api/v3/depth?symbol=BTCUSDT&limit=1000", 50), ("/api/v3/depth?symbol=BTCUSDT&limit=100", 5),
    ("/api/v3/depth?symbol=BTCUSDT&limit=500", 25), ("/api/v3/depth?symbol=BTCUSDT", 5),
    ("/api/v3/depth?symbol=BTCUSDT&limit=5000", 250), ("/api/v3/exchangeInfo?symbol=BTCUSDT", 20)])
def test_binance_spot_request_weights(path, weight):
    venue = Venue("binance_spot", binance_spot, clock=Clock())
    assert venue.reserve(path) == 0
    assert venue.windows["weight"].total == weight


@pytest.mark.parametrize("path, bucket, cost", [
    ("/fapi/v1/depth?symbol=BTCUSDT&limit=1000", "weight", 20), ("/fapi/v1/depth?symbol=BTCUSDT&limit=100", "weight", 5),
    ("/fapi/v1/openInterest?symbol=BTCUSDT", "weight", 1), ("/fapi/v1/premiumIndex", "weight", 10),
    ("/fapi/v1/exchangeInfo", "weight", 1),
    ("/futures/data/topLongShortPositionRatio?symbol=BTCUSDT&period=5m&limit=30", "futures_data", 1)])
def test_binance_usdm_request_weights(path, bucket, cost):
    venue = Venue("binance_usdm", binance_usdm, clock=Clock())
    assert venue.reserve(path) == 0
    assert {k: w.total for k, w in venue.windows.items()} == {bucket: cost}


def test_spot_depth_snapshots_wait_once_the_minute_weight_is_spent():
    clock = Clock()
    venue = Venue("binance_spot", binance_spot, clock=clock)
    path = "/api/v3/depth?symbol=BTCUSDT&limit=1000"
    allowed = int(6000 * SAFETY // 50)  # 96 snapshots of weight 50 within one minute
    assert all(venue.reserve(path) == 0 for _ in range(allowed))
    clock.t += 10
    assert venue.reserve(path) == pytest.approx(50.0)  # the first one leaves the window at t0 + 60 s
    clock.t += 50
    assert venue.reserve(path) == 0


def test_okx_limits_are_per_endpoint_and_instrument():
    clock = Clock()
    venue = Venue("okx", okx, clock=clock)
    top = "/api/v5/rubik/stat/contracts/long-short-position-ratio-contract-top-trader?instId={}&period=5m"
    n = int(5 * SAFETY)  # "5 requests per 2 seconds", IP + Instrument ID
    assert all(venue.reserve(top.format("BTC-USDT-SWAP")) == 0 for _ in range(n))
    assert venue.reserve(top.format("BTC-USDT-SWAP")) > 0
    assert venue.reserve(top.format("ETH-USDT-SWAP")) == 0  # another instrument has its own allowance
    assert venue.reserve("/api/v5/public/instruments?instType=SWAP&instId=BTC-USDT-SWAP") == 0


def test_bybit_spot_and_linear_share_one_venue_and_binance_does_not():
    budgets = Budgets()
    assert budgets.venue("bybit_spot") is budgets.venue("bybit_linear")
    assert budgets.venue("binance_spot") is not budgets.venue("binance_usdm")
    assert budgets.venue("bybit_spot").blocked_pause_s == 600  # "wait for at least 10 minutes"
    assert sorted(budgets.feeds_of("bybit")) == ["bybit_linear", "bybit_spot"]


def test_a_pause_holds_every_request_of_the_venue():
    clock = Clock()
    venue = Venue("deribit", lambda p, q: [("all", Limit(20, 1), 1)], clock=clock)
    venue.pause(2.0)
    assert venue.reserve("/api/v2/public/get_instruments") == 2.0
    assert venue.reserve("/api/v2/public/ticker") == 2.0  # any endpoint
    assert venue.windows == {}  # nothing was charged while paused
    clock.t += 2.0
    assert venue.reserve("/api/v2/public/ticker") == 0


def test_a_request_dearer_than_the_budget_still_goes_alone():
    w = Window(Limit(10, 1))
    assert w.wait(100, 0.0) == 0
    w.take(100, 0.0)
    assert w.wait(1, 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("header, expected", [("2", 2.0), ("0", 0.0), (None, 5.0), ("soon", 5.0), ("1.5", 1.5)])
def test_retry_after_header(header, expected):
    assert seconds(header, 5.0) == expected


# -- frames sent per connection -----------------------------------------------------------------------------
class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[float, str]] = []

    async def send_str(self, frame: str) -> None:
        self.sent.append((time.monotonic(), frame))


async def test_binance_subscribe_frames_are_paced_below_five_per_second():
    feed = make_feed("binance_spot")
    ws = FakeSocket()
    frames = [json.dumps({"method": "SUBSCRIBE", "params": [f"s{i}usdt@trade"], "id": i}) for i in range(9)]
    await Pacer(feed.sends_per_s).send(ws, frames)
    times = [t for t, _ in ws.sent]
    assert [f for _, f in ws.sent] == frames
    # Binance spot: "WebSocket connections have a limit of 5 incoming messages per second"
    assert all(sum(1 for u in times if t <= u < t + 1.0) <= 5 for t in times)
    assert times[-1] - times[0] >= 8 / feed.sends_per_s - 0.05


async def test_frames_of_unpaced_venues_go_at_once():
    ws = FakeSocket()
    await Pacer(make_feed("okx").sends_per_s).send(ws, ["a", "b", "c"])
    assert ws.sent[-1][0] - ws.sent[0][0] < 0.05


def test_binance_connections_stay_within_1024_streams():
    symbols = tuple(f"C{i}-USDT" for i in range(700))
    for name in ("binance_spot", "binance_usdm"):
        subs = make_feed(name).subscriptions(symbols, ("trade", "orderbook", "funding_rate", "liquidation"))
        counts = [len(s.path.split("streams=", 1)[1].split("/")) for s in subs]
        assert max(counts) <= 1024 and sum(counts) == 700 * (2 if name == "binance_spot" else 4)
        assert all(s.messages == () for s in subs)  # streams ride in the URL: nothing sent after connect


def test_okx_and_bybit_subscribe_arguments_stay_within_their_limits():
    symbols = tuple(f"C{i}-USDT" for i in range(60))
    types = ("trade", "orderbook", "funding_rate", "open_interest", "liquidation")
    for sub in make_feed("okx").subscriptions(symbols, types):
        books = 0
        for frame in sub.messages:
            args = json.loads(frame)["args"]
            books += sum(a["channel"] == "books" for a in args)
            assert len(frame.encode()) < 64 * 1024  # OKX: total length of args at most 64 KB
        assert books < 30  # OKX: fewer than 30 400-level book channels per connection
    for name in ("bybit_spot", "bybit_linear"):
        for sub in make_feed(name).subscriptions(symbols, types):
            assert all(len(json.loads(f)["args"]) <= 10 for f in sub.messages)  # spot: up to 10 args a request


def test_connection_age_and_stream_continuity_rules_per_feed():
    assert make_feed("binance_spot").max_connection_age_s < 24 * 3600
    assert make_feed("binance_usdm").max_connection_age_s < 24 * 3600
    assert make_feed("okx").max_connection_age_s is None
    assert make_feed("binance_spot").sequenced == ("orderbook", "trade")
    assert all(make_feed(n).sequenced == ("orderbook",) for n in ("binance_usdm", "okx", "deribit", "bybit_linear"))


# -- gaps for every stream a connection carried ---------------------------------------------------------------
def trade(symbol: str, market_type: str = "perpetual", instrument: str = "X") -> Trade:
    return Trade(exchange="okx", market_type=market_type, symbol=symbol, instrument=instrument, timestamp=1,
                 received_at=1, trade_id="1", price="1", quantity="1", side="buy")


def test_link_opens_one_gap_per_stream_from_the_last_data_to_the_resumed_data():
    link = Link(make_feed("okx"))
    assert link.saw([trade("BTC-USDT", instrument="BTC-USDT-SWAP"), trade("BTC-USDT", "spot", "BTC-USDT")], 1000) == []
    link.saw([], 1500)  # a data frame without records still counts as data
    link.lose("stale", 5000)
    link.lose("disconnect", 7000)  # a failed reconnect keeps the first reason and start
    gaps = link.saw([trade("BTC-USDT", instrument="BTC-USDT-SWAP")], 9000)
    assert sorted((g.market_type, g.stream_type, g.reason, g.started_at, g.ended_at, g.timestamp) for g in gaps) == [
        ("perpetual", "trade", "stale", 1500, 9000, 9000), ("spot", "trade", "stale", 1500, 9000, 9000)]
    assert all(type(g) is Gap and g.from_sequence is None for g in gaps)
    assert link.saw([], 9500) == []  # closed once


def test_link_leaves_books_and_sequenced_trades_to_the_feed():
    link = Link(make_feed("binance_spot"))
    names = dict(exchange="binance", market_type="spot", symbol="BTC-USDT", instrument="BTCUSDT", received_at=1)
    link.saw([Trade(**names, timestamp=1, trade_id="1", price="1", quantity="1", side="buy"),
              OrderBook(**names, timestamp=1, sequence=7, bids=[("1", "1")], asks=[("2", "1")]),
              Gap(**names, timestamp=1, stream_type="orderbook", reason="sequence", started_at=1, ended_at=1)], 1000)
    link.lose("disconnect", 2000)
    assert link.close(3000) == []


def test_feed_errors_count_their_changes():
    errors = make_feed("okx").errors
    assert errors.changes == 0
    errors["invalid json"] += 1
    errors["invalid json"] += 1
    errors.update(["unexpected shape"])
    assert (dict(errors), errors.changes) == ({"invalid json": 2, "unexpected shape": 1}, 3)


# -- instrument metadata ------------------------------------------------------------------------------------
OKX_DOC_SPOT = ('{"code":"0","msg":"","data":[{"alias":"","auctionEndTime":"","baseCcy":"BTC","category":"1",'
                '"ctMult":"","ctType":"","ctVal":"","ctValCcy":"","contTdSwTime":"1704876947000","expTime":"",'
                '"futureSettlement":false,"groupId":"1","instFamily":"","instId":"BTC-USDT","instType":"SPOT",'
                '"lever":"10","listTime":"1606468572000","lotSz":"0.00000001","minSz":"0.00001","quoteCcy":"USDT",'
                '"settleCcy":"","state":"live","ruleType":"normal","stk":"","tickSz":"0.1","uly":""}]}')


def test_okx_instrument_list_docs_example():
    # https://www.okx.com/docs-v5/en/#public-data-rest-api-get-instruments (response example, shortened to
    # the fields read; every value as published)
    assert instruments.parse_okx(OKX_DOC_SPOT.encode()) == {"BTC-USDT": InstrumentInfo("BTC-USDT", "BTC-USDT")}


def test_instrument_paths_ask_only_for_the_configured_instruments():
    symbols = ("BTC-USDT", "ETH-USDT")
    assert instruments.paths(make_feed("binance_spot"), symbols) == [
        "/api/v3/exchangeInfo?symbol=BTCUSDT", "/api/v3/exchangeInfo?symbol=ETHUSDT"]
    assert instruments.paths(make_feed("okx"), ("BTC-USDT",)) == [
        "/api/v5/public/instruments?instType=SPOT&instId=BTC-USDT",
        "/api/v5/public/instruments?instType=SWAP&instId=BTC-USDT-SWAP"]
    assert instruments.paths(make_feed("bybit_linear"), ("BTC-USDT",)) == [
        "/v5/market/instruments-info?category=linear&symbol=BTCUSDT"]
    assert instruments.paths(make_feed("deribit"), symbols) == ["/api/v2/public/get_instruments?currency=any&kind=future"]


def okx_lines(name: str) -> list[bytes]:
    return [x for x in (FIXTURES / "okx" / name).read_bytes().splitlines() if x.strip()]


def test_okx_open_interest_without_oi_usd_is_valued_from_the_contract_size():
    body = okx_lines("open_interest_rest_SWAP_2022-06-04_crypto-msg-parser.json")
    source = "/api/v5/public/open-interest?instType=SWAP"
    bare = make_feed("okx")
    assert [r.open_interest_value for r in bare.on_message(body[0], source, 0)] == [None, None]  # replay: unknown
    feed = make_feed("okx")
    # ctVal of an inverse contract is in USD; OKX's docs name BTC-USD-SWAP's: "ctVal=100 USD"
    feed.set_instruments({"BTC-USD-SWAP": InstrumentInfo("BTC-USD-SWAP", "BTC-USD", "100", inverse=True)})
    btc, eth = feed.on_message(body[0], source, 0)
    assert (btc.open_interest, btc.open_interest_value) == ("4092973", "409297300")
    assert eth.open_interest_value is None  # no metadata for it


def test_okx_linear_open_interest_value_needs_a_price():
    push = okx_lines("open_interest_ws_WNCG-USDT-SWAP_2021-12-22_tardis.json")[0]
    feed = make_feed("okx")
    # oi == oiCcy in this push: one contract is one WNCG
    feed.set_instruments({"WNCG-USDT-SWAP": InstrumentInfo("WNCG-USDT-SWAP", "WNCG-USDT", "1")})
    [rec] = feed.on_message(push, "wss://ws.okx.com:8443/ws/v5/public", 0)
    assert type(rec) is OpenInterest and rec.open_interest_value is None  # no trade seen yet
    feed.last_price["WNCG-USDT-SWAP"] = "2.5"  # as a trade of the instrument would have set it
    [rec] = feed.on_message(push, "wss://ws.okx.com:8443/ws/v5/public", 0)
    assert rec.open_interest_value == "1610487.5"


def test_symbols_come_from_metadata_where_the_suffix_rule_cannot_split():
    for name in ("binance_spot", "bybit_spot"):
        feed = make_feed(name)
        assert feed.pair("BTCPLN") == "BTCPLN"  # PLN is no known quote: the rule gives up
        feed.set_instruments({"BTCPLN": InstrumentInfo("BTCPLN", "BTC-PLN")})
        assert feed.pair("BTCPLN") == "BTC-PLN"


def test_new_metadata_replaces_names_cached_by_rule():
    feed = make_feed("bybit_spot")
    assert feed._name("BTCPLN") == ("BTCPLN", "spot")
    feed.set_instruments({"BTCPLN": InstrumentInfo("BTCPLN", "BTC-PLN")})
    assert feed._name("BTCPLN") == ("BTC-PLN", "spot")
    binance = make_feed("binance_spot")
    trades = [x for x in (FIXTURES / "binance_spot" / "trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl").read_bytes()
              .splitlines() if x.strip()][:1]
    assert [r.symbol for r in replay(binance, trades, received_at=0)] == ["BTC-USDT"]  # without metadata
    binance.set_instruments({"BTCUSDT": InstrumentInfo("BTCUSDT", "BTC-USDT")})
    assert binance._name_cache == {}


def test_deribit_open_interest_value_follows_the_listed_contract_kind():
    feed = make_feed("deribit")
    assert feed._inverse("BTC-PERPETUAL") is None  # no list: the naming rule decides
    feed.set_instruments({"BTC-PERPETUAL": InstrumentInfo("BTC-PERPETUAL", "BTC-USD", "10", inverse=True),
                          "SOL_USDC-PERPETUAL": InstrumentInfo("SOL_USDC-PERPETUAL", "SOL-USDC", "1")})
    value = feed._interest_value
    assert value("BTC-PERPETUAL", "perpetual", "100", "60000", feed._inverse("BTC-PERPETUAL")) == "100"
    assert value("SOL_USDC-PERPETUAL", "perpetual", "3", "150.5", feed._inverse("SOL_USDC-PERPETUAL")) == "451.5"
