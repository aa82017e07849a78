"""Parse throughput: our Binance parse + normalize path against cryptofeed's Binance handler, both fed the
same real frames (tests/fixtures) in the same process, alternating, best of `rounds` each.

- binance_trade: the USDⓈ-M `@aggTrade` recording, cycled. Ours: BinanceUsdmFeed.on_message -> Trade
  records. cryptofeed: BinanceFutures.message_handler -> its Trade objects, delivered to a callback.
- binance_depth: the spot BTCUSDT `@depth@100ms` recording after its REST snapshot, cycled with the update
  ids shifted each cycle so that the chain never breaks. Both sides apply every diff to a book seeded with
  the snapshot. Ours also builds, per diff, the `orderbook` record of the top 400 levels per side (what
  `replay` emits); cryptofeed delivers its OrderBook with the diff's Decimal delta (what its callbacks and
  backends receive). Ours does at least as much output work.

Throughput is messages per second of CPU time of the parsing thread, so that other work on the machine
does not count against either side.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import orjson

from marketprism.exchanges.base import split_symbol
from marketprism.exchanges.binance import BinanceSpotFeed, BinanceUsdmFeed

TRADES = "binance_usdm/aggtrade_ws_2021-07-22_cryptofeed.jsonl"
DIFFS = "binance_spot/depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"
SNAPSHOT = "binance_spot/depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json"
DEPTH = 400


def lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if line.strip()]


def trade_frames(fixtures: Path, n: int) -> list[bytes]:
    frames = lines(fixtures / TRADES)
    return (frames * (n // len(frames) + 1))[:n]


def depth_frames(fixtures: Path, n: int) -> tuple[bytes, list[bytes]]:
    """The snapshot and n chained diffs: the recording's diffs past the snapshot, repeated with U/u
    shifted by the span of one pass, so that each pass continues the previous one."""
    snapshot = (fixtures / SNAPSHOT).read_bytes().strip()
    last_id = orjson.loads(snapshot)["lastUpdateId"]
    diffs = [d for d in map(orjson.loads, lines(fixtures / DIFFS)) if d["data"]["u"] > last_id]
    span = diffs[-1]["data"]["u"] - diffs[0]["data"]["U"] + 1
    out: list[bytes] = []
    shift = 0
    while len(out) < n:
        for d in diffs:
            data = {**d["data"], "U": d["data"]["U"] + shift, "u": d["data"]["u"] + shift}
            out.append(orjson.dumps({"stream": d["stream"], "data": data}))
        shift += span
    return snapshot, out[:n]


def cpu_rate(n: int, started: float) -> float:
    return n / max(time.thread_time() - started, 1e-9)


# -- ours --------------------------------------------------------------------------------------------
def ours_trade(frames: list[bytes]) -> tuple[float, int]:
    feed, produced = BinanceUsdmFeed(), 0
    started = time.thread_time()
    for frame in frames:
        produced += len(feed.on_message(frame, None, 0))
    return cpu_rate(len(frames), started), produced


def ours_depth(snapshot: bytes, frames: list[bytes]) -> tuple[float, int, object]:
    feed = BinanceSpotFeed(depth=DEPTH, book_interval_ms=0)
    feed.on_message(snapshot, "/api/v3/depth?symbol=BTCUSDT&limit=1000", 0)
    produced, last = 0, None
    started = time.thread_time()
    for frame in frames:
        out = feed.on_message(frame, None, 0)
        produced += len(out)
        if out:
            last = out[-1]
    return cpu_rate(len(frames), started), produced, last


# -- cryptofeed ---------------------------------------------------------------------------------------
def cryptofeed_available() -> bool:
    try:
        import cryptofeed  # noqa: F401
    except ImportError:
        return False
    return True


def _seed_symbols(cls, instruments, contract_type: str | None) -> None:
    """cryptofeed loads a venue's symbol table over HTTP; give it one built from the frames instead."""
    from cryptofeed.symbols import Symbols
    rows = []
    for inst in instruments:
        base, quote = split_symbol(inst).split("-")
        row = {"symbol": inst, "baseAsset": base, "quoteAsset": quote, "status": "TRADING",
               "filters": [{"tickSize": "0.01"}]}
        if contract_type:
            row["contractType"] = contract_type
        rows.append(row)
    Symbols.set(cls.id, *cls._parse_symbol_data({"symbols": rows}))


def cryptofeed_trade(frames: list[bytes]) -> tuple[float, int]:
    from cryptofeed.defines import TRADES as CF_TRADES
    from cryptofeed.exchanges import BinanceFutures
    instruments = sorted({orjson.loads(f)["data"]["s"] for f in frames[:1000]})
    _seed_symbols(BinanceFutures, instruments, "PERPETUAL")
    texts = [f.decode() for f in frames]
    produced = [0]

    async def on_trade(trade, receipt_ts) -> None:
        produced[0] += 1

    async def feed_all() -> float:
        feed = BinanceFutures(symbols=[f"{split_symbol(i)}-PERP" for i in instruments], channels=[CF_TRADES],
                              callbacks={CF_TRADES: on_trade})
        handler = feed.message_handler
        started = time.thread_time()
        for text in texts:
            await handler(text, None, 0.0)
        return cpu_rate(len(texts), started)

    return asyncio.run(feed_all()), produced[0]


def cryptofeed_depth(snapshot: bytes, frames: list[bytes]) -> tuple[float, int, object]:
    from decimal import Decimal

    from cryptofeed.defines import L2_BOOK
    from cryptofeed.exchanges import Binance
    from cryptofeed.types import OrderBook
    _seed_symbols(Binance, ["BTCUSDT"], None)
    snap = msgspec.json.decode(snapshot)
    texts = [f.decode() for f in frames]
    produced, last = [0], [None]

    async def on_book(book, receipt_ts) -> None:
        produced[0] += 1
        last[0] = book

    async def feed_all() -> float:
        feed = Binance(symbols=["BTC-USDT"], channels=[L2_BOOK], callbacks={L2_BOOK: on_book})
        # What its _snapshot() would do after the REST call: the book and the id the diffs chain onto.
        feed._l2_book["BTC-USDT"] = OrderBook(feed.id, "BTC-USDT", max_depth=0,
                                              bids={Decimal(p): Decimal(q) for p, q in snap["bids"]},
                                              asks={Decimal(p): Decimal(q) for p, q in snap["asks"]})
        feed.last_update_id["BTC-USDT"] = snap["lastUpdateId"]
        handler = feed.message_handler
        started = time.thread_time()
        for text in texts:
            await handler(text, None, 0.0)
        return cpu_rate(len(texts), started)

    return asyncio.run(feed_all()), produced[0], last[0]


def _same_top(ours, theirs, depth: int) -> bool:
    """Both sides end with the same best `depth` levels (prices and quantities, compared as decimals)."""
    from decimal import Decimal
    if ours is None or theirs is None:
        return False
    for side, levels in (("bid", ours.bids), ("ask", ours.asks)):
        book = theirs.book.bids if side == "bid" else theirs.book.asks
        top = [book.index(i) for i in range(min(depth, len(book)))]
        if [(Decimal(p), Decimal(q)) for p, q in levels] != [(Decimal(p), Decimal(q)) for p, q in top]:
            return False
    return True


# -- the cases ----------------------------------------------------------------------------------------
def run(fixtures: Path, messages: int = 200_000, rounds: int = 3) -> dict:
    with_cf = cryptofeed_available()
    trades = trade_frames(fixtures, messages)
    snapshot, diffs = depth_frames(fixtures, messages)
    best: dict[str, dict[str, float]] = {"binance_trade": {}, "binance_depth": {}}
    produced: dict[str, dict[str, int]] = {"binance_trade": {}, "binance_depth": {}}
    same_book = None
    for _ in range(rounds):
        for side in ("marketprism", "cryptofeed") if with_cf else ("marketprism",):
            if side == "marketprism":
                rate, n = ours_trade(trades)
                drate, dn, our_last = ours_depth(snapshot, diffs)
            else:
                rate, n = cryptofeed_trade(trades)
                drate, dn, cf_last = cryptofeed_depth(snapshot, diffs)
                same_book = _same_top(our_last, cf_last, DEPTH)
            for case, r, count in (("binance_trade", rate, n), ("binance_depth", drate, dn)):
                best[case][side] = max(best[case].get(side, 0.0), r)
                produced[case][side] = count
    out = {}
    for case in best:
        ours = best[case]["marketprism"]
        theirs = best[case].get("cryptofeed")
        out[case] = {"messages": messages, "marketprism_msgs_per_s": round(ours),
                     "cryptofeed_msgs_per_s": round(theirs) if theirs else None,
                     "ratio": round(ours / theirs, 2) if theirs else None,
                     "outputs": produced[case]}
    out["binance_depth"]["same_final_book"] = same_book
    out["binance_depth"]["depth"] = DEPTH
    return out
