"""Bybit v5 spot and linear parsing and the u-chained books on real recordings and documentation examples
(tests/fixtures/bybit, provenance in tests/fixtures/PROVENANCE.md)."""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest

from marketprism.exchanges import make_feed
from marketprism.exchanges.bybit import BybitLinearFeed, BybitSpotFeed, ratio
from marketprism.records import FundingRate, Gap, Liquidation, LsrAllAccount, OpenInterest, OrderBook, Trade
from marketprism.replay import replay

FIX = Path(__file__).parent / "fixtures" / "bybit"
RATIO_SOURCE = ("https://api.bybit.com/v5/market/account-ratio?category=linear&symbol=BTCUSDT&period=1h&limit=2"
                "&startTime=1696089600000&endTime=1696262400000")  # the docs' request for their response example
BOOK_PAIRS = [  # (file, feed): snapshot + delta, u chained
    ("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl", BybitSpotFeed),
    ("orderbook50_spot_BTCUSDT_2023-04-05_tardis.jsonl", BybitSpotFeed),
    ("orderbook1_spot_BTCUSDT_2023-04-05_tardis.jsonl", BybitSpotFeed),
    ("orderbook1_linear_BTCUSDT_2023-04-05_tardis.jsonl", BybitLinearFeed),
    ("orderbook50_linear_BTCPERP_2023-04-05_tardis.jsonl", BybitLinearFeed),
]


def lines(name: str) -> list[bytes]:
    return [line for line in (FIX / name).read_bytes().splitlines() if line.strip()]


def run(feed, frames, received_at=7):
    return list(replay(feed, frames, received_at=received_at))


def envelope(source: str, body: bytes, received_at: int = 9) -> bytes:
    """The `marketprism record` envelope (DESIGN.md §4) that tells a REST body's request apart."""
    return json.dumps({"received_at": received_at, "source": source, "data": body.decode()}).encode()


# -- trades ---------------------------------------------------------------------------------------------
def test_spot_trade_exact():
    assert run(BybitSpotFeed(), lines("public_trade_spot_BTCUSDT_2023-04-21_roq.json")) == [
        Trade(exchange="bybit", market_type="spot", symbol="BTC-USDT", instrument="BTCUSDT", timestamp=1682084122521,
              received_at=7, trade_id="2100000000019296063", price="27200", quantity="0.000221", side="buy")]


def test_linear_trade_exact():
    assert run(BybitLinearFeed(), lines("public_trade_linear_BTCUSDT_2025-09-26_hftbacktest.json")) == [
        Trade(exchange="bybit", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
              timestamp=1758841135823, received_at=7, trade_id="2a74ac78-691c-5b54-9dbe-5aafe8364627",
              price="109378.90", quantity="0.020", side="buy")]


def test_docs_trade_example():
    [t] = run(make_feed("bybit_linear"), lines("public_trade_docs_example.json"))
    assert (t.trade_id, t.price, t.quantity, t.side, t.timestamp) == ("20f43950-d8dd-5b31-9112-a178eb6023af",
                                                                      "16578.50", "0.001", "buy", 1672304486865)


# -- plans ----------------------------------------------------------------------------------------------
def test_linear_subscriptions_are_chunked_and_polls_planned():
    feed = make_feed("bybit_linear")
    [sub] = feed.subscriptions(("BTC-USDT", "ETH-USDT", "SOL-USDT"),
                               ("trade", "orderbook", "funding_rate", "liquidation", "lsr_all_account"))
    assert sub.path == "/v5/public/linear"
    frames = [json.loads(m) for m in sub.messages]
    assert [f["op"] for f in frames] == ["subscribe", "subscribe"]
    assert [len(f["args"]) for f in frames] == [10, 2]  # at most 10 args per request (the spot limit)
    assert frames[0]["args"][:4] == ["publicTrade.BTCUSDT", "orderbook.1000.BTCUSDT", "tickers.BTCUSDT",
                                     "allLiquidation.BTCUSDT"]
    assert [p.path for p in feed.polls(("BTC-USDT",), ("lsr_all_account", "lsr_top_position"))] == [
        "/v5/market/account-ratio?category=linear&symbol=BTCUSDT&period=5min&limit=50"]
    assert (feed.ping_frame, feed.ping_interval_s) == ('{"op":"ping"}', 20.0)


@pytest.mark.parametrize("depth,topic", [(400, "orderbook.1000.BTCUSDT"), (200, "orderbook.200.BTCUSDT"),
                                         (50, "orderbook.50.BTCUSDT"), (20, "orderbook.50.BTCUSDT")])
def test_book_topic_covers_depth(depth, topic):
    [sub] = BybitSpotFeed(depth=depth).subscriptions(("BTC-USDT",), ("orderbook",))
    assert sub.path == "/v5/public/spot" and json.loads(sub.messages[0])["args"] == [topic]
    assert BybitSpotFeed().polls(("BTC-USDT",), ("lsr_all_account",)) == []


# -- order books ----------------------------------------------------------------------------------------
def reconstruct(frames: list[bytes]) -> tuple[list, list]:
    """The book after the frames from the documented rules, with plain dicts (no Book class)."""
    sides: dict[str, dict] = {"b": {}, "a": {}}
    for frame in frames:
        msg = json.loads(frame)
        if msg["type"] == "snapshot":
            sides = {"b": {}, "a": {}}
        for side in ("b", "a"):
            for price, qty in msg["data"][side]:
                if Decimal(qty) == 0:
                    sides[side].pop(Decimal(price), None)
                else:
                    sides[side][Decimal(price)] = (price, qty)
    return ([sides["b"][k] for k in sorted(sides["b"], reverse=True)], [sides["a"][k] for k in sorted(sides["a"])])


@pytest.mark.parametrize("name,cls", BOOK_PAIRS)
def test_book_pair_has_no_gap_and_matches_reconstruction(name, cls):
    frames = lines(name)
    out = run(cls(), frames)
    assert len(out) == len(frames) and all(isinstance(r, OrderBook) for r in out)
    assert [r.sequence for r in out] == [json.loads(f)["data"]["u"] for f in frames]
    assert [r.timestamp for r in out] == [json.loads(f)["ts"] for f in frames]  # no cts in these recordings
    assert (out[-1].bids, out[-1].asks) == reconstruct(frames)


def test_first_book_record_exact():
    snap, delta = run(BybitSpotFeed(), lines("orderbook50_spot_BTCUSDT_2023-04-05_tardis.jsonl"))
    assert snap == OrderBook(exchange="bybit", market_type="spot", symbol="BTC-USDT", instrument="BTCUSDT",
                             timestamp=1680652808065, received_at=7, sequence=59438060,
                             bids=[("28162.57", "0.07562")], asks=[("28162.58", "0.506829")])
    # the delta adds a bid and deletes two levels this trimmed snapshot never had
    assert (delta.sequence, delta.bids, delta.asks) == (59438061, [("28162.57", "0.07562"), ("28161.04", "0.177474")],
                                                        [("28162.58", "0.506829")])


def test_full_50_level_snapshot_and_depth_limit():
    frames = lines("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")
    snap = run(BybitSpotFeed(), frames[:1])[0]
    assert len(snap.bids) == len(snap.asks) == 50
    assert (snap.bids[0], snap.bids[-1], snap.asks[0], snap.asks[-1]) == (
        ("27579.99", "0.031443"), ("27333.32", "0.000341"), ("27580", "0.080386"), ("27670.21", "0.001161"))
    top = run(BybitSpotFeed(depth=3), frames)[-1]
    assert top.bids == [("27579.99", "0.031244"), ("27579.97", "0.085285"), ("27579.95", "0.084408")]
    assert top.asks == [("27580", "0.080386"), ("27580.14", "0.038662"), ("27580.76", "0.000186")]


def test_book_timestamp_is_matching_engine_cts():
    [rec] = run(BybitLinearFeed(), lines("orderbook1_snapshot_linear_BTCUSDT_2025-09-26_hftbacktest.json"))
    assert (rec.timestamp, rec.sequence, rec.bids, rec.asks) == (1758841134598, 14869255, [("109378.80", "1.273")],
                                                                [("109378.90", "6.278")])


def test_repeated_level1_snapshot_with_same_u_gives_no_new_record():
    frame = lines("orderbook1_snapshot_linear_BTCUSDT_2025-09-26_hftbacktest.json")
    feed = BybitLinearFeed()
    assert len(run(feed, frame)) == 1 and run(feed, frame) == [] and not feed.errors


def test_tampered_u_gives_one_gap_and_silence_until_snapshot():
    snapshot, delta = lines("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")
    skipped = delta.replace(b'"u":1323397', b'"u":1323398')
    feed = BybitSpotFeed()
    out = run(feed, [snapshot, skipped, delta])
    assert [type(r) for r in out] == [OrderBook, Gap]
    gap = out[1]
    assert (gap.stream_type, gap.reason, gap.symbol, gap.from_sequence, gap.to_sequence) == (
        "orderbook", "sequence", "BTC-USDT", 1323397, 1323397)
    assert (gap.started_at, gap.ended_at) == (1682083230023, 1682083231922)
    unsub, sub = (json.loads(m) for m in feed.take_outgoing())
    assert unsub == {"op": "unsubscribe", "args": ["orderbook.50.BTCUSDT"]}
    assert sub == {"op": "subscribe", "args": ["orderbook.50.BTCUSDT"]}
    again = run(feed, [snapshot, delta])
    assert [type(r) for r in again] == [OrderBook, OrderBook]
    assert (again[-1].bids, again[-1].asks) == reconstruct([snapshot, delta])


@pytest.mark.parametrize("bad_frame", [1, 0])
def test_a_refused_level_gives_an_invalid_gap_and_a_resubscription(bad_frame):
    frames = lines("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")
    snapshot, delta = frames
    frames[bad_frame] = frames[bad_frame].replace(b'"0.031', b'"1e5', 1)  # float() would take it
    feed = BybitSpotFeed()
    out = run(feed, frames)
    gaps = [r for r in out if isinstance(r, Gap)]
    assert len(gaps) == 1 and feed.errors == {"invalid level": 1}
    expected = (1323397, 1323397) if bad_frame else (None, json.loads(snapshot)["data"]["u"])
    assert (gaps[0].reason, gaps[0].from_sequence, gaps[0].to_sequence) == ("invalid", *expected)
    assert [json.loads(m)["op"] for m in feed.take_outgoing()] == ["unsubscribe", "subscribe"]
    assert out[-1] is gaps[0]  # nothing after it: the refused snapshot's delta is not applied either
    again = run(feed, [snapshot, delta])
    assert (again[-1].bids, again[-1].asks) == reconstruct([snapshot, delta])


def test_snapshot_mid_stream_replaces_the_book():
    # Bybit resends a snapshot after a service restart ("If you receive a new snapshot message, you will
    # have to reset your local orderbook"): the later recording's snapshot replaces the earlier book.
    earlier = lines("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")
    later = lines("orderbook50_spot_BTCUSDT_2023-04-05_tardis.jsonl")
    out = run(BybitSpotFeed(), earlier + later[:1])
    assert [type(r) for r in out] == [OrderBook] * 3
    assert (out[-1].sequence, out[-1].bids, out[-1].asks) == (59438060, [("28162.57", "0.07562")],
                                                              [("28162.58", "0.506829")])


def test_disconnect_gives_gap_and_resets_books():
    feed = BybitLinearFeed()
    run(feed, lines("orderbook1_linear_BTCUSDT_2023-04-05_tardis.jsonl"))
    [gap] = feed.on_disconnect(1680673900000)
    assert (gap.reason, gap.from_sequence, gap.to_sequence, gap.started_at, gap.ended_at) == (
        "disconnect", 7003307, None, 1680673821137, 1680673900000)
    assert run(feed, lines("orderbook1_linear_BTCUSDT_2023-04-05_tardis.jsonl")[1:]) == []


# -- tickers: funding and open interest --------------------------------------------------------------
def test_linear_ticker_snapshot_exact():
    funding, oi = run(BybitLinearFeed(), lines("tickers_linear_BTCUSDT_2023-04-22_roq.json"))
    assert funding == FundingRate(exchange="bybit", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
                                  timestamp=1682169027329, received_at=7, funding_rate="0.0001",
                                  funding_time=1682179200000, mark_price="27342.30", index_price="27349.74")
    assert oi == OpenInterest(exchange="bybit", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
                              timestamp=1682169027329, received_at=7, open_interest="92578.634",
                              open_interest_value="2531312784.42")


def test_linear_ticker_docs_example():
    funding, oi = run(BybitLinearFeed(), lines("tickers_linear_docs_example.json"))
    assert (funding.funding_rate, funding.funding_time, funding.mark_price, funding.index_price) == (
        "-0.005", 1760342400000, "66666.60", "115418.19")
    assert (oi.open_interest, oi.open_interest_value, oi.timestamp) == ("492373.72", "32824881841.75", 1760325052630)


def test_ticker_delta_is_merged_and_only_changes_are_emitted():
    # Live snapshot + delta (inverse BTCUSD: the only recorded tickers delta); the delta carries only
    # changed fields: open interest moved, the funding rate repeated unchanged.
    feed = BybitLinearFeed()
    first = run(feed, lines("tickers_inverse_BTCUSD_snapshot_delta_2023-04-05_tardis.jsonl")[:1])
    assert [type(r) for r in first] == [FundingRate, OpenInterest]
    [oi] = run(feed, lines("tickers_inverse_BTCUSD_snapshot_delta_2023-04-05_tardis.jsonl")[1:])
    assert oi == OpenInterest(exchange="bybit", market_type="perpetual", symbol="BTC-USD", instrument="BTCUSD",
                              timestamp=1680673822776, received_at=7, open_interest="449736674",
                              open_interest_value="15747.08")  # value kept from the snapshot
    assert feed.tickers["BTCUSD"]["markPrice"] == "28560.00"


def test_spot_ticker_gives_nothing():
    feed = BybitSpotFeed()
    assert run(feed, lines("tickers_spot_BTCUSDT_2023-04-21_roq.json")) == [] and not feed.errors


# -- liquidations -------------------------------------------------------------------------------------------
def test_liquidation_side_is_the_closing_order():
    # "S: Position side ... When you receive a Buy update, this means that a long position has been
    # liquidated" (https://bybit-exchange.github.io/docs/v5/websocket/public/all-liquidation): "Sell" is a
    # liquidated short, closed by a buy order.
    assert run(BybitLinearFeed(), lines("all_liquidation_docs_example.json")) == [
        Liquidation(exchange="bybit", market_type="perpetual", symbol="ROSE-USDT", instrument="ROSEUSDT",
                    timestamp=1739502302929, received_at=7, side="buy", price="0.04499", quantity="20000")]
    [liq] = run(BybitLinearFeed(), lines("all_liquidation_linear_PIPPINUSDT_2025-02-25_tardis.json"))
    assert (liq.symbol, liq.side, liq.price, liq.quantity, liq.timestamp) == ("PIPPIN-USDT", "buy", "0.02456", "2846",
                                                                              1740480207110)
    long_closed = lines("all_liquidation_docs_example.json")[0].replace(b'"S":"Sell"', b'"S":"Buy"')
    assert run(BybitLinearFeed(), [long_closed])[0].side == "sell"


# -- REST ---------------------------------------------------------------------------------------------------
def test_account_ratio_rows_oldest_first_and_deduplicated():
    feed = make_feed("bybit_linear")
    body = lines("long_short_ratio_rest_docs_example.json")[0]
    out = run(feed, [envelope(RATIO_SOURCE, body)])
    assert out == [
        LsrAllAccount(exchange="bybit", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
                      timestamp=1696258800000, received_at=9, period="1h", long_short_ratio="0.97122019",
                      long_ratio="0.4927", short_ratio="0.5073"),
        LsrAllAccount(exchange="bybit", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
                      timestamp=1696262400000, received_at=9, period="1h", long_short_ratio="0.96078431",
                      long_ratio="0.49", short_ratio="0.51"),
    ]
    for rec in out:  # the quotient to 8 places, half-even
        exact = Fraction(rec.long_ratio) / Fraction(rec.short_ratio)
        assert abs(Fraction(rec.long_short_ratio) - exact) <= Fraction(1, 2 * 10**8)
    assert run(feed, [envelope(RATIO_SOURCE, body)]) == []  # the next poll repeats the same buckets
    five = run(feed, [envelope(RATIO_SOURCE.replace("period=1h", "period=5min"), body)])
    assert [r.period for r in five] == ["5m", "5m"]
    assert run(feed, [body]) == [] and feed.errors == {"ratio body without its source": 1}


def test_ratio_quotient_is_exact_when_it_terminates():
    assert (ratio("0.6", "0.4"), ratio("0.5", "0.5"), ratio("0.8", "0.2")) == ("1.5", "1", "4")


def test_open_interest_rest_body():
    feed = make_feed("bybit_linear")
    body = lines("open_interest_rest_docs_example.json")[0]
    out = run(feed, [body])  # says what it is even without its request
    assert len(out) == 5 and all(isinstance(r, OpenInterest) for r in out)
    assert out[0] == OpenInterest(exchange="bybit", market_type="perpetual", symbol="BTC-USD", instrument="BTCUSD",
                                  timestamp=1780617600000, received_at=7, open_interest="63942311.00000000",
                                  open_interest_value=None)
    assert [r.timestamp for r in out] == sorted(r.timestamp for r in out)
    source = "https://api.bybit.com/v5/market/open-interest?category=inverse&symbol=BTCUSD&intervalTime=1d"
    assert run(feed, [envelope(source, body)]) == []  # same buckets again


# -- protocol frames and bad input --------------------------------------------------------------------------
def test_op_responses_are_silent_and_failures_counted():
    # Pong and subscribe responses as documented (https://bybit-exchange.github.io/docs/v5/ws/connect).
    feed = BybitSpotFeed()
    documented = [
        b'{"success":true,"ret_msg":"pong","conn_id":"0970e817-426e-429a-a679-ff7f55e0b16a","op":"ping"}',
        b'{"success":true,"ret_msg":"pong","conn_id":"465772b1-7630-4fdc-a492-e003e6f0f260","req_id":"","op":"ping"}',
        b'{"args":["1672916271846"],"op":"pong"}',
        b'{"success":true,"ret_msg":"","op":"subscribe","conn_id":"cejreassvfrsfvb9v1a0-2m"}',
    ]
    assert run(feed, documented) == [] and not feed.errors
    # the documented subscribe response with its `success` flag false
    assert run(feed, [documented[3].replace(b"true", b"false")]) == []
    assert feed.errors == {"request failed": 1}


def test_bad_input_is_counted_never_raised():
    feed = BybitLinearFeed()
    trade = lines("public_trade_linear_BTCUSDT_2025-09-26_hftbacktest.json")[0]
    bad = [
        trade[:70],                                                         # truncated JSON
        trade.replace(b'"T":1758841135823', b'"T":"x"'),                    # wrong type
        trade.replace(b'"p":"109378.90"', b'"p":109378.9'),                 # price not a string
        trade.replace(b'"S":"Buy"', b'"S":"Up"'),                           # not a side
        trade.replace(b'publicTrade.BTCUSDT', b'kline.1.BTCUSDT'),          # topic we do not parse
        lines("orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")[0].replace(b'"type":"snapshot"', b'"type":"x"'),
        b'{"retCode":10001,"retMsg":"params error","result":{},"time":1}',  # REST error body
        b'"text"',
    ]
    assert run(feed, bad) == []
    assert sum(feed.errors.values()) == len(bad)
    assert (feed.errors["unknown side"], feed.errors["unknown topic"], feed.errors["unknown book type"],
            feed.errors["error response"]) == (1, 1, 1, 1)
