"""Trade backfill for `marketprism repair`: the recorded trade gaps (hot `gaps`, stream_type 'trade') filled
from the venues' public trade history, de-duplicated by trade_id against both tiers.

- Binance spot: gaps carry the exact missing trade ids (from_sequence..to_sequence). GET /api/v3/historicalTrades
  ?symbol=&fromId=&limit=1000 gives trades by trade id (the same ids as the @trade stream the collector reads);
  the current spot docs list it without the MARKET_DATA security type (no API key). aggTrades is not used: its
  ids are aggregate ids, not the trade ids stored.
- OKX: gaps carry times. GET /api/v5/market/history-trades?instId=&type=2&after=<ms> (records earlier than that
  time), then type=1&after=<oldest tradeId> page by page (100 a page) back to the gap's start.
- Bybit: gaps carry times. GET /v5/market/recent-trade?category=&symbol=&limit= (1000 linear, 60 spot) has only
  the most recent trades: what it still holds is filled, the part of a gap older than its oldest trade is
  reported unrecoverable.
- Binance USD-M (/fapi/v1/historicalTrades is MARKET_DATA: needs an API key) and Deribit: reported unrecoverable.

Rows are built exactly as the live parsers build them (marketprism/exchanges/{binance,okx,bybit}.py).
"""

from __future__ import annotations

import asyncio

import msgspec

from marketprism import records
from marketprism.settings import Settings
from marketprism.store import schema
from marketprism.store.ledger import COLD, HOT, iso, ms_literal, now_ms

FEED_OF = {("binance", "spot"): "binance_spot", ("okx", "spot"): "okx", ("okx", "perpetual"): "okx",
           ("bybit", "spot"): "bybit_spot", ("bybit", "perpetual"): "bybit_linear"}
NO_TRADE_HISTORY = {"binance": "Binance USD-M historicalTrades needs an API key and aggTrades ids are not trade ids",
                    "deribit": "trade history is not implemented for Deribit"}
MAX_PAGES = 50


# -- history bodies -> records, as the live parsers build them -----------------------------------------------
class BinanceHistoricalTrade(msgspec.Struct):
    id: int
    price: str
    qty: str
    time: int
    isBuyerMaker: bool


class OkxTradeRow(msgspec.Struct):
    instId: str
    tradeId: str
    px: str
    sz: str
    side: str
    ts: str


class OkxTradesBody(msgspec.Struct):
    code: str
    data: list[OkxTradeRow] = []
    msg: str = ""


class BybitTradeRow(msgspec.Struct):
    execId: str
    symbol: str
    price: str
    size: str
    side: str
    time: str


class BybitTradeResult(msgspec.Struct):
    rows: list[BybitTradeRow] = msgspec.field(name="list")


class BybitTradesBody(msgspec.Struct):
    retCode: int
    result: BybitTradeResult | None = None
    retMsg: str = ""


def parse_binance_trades(body: bytes, symbol: str, received_at: int) -> list[records.Trade]:
    """GET /api/v3/historicalTrades: [{id, price, qty, quoteQty, time, isBuyerMaker, isBestMatch}], oldest first."""
    return [records.Trade(exchange="binance", market_type="spot", symbol=symbol, instrument=symbol.replace("-", ""),
                          timestamp=r.time, received_at=received_at, trade_id=str(r.id), price=r.price,
                          quantity=r.qty, side="sell" if r.isBuyerMaker else "buy")
            for r in msgspec.json.decode(body, type=list[BinanceHistoricalTrade])]


def parse_okx_trades(body: bytes, symbol: str, received_at: int) -> list[records.Trade]:
    """GET /api/v5/market/history-trades: {code, data: [{instId, side, sz, px, source, tradeId, ts}]}, newest first."""
    decoded = msgspec.json.decode(body, type=OkxTradesBody)
    if decoded.code != "0":
        raise ValueError(f"OKX code {decoded.code}: {decoded.msg}")
    out = []
    for r in decoded.data:
        if r.side not in ("buy", "sell"):
            raise ValueError(f"OKX trade side {r.side!r}")
        out.append(records.Trade(exchange="okx", market_type="perpetual" if r.instId.endswith("-SWAP") else "spot",
                                 symbol=symbol, instrument=r.instId, timestamp=int(r.ts), received_at=received_at,
                                 trade_id=r.tradeId, price=r.px, quantity=r.sz, side=r.side))
    return out


def parse_bybit_trades(body: bytes, symbol: str, market_type: str, received_at: int) -> list[records.Trade]:
    """GET /v5/market/recent-trade: {retCode, result: {category, list: [{execId, symbol, price, size, side,
    time, isBlockTrade}]}}, newest first."""
    decoded = msgspec.json.decode(body, type=BybitTradesBody)
    if decoded.retCode != 0 or decoded.result is None:
        raise ValueError(f"Bybit retCode {decoded.retCode}: {decoded.retMsg}")
    out = []
    for r in decoded.result.rows:
        side = r.side.lower()
        if side not in ("buy", "sell"):
            raise ValueError(f"Bybit trade side {r.side!r}")
        out.append(records.Trade(exchange="bybit", market_type=market_type, symbol=symbol, instrument=r.symbol,
                                 timestamp=int(r.time), received_at=received_at, trade_id=r.execId, price=r.price,
                                 quantity=r.size, side=side))
    return out


# -- what is recorded and stored ------------------------------------------------------------------------------
def trade_gaps(hot_rows, since: int) -> list[dict]:
    names = ("exchange", "market_type", "symbol", "instrument", "from_sequence", "to_sequence", "started_at",
             "ended_at")
    rows = hot_rows(
        "SELECT exchange, market_type, symbol, instrument, from_sequence, to_sequence, toUnixTimestamp64Milli("
        f"started_at), toUnixTimestamp64Milli(ended_at) FROM {HOT}.gaps WHERE stream_type = 'trade' AND timestamp >= "
        f"{ms_literal(since)} ORDER BY exchange, market_type, symbol, started_at LIMIT 1 BY exchange, market_type, "
        "symbol, timestamp")
    return [dict(zip(names, r)) for r in rows]


def stored_ids(readers, g: dict) -> set[str]:
    out: set[str] = set()
    for database, rows in zip((HOT, COLD), readers):
        out |= {t for (t,) in rows(
            f"SELECT DISTINCT trade_id FROM {database}.trades WHERE exchange = '{g['exchange']}' AND market_type = "
            f"'{g['market_type']}' AND symbol = '{g['symbol']}' AND timestamp >= {ms_literal(g['started_at'])} AND "
            f"timestamp <= {ms_literal(g['ended_at'])}")}
    return out


# -- fetching per venue: (trades of the gap, how much of it the venue no longer has, note) ------------------
async def binance_gap(fetch, base: str, g: dict) -> tuple[list[records.Trade], int, str]:
    lo, hi = int(g["from_sequence"]), int(g["to_sequence"])
    got: list[records.Trade] = []
    next_id = lo
    for _ in range(MAX_PAGES):
        body = await fetch(f"{base}/api/v3/historicalTrades?symbol={g['instrument']}&fromId={next_id}&limit=1000")
        page = parse_binance_trades(body, g["symbol"], now_ms())
        if not page:
            break
        got += [t for t in page if lo <= int(t.trade_id) <= hi]
        next_id = int(page[-1].trade_id) + 1
        if next_id > hi:
            break
    have = {int(t.trade_id) for t in got}
    lost = sum(1 for i in range(lo, hi + 1) if i not in have)
    note = f"trade ids {lo}..{min(have) - 1 if have else hi} beyond the venue's history" if lost else ""
    return got, lost, note


async def okx_gap(fetch, base: str, g: dict) -> tuple[list[records.Trade], int, str]:
    start, end = g["started_at"], g["ended_at"]
    path = f"{base}/api/v5/market/history-trades?instId={g['instrument']}&limit=100"
    cursor, got = f"type=2&after={end + 1}", []
    for _ in range(MAX_PAGES):
        page = parse_okx_trades(await fetch(f"{path}&{cursor}"), g["symbol"], now_ms())
        got += [t for t in page if start <= t.timestamp <= end]
        if not page or page[-1].timestamp < start:
            return got, 0, ""
        cursor = f"type=1&after={page[-1].trade_id}"
    return got, 1, f"history before {iso(got[-1].timestamp if got else end)} not reached in {MAX_PAGES} pages"


async def bybit_gap(fetch, base: str, g: dict) -> tuple[list[records.Trade], int, str]:
    category = "linear" if g["market_type"] == "perpetual" else "spot"
    limit = 1000 if category == "linear" else 60
    body = await fetch(f"{base}/v5/market/recent-trade?category={category}&symbol={g['instrument']}&limit={limit}")
    page = parse_bybit_trades(body, g["symbol"], g["market_type"], now_ms())
    got = [t for t in page if g["started_at"] <= t.timestamp <= g["ended_at"]]
    oldest = min((t.timestamp for t in page), default=None)
    if oldest is not None and oldest <= g["started_at"]:
        return got, 0, ""
    reach = iso(oldest) if oldest is not None else "now"
    return got, 1, f"{iso(g['started_at'])}..{reach} older than the venue's recent trades"


VENUES = {"binance": binance_gap, "okx": okx_gap, "bybit": bybit_gap}


async def backfill_trades(fetch, settings: Settings, readers, hot, since: int) -> tuple[list[dict], list[dict]]:
    """(results per stream, gaps left for the unrecoverable report). `fetch(url) -> bytes` raises on errors."""
    results: dict[str, dict] = {}
    left: list[dict] = []
    for g in trade_gaps(readers[0], since):
        stream = f"trade/{g['exchange']}/{g['market_type']}/{g['symbol']}"
        feed = FEED_OF.get((g["exchange"], g["market_type"]))
        if feed is None or feed not in settings.feeds or "trade" not in settings.data_types:
            left.append({**g, "reason": NO_TRADE_HISTORY.get(g["exchange"]) if feed is None
                         else f"feed {feed} is not configured"})
            continue
        item = results.setdefault(stream, {"stream": stream, "filled": 0, "unrecoverable": 0, "note": "",
                                           "times": []})
        if g["exchange"] == "binance" and g["from_sequence"] is None:
            item["unrecoverable"] += 1
            item["note"] = "a gap without trade ids"
            continue
        try:
            got, lost, note = await VENUES[g["exchange"]](fetch, settings.rest_url(feed), g)
        except Exception as e:  # one venue's failure is reported, the other gaps still run
            item["error"] = f"{type(e).__name__}: {e}"
            continue
        stored = stored_ids(readers, g)
        fresh = list({t.trade_id: t for t in got if t.trade_id not in stored}.values())
        if fresh:
            await asyncio.to_thread(hot.insert_json, schema.ingest_table("trade"),
                                    b"\n".join(records.encode(t) for t in fresh))
        item["filled"] += len(fresh)
        item["unrecoverable"] += lost
        item["times"] += [t.timestamp for t in fresh]
        if note:
            item["note"] = "; ".join(filter(None, (item["note"], note)))
    return list(results.values()), left
