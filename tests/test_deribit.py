"""Deribit parsing and the change_id book chain on real recordings and documentation examples
(tests/fixtures/deribit, provenance in tests/fixtures/PROVENANCE.md)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from marketprism.exchanges import make_feed
from marketprism.exchanges.deribit import DeribitFeed, names
from marketprism.records import FundingRate, Gap, OpenInterest, OrderBook, Trade, VolatilityIndex
from marketprism.replay import replay

FIX = Path(__file__).parent / "fixtures" / "deribit"
BOOK31 = "book_raw_BTC-24SEP21-8000-P_2021-07-22_cryptofeed.jsonl"
BOOK4 = "book_raw_BTC-31DEC21-34000-P_2021-07-22_cryptofeed.jsonl"


def lines(name: str) -> list[bytes]:
    return [line for line in (FIX / name).read_bytes().splitlines() if line.strip()]


def run(feed, frames, received_at=7):
    return list(replay(feed, frames, received_at=received_at))


def notification(channel: str, data: bytes) -> bytes:
    """The documented envelope around a documented `data` object.

    Deribit's docs give only the `data` object of each channel example; every notification arrives as
    {"jsonrpc": "2.0", "method": "subscription", "params": {"channel": ..., "data": ...}}
    (https://docs.deribit.com/articles/notifications, "Notification Format").
    """
    return b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"%s","data":%s}}' % (
        channel.encode(), data)


# -- trades ------------------------------------------------------------------------------------------
def test_perpetual_trades_exact_fields():
    out = run(DeribitFeed(), lines("trades_ws_BTC-PERPETUAL_2021-03-21_crypto-msg-parser.json"))
    assert out == [
        Trade(exchange="deribit", market_type="perpetual", symbol="BTC-USD", instrument="BTC-PERPETUAL",
              timestamp=1616321478553, received_at=7, trade_id="137487241", price="56168.0", quantity="5580.0",
              side="buy"),
        Trade(exchange="deribit", market_type="perpetual", symbol="BTC-USD", instrument="BTC-PERPETUAL",
              timestamp=1616321478553, received_at=7, trade_id="137487242", price="56168.0", quantity="60.0",
              side="buy"),
    ]


def test_future_trade_keeps_expiry():
    [t] = run(DeribitFeed(), lines("trades_ws_BTC-26MAR21_2021-03-21_crypto-msg-parser.json"))
    assert (t.exchange, t.market_type, t.symbol, t.instrument) == (
        "deribit", "futures", "BTC-USD-210326", "BTC-26MAR21")
    assert (t.trade_id, t.price, t.quantity, t.side, t.timestamp) == ("137486952", "56273.5", "6000.0", "buy",
                                                                      1616321287195)


def test_option_trade_keeps_strike_and_type():
    [t] = run(DeribitFeed(), lines("trades_ws_option_any_2021-03-21_crypto-msg-parser.json"))
    assert (t.market_type, t.symbol, t.instrument) == ("options", "BTC-USD-210326-62000-C", "BTC-26MAR21-62000-C")
    assert (t.trade_id, t.price, t.quantity, t.side, t.timestamp) == ("137488100", "0.007", "0.1", "buy", 1616321732986)


def test_numbers_are_converted_exactly():
    # The real option trade with its amount written as 1.2e-05 (a JSON number in exponent form, as Deribit
    # may send small values): the record must hold the exact plain decimal, never a float rendering.
    frame = lines("trades_ws_option_any_2021-03-21_crypto-msg-parser.json")[0].replace(b'"amount":0.1',
                                                                                       b'"amount":1.2e-05')
    [t] = run(DeribitFeed(), [frame])
    assert t.quantity == "0.000012"
    frame = frame.replace(b'"price":0.007', b'"price":0.30000000000000004')
    [t] = run(DeribitFeed(), [frame])
    assert t.price == "0.30000000000000004"  # no binary-float rounding on the way


# -- instruments -------------------------------------------------------------------------------------
@pytest.mark.parametrize("instrument,expected", [
    ("BTC-PERPETUAL", ("BTC-USD", "perpetual")),
    ("ETH-PERPETUAL", ("ETH-USD", "perpetual")),
    ("BTC_USDC-PERPETUAL", ("BTC-USDC", "perpetual")),
    ("BTC-26MAR21", ("BTC-USD-210326", "futures")),
    ("ETH-5JUL24", ("ETH-USD-240705", "futures")),
    ("BTC-24SEP21-8000-P", ("BTC-USD-210924-8000-P", "options")),
])
def test_instrument_names(instrument, expected):
    assert names(instrument) == expected


def test_config_symbols_map_to_main_perpetuals():
    feed = DeribitFeed()
    assert feed.instrument("BTC-USDT") == "BTC-PERPETUAL"
    assert feed.instrument("ETH-USDT") == "ETH-PERPETUAL"
    assert feed.instrument("BTC-USDC") == "BTC_USDC-PERPETUAL"
    assert feed.instrument("SOL-USDT") == "SOL_USDC-PERPETUAL"  # no inverse SOL contract
    assert feed.instrument("BTC-USD-210326") == "BTC-26MAR21"
    assert feed.instrument("BTC-USD-210924-8000-P") == "BTC-24SEP21-8000-P"


def test_subscription_plan():
    feed = make_feed("deribit")
    [sub] = feed.subscriptions(("BTC-USDT", "ETH-USDT"), ("trade", "orderbook", "funding_rate", "volatility_index"))
    assert sub.path == "/ws/api/v2"
    heartbeat, subscribe = (json.loads(m) for m in sub.messages)
    assert heartbeat == {"jsonrpc": "2.0", "id": 1, "method": "public/set_heartbeat", "params": {"interval": 30}}
    assert subscribe["method"] == "public/subscribe"
    assert subscribe["params"]["channels"] == [
        "trades.BTC-PERPETUAL.100ms", "book.BTC-PERPETUAL.100ms", "ticker.BTC-PERPETUAL.100ms",
        "trades.ETH-PERPETUAL.100ms", "book.ETH-PERPETUAL.100ms", "ticker.ETH-PERPETUAL.100ms",
        "deribit_volatility_index.btc_usd", "deribit_volatility_index.eth_usd"]


# -- ticker: funding and open interest ------------------------------------------------------------------
def test_ticker_funding_and_open_interest_exact():
    feed = DeribitFeed()
    frame = lines("ticker_ws_BTC-PERPETUAL_2022-06-02_crypto-msg-parser.json")
    funding, oi = run(feed, frame)
    assert funding == FundingRate(exchange="deribit", market_type="perpetual", symbol="BTC-USD",
                                  instrument="BTC-PERPETUAL", timestamp=1654161785818, received_at=7,
                                  funding_rate="0.0",  # current_funding, not funding_8h (0.00000255)
                                  funding_time=1654185600000,  # 2022-06-02 16:00 UTC, end of the 8-hour window
                                  mark_price="29932.79", index_price="29930.44")
    # inverse perpetual: open interest is counted in USD, already the quote currency
    assert oi == OpenInterest(exchange="deribit", market_type="perpetual", symbol="BTC-USD",
                              instrument="BTC-PERPETUAL", timestamp=1654161785818, received_at=7,
                              open_interest="559791310", open_interest_value="559791310")
    assert run(feed, frame) == []  # unchanged values are not repeated
    changed = frame[0].replace(b'"open_interest":559791310', b'"open_interest":559791320')
    [again] = run(feed, [changed])
    assert isinstance(again, OpenInterest) and again.open_interest == "559791320"


def test_open_interest_value_by_contract_kind():
    value = DeribitFeed._interest_value
    assert value("BTC-PERPETUAL", "perpetual", "100", "30000.5") == "100"
    assert value("BTC_USDC-PERPETUAL", "perpetual", "1.5", "30000.5") == "45000.75"
    assert value("BTC-24SEP21-8000-P", "options", "3", "0.01") is None


# -- volatility index -----------------------------------------------------------------------------------
def test_volatility_index_docs_example_in_notification_envelope():
    frame = notification("deribit_volatility_index.btc_usd", lines("volatility_index_ws_docs_example_data.json")[0])
    assert run(DeribitFeed(), [frame]) == [
        VolatilityIndex(exchange="deribit", market_type="options", symbol="BTC", instrument="btc_usd",
                        timestamp=1619777946007, received_at=7, value="129.36")]


# -- order books -----------------------------------------------------------------------------------------
def reconstruct(frames: list[bytes]) -> tuple[list, list]:
    """The book after the frames, rebuilt with plain dicts from the documented rules (no Book class)."""
    sides = {"bids": {}, "asks": {}}
    for frame in frames:
        msg = json.loads(frame, parse_float=Decimal, parse_int=Decimal)
        data = msg["params"]["data"] if "params" in msg else msg
        if data["type"] == "snapshot":
            sides = {"bids": {}, "asks": {}}
        for side in ("bids", "asks"):
            for action, price, amount in data[side]:
                if action == "delete":
                    sides[side].pop(price, None)
                else:
                    sides[side][price] = amount
    bids = [(format(p, "f"), format(q, "f")) for p, q in sorted(sides["bids"].items(), reverse=True)]
    asks = [(format(p, "f"), format(q, "f")) for p, q in sorted(sides["asks"].items())]
    return bids, asks


@pytest.mark.parametrize("name", [BOOK31, BOOK4])
def test_recorded_book_chain_has_no_gap_and_matches_reconstruction(name):
    frames = lines(name)
    out = run(DeribitFeed(), frames)
    assert len(out) == len(frames) and all(isinstance(r, OrderBook) for r in out)
    last = json.loads(frames[-1])["params"]["data"]
    assert (out[-1].sequence, out[-1].timestamp) == (last["change_id"], last["timestamp"])
    assert [r.sequence for r in out] == [json.loads(f)["params"]["data"]["change_id"] for f in frames]
    assert (out[-1].bids, out[-1].asks) == reconstruct(frames)


def test_first_book_record_exact():
    first = run(DeribitFeed(), lines(BOOK4)[:1])[0]
    assert first == OrderBook(
        exchange="deribit", market_type="options", symbol="BTC-USD-211231-34000-P", instrument="BTC-31DEC21-34000-P",
        timestamp=1626993721943, received_at=7, sequence=33195894133,
        bids=[("0.2325", "0.8"), ("0.232", "5.3"), ("0.2315", "0.7"), ("0.2295", "8.2"), ("0.229", "3.6"),
              ("0.0995", "2.0"), ("0.0945", "3.0"), ("0.0005", "0.1")],
        asks=[("0.236", "4.8"), ("0.2365", "3.6"), ("0.2375", "1.0"), ("0.238", "1.0"), ("0.2385", "1.1"),
              ("0.239", "8.2")])


def test_docs_book_pair_in_notification_envelope():
    frames = [notification("book.BTC-PERPETUAL.100ms", data) for data in lines("book_docs_example_data.jsonl")]
    snap, change = run(DeribitFeed(), frames)
    assert (snap.symbol, snap.market_type, snap.sequence, snap.timestamp) == ("BTC-USD", "perpetual", 297217,
                                                                              1554373962454)
    assert snap.bids == [("5042.34", "30"), ("5041.94", "20")]
    assert snap.asks == [("5042.64", "40"), ("5043.3", "40")]
    assert (change.sequence, change.bids, change.asks) == (297218, [], [("5042.64", "40"), ("5043.3", "40")])
    assert (change.bids, change.asks) == reconstruct(frames)


def test_depth_limits_levels():
    [rec] = run(DeribitFeed(depth=2), lines(BOOK4)[:1])
    assert rec.bids == [("0.2325", "0.8"), ("0.232", "5.3")] and rec.asks == [("0.236", "4.8"), ("0.2365", "3.6")]


def test_missing_change_gives_one_gap_and_silence_until_snapshot():
    frames = lines(BOOK31)
    removed = json.loads(frames[5])["params"]["data"]
    before = json.loads(frames[4])["params"]["data"]
    feed = DeribitFeed()
    out = run(feed, frames[:5] + frames[6:])
    gaps = [r for r in out if isinstance(r, Gap)]
    assert len(gaps) == 1
    gap = gaps[0]
    assert (gap.stream_type, gap.reason, gap.symbol, gap.instrument) == (
        "orderbook", "sequence", "BTC-USD-210924-8000-P", "BTC-24SEP21-8000-P")
    assert (gap.from_sequence, gap.to_sequence) == (before["change_id"] + 1, removed["change_id"])
    assert (gap.started_at, gap.ended_at) == (before["timestamp"], json.loads(frames[6])["params"]["data"]["timestamp"])
    assert out.index(gap) == 5 and all(isinstance(r, OrderBook) for r in out[:5]) and out[6:] == []
    # a fresh snapshot is requested on the same connection: unsubscribe, then subscribe
    unsub, sub = (json.loads(m) for m in feed.take_outgoing())
    assert (unsub["method"], unsub["params"]) == ("public/unsubscribe", {"channels": ["book.BTC-24SEP21-8000-P.raw"]})
    assert (sub["method"], sub["params"]) == ("public/subscribe", {"channels": ["book.BTC-24SEP21-8000-P.raw"]})
    # the snapshot that answers it rebuilds the book and records resume
    again = run(feed, frames[:3])
    assert [type(r) for r in again] == [OrderBook] * 3 and (again[-1].bids, again[-1].asks) == reconstruct(frames[:3])


def test_tampered_prev_change_id_gives_one_gap():
    frames = lines(BOOK4)
    data = json.loads(frames[2])
    data["params"]["data"]["prev_change_id"] += 1
    out = run(DeribitFeed(), [frames[0], frames[1], json.dumps(data).encode(), frames[3]])
    assert [type(r) for r in out] == [OrderBook, OrderBook, Gap]
    assert (out[2].from_sequence, out[2].to_sequence) == (33195894765 + 1, 33195894765 + 1)


def test_a_refused_level_gives_an_invalid_gap_and_a_resubscription():
    frames = lines(BOOK4)
    data = json.loads(frames[1])
    data["params"]["data"]["bids"][0][2] = -4.6  # a negative amount: no plain decimal, refused by the book
    feed = DeribitFeed()
    out = run(feed, [frames[0], json.dumps(data).encode(), *frames[2:]])
    assert [type(r) for r in out] == [OrderBook, Gap] and feed.errors == {"invalid level": 1}
    change = data["params"]["data"]
    assert (out[1].reason, out[1].from_sequence, out[1].to_sequence) == (
        "invalid", change["prev_change_id"] + 1, change["change_id"])
    assert [json.loads(m)["method"] for m in feed.take_outgoing()] == ["public/unsubscribe", "public/subscribe"]
    assert len(run(feed, lines(BOOK4))) == 4


def test_disconnect_gives_gap_and_resets_books():
    feed = DeribitFeed()
    run(feed, lines(BOOK4))
    [gap] = feed.on_disconnect(1626993800000)
    assert (gap.reason, gap.stream_type, gap.from_sequence, gap.to_sequence) == ("disconnect", "orderbook",
                                                                                 33195896888, None)
    assert (gap.started_at, gap.ended_at, gap.timestamp) == (1626993737197, 1626993800000, 1626993800000)
    assert run(feed, lines(BOOK4)[1:]) == []  # changes without a snapshot are not applied
    assert feed.on_disconnect(1626993900000) == []  # no live book, nothing more lost
    assert len(run(feed, lines(BOOK4))) == 4


# -- protocol frames and bad input ----------------------------------------------------------------------------
def test_heartbeat_test_request_is_answered():
    # public/set_heartbeat: "Your software should respond to test_request messages by sending a
    # /api/v2/public/test request" (https://docs.deribit.com/api-reference/session-management/public-set_heartbeat)
    feed = DeribitFeed()
    assert run(feed, [b'{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"test_request"}}']) == []
    [answer] = feed.take_outgoing()
    assert json.loads(answer)["method"] == "public/test"
    assert run(feed, [b'{"jsonrpc":"2.0","method":"heartbeat","params":{"type":"heartbeat"}}']) == []
    assert feed.take_outgoing() == [] and not feed.errors


def test_responses_are_silent_and_errors_counted():
    feed = DeribitFeed()
    # documented success responses: public/set_heartbeat's example and public/get_order_book's
    assert run(feed, [b'{"jsonrpc":"2.0","id":1569,"result":"ok"}']) == []
    assert run(feed, lines("order_book_rest_docs_example.json")) == []
    assert not feed.errors
    # the documented error response format (https://docs.deribit.com/articles/errors)
    error = (b'{"jsonrpc":"2.0","error":{"code":13009,"message":"invalid_token","data":{"reason":"token has expired",'
             b'"param":"access_token"}},"usIn":1704153600000000,"usOut":1704153600001234,"usDiff":1234,"id":42}')
    assert run(feed, [error]) == []
    assert feed.errors == {"error response": 1}


def test_bad_input_is_counted_never_raised():
    feed = DeribitFeed()
    trade = lines("trades_ws_BTC-PERPETUAL_2021-03-21_crypto-msg-parser.json")[0]
    bad = [
        trade[:90],                                                   # truncated JSON
        trade.replace(b'"price":56168.0', b'"price":true', 1),         # wrong type
        trade.replace(b'"timestamp":1616321478553', b'"timestamp":"x"', 1),
        trade.replace(b'"direction":"buy"', b'"direction":"up"', 1),   # not a side
        trade.replace(b'trades.BTC-PERPETUAL.raw', b'nonsense.BTC', 1),  # unknown channel
        lines("volatility_index_ws_docs_example_data.json")[0],      # a data object without its envelope
        b'[1,2,3]',
    ]
    assert run(feed, bad) == []
    assert sum(feed.errors.values()) == len(bad)
    assert (feed.errors["unknown side"], feed.errors["unknown channel"], feed.errors["unknown message"]) == (1, 1, 1)
