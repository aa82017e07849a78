"""`marketprism replay --exchange FEED FILE...` as a subprocess (DESIGN.md §4 contract) on the recorded
fixtures of every feed. All runs start together in one module fixture (they are independent processes)
so the module stays fast; each test then checks one run's stdout, stderr and exit code."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from replay_cli_support import *  # noqa: F403 - the shared scenarios and the `runs` fixture
from replay_cli_support import runs  # noqa: F401 - pytest finds the fixture by name here
def test_every_run_exits_0_with_valid_records_and_one_summary_line(runs):
    for name, run in runs.items():
        if name == "depth_negative":
            continue
        assert run.returncode == 0, (name, run.stderr)
        n_lines, made, _, _ = run.summary()
        assert made == (", ".join(f"{k}={v}" for k, v in sorted(run.counts().items())) or "none"), name
        for rec in run.out:
            check_record(rec)


# -- binance spot ----------------------------------------------------------------------------------------

def test_binance_spot_trades(runs):
    run = runs["spot_plain"]
    assert run.summary() == (301, "orderbook=198, trade=100", 0, None)
    trades = run.of("trade")
    assert len(trades) == 100 and run.out[:100] == trades  # the trade file comes first, in order
    first = trades[0]
    assert run.started_ms <= first["received_at"] <= run.ended_ms  # bare lines: collector clock at replay
    assert first == {"data_type": "trade", "exchange": "binance", "market_type": "spot", "symbol": "BTC-USDT",
                     "instrument": "BTCUSDT", "timestamp": 1723161255342, "received_at": first["received_at"],
                     "trade_id": "3735683259", "price": "61837.63000000", "quantity": "0.02000000", "side": "sell"}
    raw = [line["data"] for line in lines(SPOT_TRADES)]
    assert [(r["trade_id"], r["price"], r["quantity"], r["timestamp"], r["side"]) for r in trades] == \
        [(str(d["t"]), d["p"], d["q"], d["T"], "sell" if d["m"] else "buy") for d in raw]
    assert all(r["received_at"] == first["received_at"] for r in trades)


def _book_from(snapshot: dict, diffs: list[dict], applied: list[int]) -> tuple[dict, dict]:
    """An independent book: the snapshot, then exactly the diffs whose u is in `applied`."""
    bids = {Decimal(p): (p, q) for p, q in snapshot["bids"]}
    asks = {Decimal(p): (p, q) for p, q in snapshot["asks"]}
    wanted = set(applied)
    for d in diffs:
        if d["u"] not in wanted:
            continue
        for side, levels in ((bids, d["b"]), (asks, d["a"])):
            for p, q in levels:
                if Decimal(q) == 0:
                    side.pop(Decimal(p), None)
                else:
                    side[Decimal(p)] = (p, q)
    return bids, asks


def _top(side: dict, reverse: bool, n: int) -> list[list[str]]:
    return [list(side[k]) for k in sorted(side, reverse=reverse)[:n]]


def test_binance_spot_book_snapshot_and_diffs(runs):
    run = runs["spot_gz"]
    assert run.summary() == (301, "orderbook=198, trade=100", 0, None)
    books = run.of("orderbook")
    assert len(books) == 198 and "gap" not in run.counts()
    snapshot = json.loads(text(SPOT_BOOK[0]))
    diffs = [line["data"] for line in lines(SPOT_BOOK[1])]
    lid = snapshot["lastUpdateId"]
    # spot rule: drop u <= lastUpdateId; the first applied has U <= lastUpdateId + 1 <= u; then U = u + 1
    applied = [d for d in diffs if d["u"] > lid]
    assert applied[0]["U"] <= lid + 1 <= applied[0]["u"]
    assert all(b["U"] == a["u"] + 1 for a, b in zip(applied, applied[1:]))
    assert [b["sequence"] for b in books] == [d["u"] for d in applied]
    assert [b["timestamp"] for b in books] == [d["E"] for d in applied]
    for b in books:
        assert (b["exchange"], b["market_type"], b["symbol"], b["instrument"]) == ("binance", "spot", "BTC-USDT", "BTCUSDT")
        assert 0 < len(b["bids"]) <= 400 and 0 < len(b["asks"]) <= 400
        bid_prices = [Decimal(p) for p, _ in b["bids"]]
        ask_prices = [Decimal(p) for p, _ in b["asks"]]
        assert bid_prices == sorted(bid_prices, reverse=True) and ask_prices == sorted(ask_prices)
        assert bid_prices[0] < ask_prices[0]
        assert all(Decimal(q) > 0 for _, q in b["bids"] + b["asks"])
    assert len(books[-1]["bids"]) == 400 and len(books[-1]["asks"]) == 400
    bids, asks = _book_from(snapshot, diffs, [d["u"] for d in applied])
    assert books[-1]["bids"] == _top(bids, True, 400)
    assert books[-1]["asks"] == _top(asks, False, 400)


def test_binance_spot_book_depth_10(runs):
    full, top10 = runs["spot_gz"].of("orderbook"), runs["spot_plain"].of("orderbook")
    assert len(top10) == 198
    for a, b in zip(full, top10):
        assert len(b["bids"]) == 10 and len(b["asks"]) == 10
        assert b["bids"] == a["bids"][:10] and b["asks"] == a["asks"][:10]
        assert b["sequence"] == a["sequence"]


def test_negative_depth_is_rejected(runs):
    """DESIGN.md §4: bad input gives a one-line error and a non-zero exit (not an order book of 'all but one')."""
    run = runs["depth_negative"]
    err = run.stderr.strip().splitlines()
    assert run.returncode == 2, f"exit {run.returncode}; first book has {len(run.out[0].get('bids', []))} bids"
    assert len(err) == 1 and "depth" in err[0]
    assert run.out == []


def test_gzip_input_is_read(runs):
    plain, gz = runs["spot_plain"].of("trade"), runs["spot_gz"].of("trade")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "received_at"} for r in rs]  # noqa: E731
    assert len(gz) == 100
    assert strip(gz) == strip(plain)


def test_unparseable_lines_are_counted_not_fatal(runs):
    run = runs["spot_bad"]
    assert run.returncode == 0
    n_lines, made, bad, reasons = run.summary()
    assert bad == 3  # garbage, truncated JSON, an object that is no message; the blank line is no error
    assert reasons is not None and sum(int(n) for n in re.findall(r": (\d+)", reasons)) == 3
    # the truncated line was trade 3735683260: the trade stream reports it missing
    assert made == "gap=1, trade=2"
    assert [r.get("trade_id") for r in run.out] == ["3735683259", None, "3735683261"]
    gap = run.out[1]
    assert {k: gap[k] for k in ("data_type", "stream_type", "reason", "from_sequence", "to_sequence", "symbol")} == {
        "data_type": "gap", "stream_type": "trade", "reason": "sequence", "from_sequence": 3735683260,
        "to_sequence": 3735683260, "symbol": "BTC-USDT"}
    assert (gap["started_at"], gap["ended_at"]) == (1723161255342, run.out[2]["timestamp"])


# -- binance usdm ----------------------------------------------------------------------------------------

def test_binance_usdm_trades(runs):
    run = runs["usdm"]
    trades = run.of("trade")
    assert run.out[:100] == trades
    raw = [line["data"] for line in lines(USDM_TRADES)]
    assert trades[0] == {"data_type": "trade", "exchange": "binance", "market_type": "perpetual",
                         "symbol": "BTC-USDT", "instrument": "BTCUSDT", "timestamp": 1723161256322,
                         "received_at": trades[0]["received_at"], "trade_id": "5266583935", "price": "61800.30",
                         "quantity": "0.006", "side": "buy"}
    assert [(r["trade_id"], r["price"], r["quantity"], r["timestamp"], r["side"]) for r in trades] == \
        [(str(d["t"]), d["p"], d["q"], d["T"], "sell" if d["m"] else "buy") for d in raw]


def test_binance_usdm_summary(runs):
    run = runs["usdm"]
    n_lines, made, bad, reasons = run.summary()
    assert (n_lines, bad, reasons) == (100 + 256 + 201 + 10, 1, "ratio body without its source: 1")
    assert run.counts() == {"trade": 100, "orderbook": 252 + 196, "open_interest": 2, "funding_rate": 4,
                            "liquidation": 2, "lsr_top_position": 1, "lsr_all_account": 1}


@pytest.mark.parametrize("pair, symbol, count", [(SUSHI_BOOK, "SUSHIUSDT", 252), (USDM_BTC_BOOK, "BTCUSDT", 196)])
def test_binance_usdm_books_chain_by_pu(runs, pair, symbol, count):
    """../shared/fixtures PROVENANCE.md: SUSHIUSDT has 252 diffs applying after the snapshot; BTCUSDT's
    first bridging diff is #5 of 200, so 196 apply. Every pu equals the previous u: no gap."""
    run = runs["usdm"]
    assert "gap" not in run.counts()
    books = [b for b in run.of("orderbook") if b["instrument"] == symbol]
    assert len(books) == count
    snapshot = json.loads(text(pair[0]))
    diffs = [line["data"] for line in lines(pair[1])]
    assert all(b["pu"] == a["u"] for a, b in zip(diffs, diffs[1:]))
    applied = [d for d in diffs if d["u"] >= snapshot["lastUpdateId"]]
    assert applied[0]["U"] <= snapshot["lastUpdateId"] <= applied[0]["u"]
    assert [b["sequence"] for b in books] == [d["u"] for d in applied]
    assert [b["timestamp"] for b in books] == [d["E"] for d in applied]
    assert {(b["exchange"], b["market_type"], b["symbol"]) for b in books} == \
        {("binance", "perpetual", f"{symbol[:-4]}-USDT")}
    assert all(0 < len(b["bids"]) <= 400 and 0 < len(b["asks"]) <= 400 for b in books)
    bids, asks = _book_from(snapshot, diffs, [d["u"] for d in applied])
    assert books[-1]["bids"] == _top(bids, True, 400)
    assert books[-1]["asks"] == _top(asks, False, 400)


def test_binance_usdm_rest_and_event_streams(runs):
    run = runs["usdm"]
    now = run.out[0]["received_at"]
    base = {"exchange": "binance", "market_type": "perpetual", "symbol": "BTC-USDT", "instrument": "BTCUSDT"}
    oi_first, oi_valued = run.of("open_interest")
    assert oi_first == {**base, "data_type": "open_interest", "timestamp": 1654336844754, "received_at": now,
                        "open_interest": "84617.188", "open_interest_value": None}
    assert oi_valued == {**oi_first, "open_interest_value": format(Decimal("84617.188") * Decimal("58940.14924532"), "f")}
    funding = run.of("funding_rate")
    assert funding[0] == {**base, "data_type": "funding_rate", "timestamp": 1617308820003, "received_at": now,
                          "funding_rate": "0.00058455", "funding_time": 1617321600000,
                          "mark_price": "58940.14924532", "index_price": "58857.26693664"}
    # !markPrice@arr inside a recording envelope: both symbols, the envelope's receipt time
    assert [(f["instrument"], f["symbol"], f["funding_rate"], f["mark_price"], f["index_price"], f["funding_time"],
             f["timestamp"], f["received_at"]) for f in funding[1:3]] == [
        ("BTCUSDT", "BTC-USDT", "0.00058959", "59022.53514719", "58936.68384000", 1617321600000, 1617309024002,
         ENVELOPE_MS),
        ("ETHUSDT", "ETH-USDT", "0.00059142", "1981.15704420", "1978.08197502", 1617321600000, 1617309024002,
         ENVELOPE_MS)]
    assert funding[3] == {**base, "data_type": "funding_rate", "timestamp": 1597370495002, "received_at": now,
                          "funding_rate": "0.00038246", "funding_time": 1597392000000,
                          "mark_price": "11793.63104562", "index_price": "11781.80495970"}
    assert run.of("liquidation") == [
        {**base, "data_type": "liquidation", "timestamp": 1665523974217, "received_at": now, "side": "sell",
         "price": "18917.15", "quantity": "0.009"},
        {"data_type": "liquidation", "exchange": "binance", "market_type": "perpetual", "symbol": "IOTX-USDT",
         "instrument": "IOTXUSDT", "timestamp": 1634653599180, "received_at": now, "side": "sell",
         "price": "0.06606", "quantity": "3661"}]
    assert run.of("lsr_top_position") == [
        {**base, "data_type": "lsr_top_position", "timestamp": 1591261042378, "received_at": ENVELOPE_MS,
         "period": "5m", "long_short_ratio": "1.4342", "long_ratio": "0.5344", "short_ratio": "0.4238"}]
    assert run.of("lsr_all_account") == [
        {**base, "data_type": "lsr_all_account", "timestamp": 1591261042378, "received_at": ENVELOPE_MS,
         "period": "5m", "long_short_ratio": "0.1960", "long_ratio": "0.6622", "short_ratio": "0.3378"}]


# -- okx -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, instrument, market_type, symbol", [
    (98, "BTC-USDT", "spot", "BTC-USDT"),
    (93, "UNI-USD-SWAP", "perpetual", "UNI-USD"),
])
def test_okx_books(runs, count, instrument, market_type, symbol):
    run = runs["okx"]
    assert "gap" not in run.counts()
    books = [b for b in run.of("orderbook") if b["instrument"] == instrument]
    assert len(books) == count
    assert {(b["exchange"], b["market_type"], b["symbol"]) for b in books} == {("okx", market_type, symbol)}
    seqs = [b["sequence"] for b in books]
    assert seqs == sorted(seqs) and len(set(seqs)) == count
    assert all(0 < len(b["bids"]) <= 400 and 0 < len(b["asks"]) <= 400 for b in books)
    assert all(Decimal(b["bids"][0][0]) < Decimal(b["asks"][0][0]) for b in books)


def test_okx_other_channels(runs):
    run = runs["okx"]
    n_lines, made, bad, _ = run.summary()
    assert bad == 0
    assert run.counts() == {"orderbook": 98 + 93, "trade": 73, "funding_rate": 4, "liquidation": 2,
                            "open_interest": 5, "lsr_all_account": 1}
    liq = {r["instrument"]: r for r in run.of("liquidation")}
    assert liq["XRP-USD-230929"] == {
        "data_type": "liquidation", "exchange": "okx", "market_type": "futures", "symbol": "XRP-USD-230929",
        "instrument": "XRP-USD-230929", "timestamp": 1680173247614, "received_at": liq["XRP-USD-230929"]["received_at"],
        "side": "buy", "price": "0.55205", "quantity": "39"}
    assert run.of("lsr_all_account") == [
        {"data_type": "lsr_all_account", "exchange": "okx", "market_type": "perpetual", "symbol": "BTC",
         "instrument": "BTC", "timestamp": 1630502100000, "received_at": ENVELOPE_MS, "period": "5m",
         "long_short_ratio": "1.25", "long_ratio": None, "short_ratio": None}]
    fr = {r["instrument"]: r for r in run.of("funding_rate")}
    assert fr["BTC-USDT-SWAP"]["funding_rate"] == "0.0001534702159002"
    assert fr["BTC-USDT-SWAP"]["funding_time"] == 1646323200000
    assert {r["market_type"] for r in run.of("trade")} == {"spot", "perpetual"}


# -- deribit ---------------------------------------------------------------------------------------------

def test_deribit(runs):
    run = runs["deribit"]
    assert run.summary()[2:] == (0, None)
    assert run.counts() == {"orderbook": 31 + 4 + 2, "funding_rate": 1, "open_interest": 1, "trade": 4,
                            "volatility_index": 1}
    books = run.of("orderbook")
    for inst in ("BTC-24SEP21-8000-P", "BTC-31DEC21-34000-P"):
        chain = [line["params"]["data"] for line in lines(f"deribit/book_raw_{inst}_2021-07-22_cryptofeed.jsonl")]
        got = [b for b in books if b["instrument"] == inst]
        assert [b["sequence"] for b in got] == [d["change_id"] for d in chain]
        assert {(b["market_type"], b["exchange"]) for b in got} == {("options", "deribit")}
    perp = [b for b in books if b["instrument"] == "BTC-PERPETUAL"]
    assert [(b["sequence"], b["symbol"], b["market_type"]) for b in perp] == \
        [(297217, "BTC-USD", "perpetual"), (297218, "BTC-USD", "perpetual")]
    assert perp[0]["bids"] == [["5042.34", "30"], ["5041.94", "20"]]
    assert perp[1]["bids"] == [] and perp[1]["asks"] == [["5042.64", "40"], ["5043.3", "40"]]
    assert run.of("volatility_index") == [
        {"data_type": "volatility_index", "exchange": "deribit", "market_type": "options", "symbol": "BTC",
         "instrument": "btc_usd", "timestamp": 1619777946007, "received_at": run.out[0]["received_at"],
         "value": "129.36"}]
    trades = {r["trade_id"]: (r["market_type"], r["symbol"]) for r in run.of("trade")}
    assert trades == {"137487241": ("perpetual", "BTC-USD"), "137487242": ("perpetual", "BTC-USD"),
                      "137486952": ("futures", "BTC-USD-210326"),
                      "137488100": ("options", "BTC-USD-210326-62000-C")}


# -- bybit -----------------------------------------------------------------------------------------------

def test_bybit_spot(runs):
    run = runs["bybit_spot"]
    assert run.summary() == (4, "orderbook=2, trade=1", 0, None)
    assert run.of("trade")[0] | {"received_at": 0} == {
        "data_type": "trade", "exchange": "bybit", "market_type": "spot", "symbol": "BTC-USDT",
        "instrument": "BTCUSDT", "timestamp": 1682084122521, "received_at": 0,
        "trade_id": "2100000000019296063", "price": "27200", "quantity": "0.000221", "side": "buy"}
    books = run.of("orderbook")
    assert [b["sequence"] for b in books] == [1323396, 1323397]
    assert len(books[0]["bids"]) == 50 and len(books[0]["asks"]) == 50


def test_bybit_linear(runs):
    run = runs["bybit_linear"]
    n_lines, made, bad, reasons = run.summary()
    assert (bad, reasons) == (1, "ratio body without its source: 1")
    assert run.counts() == {"trade": 1, "orderbook": 4, "funding_rate": 1, "open_interest": 6, "liquidation": 2,
                            "lsr_all_account": 2}
    assert [(b["instrument"], b["sequence"]) for b in run.of("orderbook")] == \
        [("BTCUSDT", 7003305), ("BTCUSDT", 7003306), ("BTCPERP", 20683568), ("BTCPERP", 20683569)]
    liq = run.of("liquidation")
    assert [(r["symbol"], r["side"], r["price"], r["quantity"], r["timestamp"]) for r in liq] == [
        ("PIPPIN-USDT", "buy", "0.02456", "2846", 1740480207110),  # "S": "Sell": a short was liquidated
        ("ROSE-USDT", "buy", "0.04499", "20000", 1739502302929)]
    lsr = run.of("lsr_all_account")
    assert [(r["timestamp"], r["period"], r["long_ratio"], r["short_ratio"], r["received_at"]) for r in lsr] == [
        (1696258800000, "1h", "0.4927", "0.5073", ENVELOPE_MS), (1696262400000, "1h", "0.49", "0.51", ENVELOPE_MS)]
    assert Decimal(lsr[1]["long_short_ratio"]) == (Decimal("0.49") / Decimal("0.51")).quantize(Decimal("1e-8"))
