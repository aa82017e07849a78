"""`marketprism repair` trade backfill on real chDB against the simulator's trade history endpoints: the
simulator streams trades (parsed by the live parsers), the store lacks a stretch of them plus a gap record;
repair puts back exactly the missing trades with the live parser's fields, a second run adds nothing, and
what the venue no longer serves is reported unrecoverable."""

from __future__ import annotations

from decimal import Decimal

import pytest

import marketprism.sim
from marketprism import records
from marketprism.exchanges import make_feed
from marketprism.ops import backfill, repair
from marketprism.settings import Settings
from marketprism.store import ledger, schema
from test_cold import cold_store, insert  # noqa: F401 - the fixture is used by name

SYMBOL = "BTC-USDT"
FEEDS = ("binance_spot", "okx", "bybit_linear")
KEYS = {"binance_spot": [("trade", "BTCUSDT")], "okx": [("trades", "BTC-USDT"), ("trades", "BTC-USDT-SWAP")],
        "bybit_linear": ["publicTrade.BTCUSDT"]}


@pytest.fixture
async def sim():
    simulator = await marketprism.sim.start(port=0, feeds=",".join(FEEDS), symbols=SYMBOL, rate=1)
    yield simulator
    await simulator.stop()


def stream(sim, name: str, n: int, t0: int) -> list[records.Trade]:
    """n generation steps of one feed, 7 ms apart, as the collector would have stored them."""
    feed, parser, out = sim.feeds[name], make_feed(name), []
    for key in KEYS[name]:
        feed.want(key, 1)
    for i in range(n):
        for _key, data, dtype, _n in feed.fast_events(2, t0 + 7 * i):
            if dtype == "trade":
                out += [r for r in parser.on_message(data, "ws", t0 + 7 * i) if isinstance(r, records.Trade)]
    return out


def gap(trades: list[records.Trade], lo: int, hi: int, sequenced: bool) -> records.Gap:
    first, last, before, after = trades[lo], trades[hi - 1], trades[lo - 1], trades[hi]
    return records.Gap(exchange=first.exchange, market_type=first.market_type, symbol=first.symbol,
                       instrument=first.instrument, timestamp=after.timestamp, received_at=after.timestamp,
                       stream_type="trade", reason="sequence" if sequenced else "disconnect",
                       from_sequence=int(first.trade_id) if sequenced else None,
                       to_sequence=int(last.trade_id) if sequenced else None,
                       started_at=before.timestamp, ended_at=after.timestamp)


def stored(store, exchange: str) -> dict[tuple, tuple]:
    rows = store.query(f"SELECT market_type, symbol, instrument, trade_id, price, quantity, side, "
                       f"toUnixTimestamp64Milli(timestamp) FROM {schema.HOT}.trades WHERE exchange = '{exchange}'"
                       ).result_rows
    return {(r[0], r[3]): (r[1], r[2], Decimal(r[4]), Decimal(r[5]), r[6], int(r[7])) for r in rows}


def expect(trades: list[records.Trade]) -> dict[tuple, tuple]:
    return {(t.market_type, t.trade_id): (t.symbol, t.instrument, Decimal(t.price), Decimal(t.quantity), t.side, t.timestamp)
            for t in trades}


async def test_trade_gaps_are_filled_exactly_and_once(cold_store, sim):
    t0 = ledger.now_ms() - 600_000
    binance, okx, bybit = (stream(sim, name, 400, t0) for name in FEEDS)
    okx_spot = [t for t in okx if t.market_type == "spot"]
    okx_swap = [t for t in okx if t.market_type == "perpetual"]
    holes = {"binance": (binance, 100, 350, True), "okx_spot": (okx_spot, 50, 300, False),
             "okx_swap": (okx_swap, 10, 20, False), "bybit": (bybit, len(bybit) - 300, len(bybit) - 10, False)}
    kept, gaps, missing = [], [], []
    for trades, lo, hi, sequenced in holes.values():
        kept += trades[:lo] + trades[hi:]
        missing += trades[lo:hi]
        gaps.append(gap(trades, lo, hi, sequenced))
    insert(cold_store, kept + gaps)
    settings = Settings(feeds=FEEDS, symbols=(SYMBOL,), data_types=("trade",),
                        rest_urls={f: f"{sim.url}/{f}" for f in FEEDS})
    first = await repair.repair(settings, cold_store, cold_store, ledger.hot_source("", ""), 1.0, recopy_on=False)
    items = {b["stream"]: b for b in first["backfill"]}
    assert not [b for b in first["backfill"] if "error" in b], first["backfill"]
    assert {s: (b["filled"], b["unrecoverable"]) for s, b in items.items()} == {
        "trade/binance/spot/BTC-USDT": (250, 0), "trade/okx/spot/BTC-USDT": (250, 0),
        "trade/okx/perpetual/BTC-USDT": (10, 0), "trade/bybit/perpetual/BTC-USDT": (290, 0)}
    assert first["unrecoverable"] == [] and first["ok"]
    everything = binance + okx + bybit
    for exchange in ("binance", "okx", "bybit"):
        assert stored(cold_store, exchange) == expect([t for t in everything if t.exchange == exchange])
    received = cold_store.query(f"SELECT min(toUnixTimestamp64Milli(received_at)) FROM {schema.HOT}.trades WHERE "
                                f"trade_id = '{missing[0].trade_id}'").result_rows[0][0]
    assert received >= ledger.now_ms() - 60_000  # backfilled rows are received now
    second = await repair.repair(settings, cold_store, cold_store, ledger.hot_source("", ""), 1.0, recopy_on=False)
    assert [b["filled"] for b in second["backfill"]] == [0, 0, 0, 0]


async def test_trades_beyond_the_venues_history_are_unrecoverable(cold_store, sim):
    sim.feeds["binance_spot"].tape_size = 200  # the simulator's Binance keeps its last 200 trades
    t0 = ledger.now_ms() - 600_000
    binance = stream(sim, "binance_spot", 500, t0)   # 500 trades: the first 300 are gone
    bybit = stream(sim, "bybit_linear", 1000, t0)    # more than recent-trade's 1000
    insert(cold_store, binance[:250] + binance[350:] + [gap(binance, 250, 350, True)] + bybit[:5] + bybit[700:]
           + [gap(bybit, 5, 700, False)])
    settings = Settings(feeds=("binance_spot", "bybit_linear"), symbols=(SYMBOL,), data_types=("trade",),
                        rest_urls={f: f"{sim.url}/{f}" for f in FEEDS})
    report = await repair.repair(settings, cold_store, cold_store, ledger.hot_source("", ""), 1.0, recopy_on=False)
    items = {b["stream"]: b for b in report["backfill"]}
    b = items["trade/binance/spot/BTC-USDT"]
    assert (b["filled"], b["unrecoverable"]) == (50, 50) and "beyond the venue's history" in b["note"]
    y = items["trade/bybit/perpetual/BTC-USDT"]
    oldest_served = len(bybit) - 1000
    assert y["filled"] == 700 - oldest_served and y["unrecoverable"] == 1 and "older than" in y["note"]
    assert set(stored(cold_store, "binance")) == {("spot", t.trade_id) for t in binance[:250] + binance[300:]}
    text = repair.render(report)
    assert "backfill trade/binance/spot/BTC-USDT: filled 50, unrecoverable 50" in text


async def test_trade_gaps_without_a_source_are_reported(cold_store):
    now = ledger.now_ms()
    insert(cold_store, [records.Gap(exchange="deribit", market_type="perpetual", symbol="BTC-USD",
                                    instrument="BTC-PERPETUAL", timestamp=now - 1000, received_at=now,
                                    stream_type="trade", reason="disconnect", from_sequence=None, to_sequence=None,
                                    started_at=now - 3000, ended_at=now - 1000)])
    report = await repair.repair(Settings(feeds=("okx",), symbols=(SYMBOL,), data_types=("trade",)), cold_store,
                                 cold_store, ledger.hot_source("", ""), 1.0, recopy_on=False)
    assert report["backfill"] == []
    (line,) = report["unrecoverable"]
    assert line.startswith("trade/deribit/perpetual/BTC-USD: gap ") and "not implemented for Deribit" in line


BINANCE_DOCS = (b'[{"id":28457,"price":"4.00000100","qty":"12.00000000","quoteQty":"48.000012",'
                b'"time":1499865549590,"isBuyerMaker":true,"isBestMatch":true}]')  # spot docs, Old trade lookup


def test_binance_history_parser_on_the_documented_body():
    (t,) = backfill.parse_binance_trades(BINANCE_DOCS, "BNB-BTC", 5)
    assert records.to_dict(t) == {"data_type": "trade", "exchange": "binance", "market_type": "spot",
                                  "symbol": "BNB-BTC", "instrument": "BNBBTC", "timestamp": 1499865549590,
                                  "received_at": 5, "trade_id": "28457", "price": "4.00000100",
                                  "quantity": "12.00000000", "side": "sell"}
