"""OkxFeed on recorded OKX v5 traffic (tests/fixtures/okx, see tests/fixtures/PROVENANCE.md).

Where no recording exists (the rubik contract ratio endpoints, the idle keep-alive and the sequence reset
of `books`) the messages are built in the test from the shapes OKX documents; each such place cites the
documentation page it follows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marketprism.exchanges import make_feed
from marketprism.exchanges.base import Poll, Subscription
from marketprism.exchanges.okx import OkxFeed
from marketprism.records import (FundingRate, Liquidation, LsrAllAccount, LsrTopPosition, OpenInterest,
                                 Trade)

FIXTURES = Path(__file__).parent / "fixtures" / "okx"
RECEIVED = 1_700_000_000_000
WS = "wss://ws.okx.com:8443/ws/v5/public"


def lines(name: str) -> list[bytes]:
    return [line for line in (FIXTURES / name).read_bytes().splitlines() if line.strip()]


def run(feed: OkxFeed, messages, source: str | None = None) -> list:
    out = []
    for message in messages:
        out.extend(feed.on_message(message, source, RECEIVED))
    return out


def of(records, cls) -> list:
    return [r for r in records if type(r) is cls]


# -- trades ------------------------------------------------------------------------------------------
def test_trades_spot_recording():
    feed = OkxFeed()
    records = run(feed, lines("trades_spot_BTC-USDT_2022-05-13_cryptofeed.jsonl"))
    assert len(records) == 69 and all(type(r) is Trade for r in records)
    assert records[0] == Trade(exchange="okx", market_type="spot", symbol="BTC-USDT", instrument="BTC-USDT",
                               timestamp=1652459224818, received_at=RECEIVED, trade_id="338476307", price="30236",
                               quantity="0.0002", side="buy")
    assert records[1].trade_id == "338476308" and records[1].price == "30243.5" and records[1].quantity == "0.001"
    assert not feed.errors


@pytest.mark.parametrize("name, expected", [
    ("trades_swap_BTC-USDT-SWAP_2022-03-03_crypto-msg-parser.json",
     dict(symbol="BTC-USDT", instrument="BTC-USDT-SWAP", timestamp=1646312440645, trade_id="219066264",
          price="43568.8", quantity="7", side="buy")),
    ("trades_swap_BTC-USDT-SWAP_2025-12-08_roq.json",
     dict(symbol="BTC-USDT", instrument="BTC-USDT-SWAP", timestamp=1765201257145, trade_id="2005639579",
          price="91467.1", quantity="0.03", side="sell")),
    ("trades_swap_UNI-USD-SWAP_2022-05-13_cryptofeed.json",
     dict(symbol="UNI-USD", instrument="UNI-USD-SWAP", timestamp=1652459215150, trade_id="12883020",
          price="5.123", quantity="100", side="sell")),
])
def test_trades_swap_recordings(name, expected):
    feed = OkxFeed()
    assert run(feed, lines(name)) == [Trade(exchange="okx", market_type="perpetual", received_at=RECEIVED,
                                            **expected)]
    assert not feed.errors


def test_trades_docs_example_with_aggregation_fields():
    # count/source/seqId (trade aggregation, 2023+) are extra fields; tradeId is the last id aggregated.
    assert run(OkxFeed(), lines("trades_ws_docs_example.json")) == [
        Trade(exchange="okx", market_type="spot", symbol="BTC-USDT", instrument="BTC-USDT", timestamp=1630048897897,
              received_at=RECEIVED, trade_id="130639474", price="42219.9", quantity="0.12060306", side="buy")]


# -- funding rate -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, symbol, inst, rate, funding_time, ts", [
    # 2022 format: no ts, so the timestamp is fundingTime
    ("funding_rate_ws_BTC-USDT-SWAP_2022-03-03_crypto-msg-parser.json", "BTC-USDT", "BTC-USDT-SWAP",
     "0.0001534702159002", 1646323200000, 1646323200000),
    ("funding_rate_ws_BTC-USD-SWAP_2022-03-03_crypto-msg-parser.json", "BTC-USD", "BTC-USD-SWAP",
     "0.0000734174532791", 1646323200000, 1646323200000),
    # current format: the message ts
    ("funding_rate_ws_LTC-USDT-SWAP_2025-12-08_roq.json", "LTC-USDT", "LTC-USDT-SWAP",
     "0.0001000000000000", 1765209600000, 1765201461438),
    ("funding_rate_ws_docs_example.json", "BTC-USD", "BTC-USD-SWAP",
     "0.0001875391284828", 1700726400000, 1700724675402),
])
def test_funding_rate(name, symbol, inst, rate, funding_time, ts):
    feed = OkxFeed()
    assert run(feed, lines(name)) == [FundingRate(
        exchange="okx", market_type="perpetual", symbol=symbol, instrument=inst, timestamp=ts, received_at=RECEIVED,
        funding_rate=rate, funding_time=funding_time, mark_price=None, index_price=None)]
    assert not feed.errors


# -- open interest ----------------------------------------------------------------------------------------
def test_open_interest_ws_recording():
    assert run(OkxFeed(), lines("open_interest_ws_WNCG-USDT-SWAP_2021-12-22_tardis.json")) == [OpenInterest(
        exchange="okx", market_type="perpetual", symbol="WNCG-USDT", instrument="WNCG-USDT-SWAP",
        timestamp=1640131258756, received_at=RECEIVED, open_interest="644195", open_interest_value=None)]


def test_open_interest_ws_docs_example():
    assert run(OkxFeed(), lines("open_interest_ws_docs_example.json")) == [OpenInterest(
        exchange="okx", market_type="perpetual", symbol="BTC-USDT", instrument="BTC-USDT-SWAP",
        timestamp=1743041250440, received_at=RECEIVED, open_interest="2216113.01000000309",
        open_interest_value="1939251795.54769270396321")]


@pytest.mark.parametrize("source", ["/api/v5/public/open-interest?instType=SWAP", None])
def test_open_interest_rest_recording(source):
    feed = OkxFeed()
    records = run(feed, lines("open_interest_rest_SWAP_2022-06-04_crypto-msg-parser.json"), source)
    assert records == [
        OpenInterest(exchange="okx", market_type="perpetual", symbol="BTC-USD", instrument="BTC-USD-SWAP",
                     timestamp=1654348683853, received_at=RECEIVED, open_interest="4092973", open_interest_value=None),
        OpenInterest(exchange="okx", market_type="perpetual", symbol="ETH-USD", instrument="ETH-USD-SWAP",
                     timestamp=1654348683853, received_at=RECEIVED, open_interest="21795246",
                     open_interest_value=None)]
    assert not feed.errors


def test_open_interest_rest_docs_example():
    records = run(OkxFeed(), lines("open_interest_rest_docs_example.json"),
                  "/api/v5/public/open-interest?instId=BTC-USDT-SWAP")
    assert records == [OpenInterest(exchange="okx", market_type="perpetual", symbol="BTC-USDT",
                                    instrument="BTC-USDT-SWAP", timestamp=1597026383085, received_at=RECEIVED,
                                    open_interest="5000", open_interest_value="50000")]


# -- liquidations -----------------------------------------------------------------------------------------
def test_liquidation_futures_recording():
    assert run(OkxFeed(), lines("liquidation_orders_ws_FUTURES_XRP-USD-230929_2023-03-30_tardis.json")) == [
        Liquidation(exchange="okx", market_type="futures", symbol="XRP-USD-230929", instrument="XRP-USD-230929",
                    timestamp=1680173247614, received_at=RECEIVED, side="buy", price="0.55205", quantity="39")]


def test_liquidation_swap_docs_example():
    assert run(OkxFeed(), lines("liquidation_orders_ws_docs_example.json")) == [
        Liquidation(exchange="okx", market_type="perpetual", symbol="IOST-USDT", instrument="IOST-USDT-SWAP",
                    timestamp=1692266434010, received_at=RECEIVED, side="buy", price="0.007831", quantity="13")]


def test_liquidation_keeps_subscribed_instruments_only():
    feed = OkxFeed()
    feed.subscriptions(("BTC-USDT",), ("liquidation",))
    assert run(feed, lines("liquidation_orders_ws_docs_example.json")) == []  # IOST was not asked for
    feed.subscriptions(("IOST-USDT",), ("liquidation",))
    assert len(run(feed, lines("liquidation_orders_ws_docs_example.json"))) == 1


# -- long/short ratios (REST, rubik) ----------------------------------------------------------------------
def test_lsr_currency_level_docs_example():
    # GET /api/v5/rubik/stat/contracts/long-short-account-ratio?ccy=BTC: one ratio per currency, so
    # instrument and symbol are the currency.
    records = run(OkxFeed(), lines("long_short_account_ratio_rest_docs_example.json"),
                  "/api/v5/rubik/stat/contracts/long-short-account-ratio?ccy=BTC&period=5m")
    assert records == [LsrAllAccount(exchange="okx", market_type="perpetual", symbol="BTC", instrument="BTC",
                                     timestamp=1630502100000, received_at=RECEIVED, period="5m",
                                     long_short_ratio="1.25", long_ratio=None, short_ratio=None)]


# No recorded response of the contract-level endpoints exists (shared PROVENANCE.md, "Missing"); their
# documented response examples carry // comments and a trailing comma, so the bodies below are those
# examples with the comments and the trailing comma removed. Sources, both giving data as [ts, ratio] rows:
# https://www.okx.com/docs-v5/en/#trading-statistics-rest-api-get-top-traders-contract-long-short-ratio-by-position
# ([ts, longShortPosRatio]) and https://www.okx.com/docs-v5/en/#trading-statistics-rest-api-get-contract-long-short-ratio
# ([ts, longShortAcctRatio]); scraped copies: qiuham/crypto-api-docs : docs/okx/trading/statistics/
# rest-api-get-top-traders-contract-long-short-ratio-by-position.md and rest-api-get-contract-long-short-ratio.md.
DOCS_RATIO_BODY = b'{"code":"0","msg":"","data":[["1701417600000","1.1739"],["1701417600000","0.1236"]]}'
TOP_PATH = "/api/v5/rubik/stat/contracts/long-short-position-ratio-contract-top-trader"
ACCOUNT_PATH = "/api/v5/rubik/stat/contracts/long-short-account-ratio-contract"


@pytest.mark.parametrize("path, cls", [(TOP_PATH, LsrTopPosition), (ACCOUNT_PATH, LsrAllAccount)])
def test_lsr_contract_endpoints(path, cls):
    feed = OkxFeed()
    source = f"{path}?instId=BTC-USDT-SWAP&period=5m"
    records = run(feed, [DOCS_RATIO_BODY], source)
    # the docs example repeats one bucket time: one record per bucket, the first row wins
    assert records == [cls(exchange="okx", market_type="perpetual", symbol="BTC-USDT", instrument="BTC-USDT-SWAP",
                           timestamp=1701417600000, received_at=RECEIVED, period="5m", long_short_ratio="1.1739",
                           long_ratio=None, short_ratio=None)]
    assert run(feed, [DOCS_RATIO_BODY], source) == []  # the next poll repeats the bucket: de-duplicated
    # OKX returns the newest bucket first; only the new bucket is emitted
    newer = b'{"code":"0","msg":"","data":[["1701417900000","1.2"],["1701417600000","1.1739"]]}'
    again = run(feed, [newer], source)
    assert [(r.timestamp, r.long_short_ratio) for r in again] == [(1701417900000, "1.2")]
    assert not feed.errors


def test_lsr_error_body_and_missing_source_counted():
    feed = OkxFeed()
    error = b'{"code":"50011","msg":"Too Many Requests","data":[]}'
    assert run(feed, [error], f"{TOP_PATH}?instId=BTC-USDT-SWAP&period=5m") == []
    assert run(feed, [DOCS_RATIO_BODY]) == []  # a ratio body cannot say which endpoint it came from
    assert run(feed, [DOCS_RATIO_BODY], TOP_PATH) == []  # nor which instrument
    assert sum(feed.errors.values()) == 3


# -- plan -------------------------------------------------------------------------------------------------
ALL_TYPES = ("trade", "orderbook", "funding_rate", "open_interest", "liquidation", "lsr_top_position",
             "lsr_all_account")


def test_subscriptions_one_symbol():
    subs = OkxFeed().subscriptions(("BTC-USDT",), ALL_TYPES)
    assert len(subs) == 1 and subs[0].path == "/ws/v5/public"
    assert [json.loads(m) for m in subs[0].messages] == [{"op": "subscribe", "args": [
        {"channel": "liquidation-orders", "instType": "SWAP"},
        {"channel": "trades", "instId": "BTC-USDT"}, {"channel": "books", "instId": "BTC-USDT"},
        {"channel": "trades", "instId": "BTC-USDT-SWAP"}, {"channel": "books", "instId": "BTC-USDT-SWAP"},
        {"channel": "funding-rate", "instId": "BTC-USDT-SWAP"},
        {"channel": "open-interest", "instId": "BTC-USDT-SWAP"}]}]


def test_subscriptions_are_sharded_and_chunked():
    symbols = tuple(f"C{i}-USDT" for i in range(40))
    subs = OkxFeed().subscriptions(symbols, ALL_TYPES)
    assert all(isinstance(s, Subscription) and s.path == "/ws/v5/public" for s in subs)
    args = [[a for m in s.messages for a in json.loads(m)["args"]] for s in subs]
    assert sum(len(a) for a in args) == 1 + 40 * 6
    assert all(sum(a["channel"] == "books" for a in conn) <= 25 for conn in args)
    assert all(len(json.loads(m)["args"]) <= 50 for s in subs for m in s.messages)
    assert len(subs) == 4  # 80 books channels, 25 a connection


def test_subscriptions_futures_symbol():
    subs = OkxFeed().subscriptions(("XRP-USD-230929",), ("trade", "funding_rate", "open_interest"))
    assert json.loads(subs[0].messages[0])["args"] == [{"channel": "trades", "instId": "XRP-USD-230929"},
                                                       {"channel": "open-interest", "instId": "XRP-USD-230929"}]


def test_polls():
    assert OkxFeed().polls(("BTC-USDT",), ALL_TYPES) == [
        Poll("/api/v5/rubik/stat/contracts/long-short-position-ratio-contract-top-trader"
             "?instId=BTC-USDT-SWAP&period=5m", 60.0),
        Poll("/api/v5/rubik/stat/contracts/long-short-account-ratio-contract?instId=BTC-USDT-SWAP&period=5m", 60.0)]
    assert OkxFeed().polls(("BTC-USDT",), ("trade", "open_interest")) == []


def test_feed_attributes():
    feed = make_feed("okx")
    assert type(feed) is OkxFeed and feed.name == "okx" and feed.exchange == "okx"
    assert feed.ping_frame == "ping" and feed.ping_interval_s == 20


# -- control frames and bad input -------------------------------------------------------------------------
def test_control_frames():
    feed = OkxFeed()
    assert feed.on_message(b"pong", WS, RECEIVED) == [] and feed.on_message("pong", None, RECEIVED) == []
    # subscribe acknowledgement and error event as in the docs (order book channel page, "Response Example")
    ack = b'{"id":"1512","event":"subscribe","arg":{"channel":"books","instId":"BTC-USDT"},"connId":"a4d3ae55"}'
    assert feed.on_message(ack, WS, RECEIVED) == []
    assert not feed.errors
    error = (b'{"id":"1512","event":"error","code":"60012","msg":"Invalid request: {\\"op\\": \\"subscribe\\", '
             b'\\"argss\\":[{ \\"channel\\" : \\"books\\", \\"instId\\" : \\"BTC-USD-191227\\"}]}","connId":"a4d3ae55"}')
    assert feed.on_message(error, WS, RECEIVED) == []
    assert feed.errors == {"error event 60012": 1}


def test_bad_input_is_counted():
    feed = OkxFeed()
    trade = lines("trades_ws_docs_example.json")[0]
    bad = [
        trade[:40],                                                    # truncated JSON
        trade.replace(b'"px":"42219.9"', b'"px":42219.9'),            # wrong type
        trade.replace(b'"ts":"1630048897897"', b'"ts":"soon"'),       # not a time
        trade.replace(b'"side":"buy"', b'"side":"up"'),               # unknown side
        trade.replace(b'"channel":"trades"', b'"channel":"tickers"'),  # unknown channel
        b'[1, 2, 3]', b'null', b'{}', b'', b'\xff\xfe',
        lines("books_docs_example_snapshot_update.jsonl")[0].replace(b'"action":"snapshot",', b''),
        lines("books_docs_example_snapshot_update.jsonl")[0].replace(b'"seqId":123456', b'"seqId":"x"'),
        lines("funding_rate_ws_docs_example.json")[0].replace(b'"fundingRate":"0.0001875391284828"',
                                                               b'"fundingRate":""'),
    ]
    for message in bad:
        assert feed.on_message(message, WS, RECEIVED) == []
    assert sum(feed.errors.values()) == len(bad)
    assert feed.errors["unknown channel"] == 1
    assert feed.on_message(b'{"code":"0","data":[]}', "/api/v5/market/books?instId=BTC-USDT", RECEIVED) == []
    assert feed.errors["unknown REST path"] == 1
