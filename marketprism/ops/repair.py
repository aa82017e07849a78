"""`marketprism repair`: re-copy cold windows that are not whole, and backfill from exchange history.

1. Re-copy: every window the archiver recorded as failed, and every window behind the watermark (over
   --hours) whose cold copy lacks keys hot has, is copied again and verified (storage-cold's own code path:
   only missing keys are written).
2. Backfill, over --hours, for the history the venues publish and this build can fetch and parse:
   - long/short ratios (Binance 30 days, OKX rubik, Bybit account-ratio): every 5-minute bucket is expected
     (the collector polls each one); missing buckets are fetched and parsed by the feeds' own parsers, and
     the buckets the venue no longer serves are reported as unrecoverable;
   - funding history (Binance fundingRate, Bybit funding/history) and open-interest history (Bybit): history
     rows are added where the stored stream has no row within a minute of them (the live streams are dense,
     so this only fills stretches when the collector was away).
   Rows go into the hot tier through the ingest tables with received_at = now (the hot TTL then keeps them a
   full TTL); windows behind the watermark that received rows are archived at once.
3. Trades: recorded trade gaps are filled from trade history (marketprism/ops/backfill.py: Binance spot
   historicalTrades by trade id, OKX history-trades, Bybit recent-trade), de-duplicated by trade_id against both
   tiers; what the venue no longer has is reported unrecoverable.
4. Unrecoverable here, reported: order-book gaps (no history), trade gaps without a source, and the streams
   without a history source listed in NO_SOURCE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

from marketprism import records
from marketprism.exchanges import make_feed
from marketprism.ops import backfill as trades_backfill
from marketprism.ops import integrity
from marketprism.settings import Settings
from marketprism.store import ledger, schema
from marketprism.store.client import Store
from marketprism.store.cold import Archiver
from marketprism.store.ledger import COLD, HOT, TABLES, iso, ms_literal, now_ms
from marketprism.ops.args import positive_float

HOUR_MS = 3_600_000
PERIOD_MS = 300_000  # the collector stores 5-minute ratio buckets
FUNDING_MS = 8 * HOUR_MS
NEAR_MS = 60_000  # a stored funding/OI row this close to a history row means the stream was there
NO_SOURCE = ("funding_rate okx, deribit", "open_interest binance, okx, deribit", "liquidation (no public history)",
             "volatility_index deribit")


@dataclass(frozen=True)
class Source:
    data_type: str
    feed: str
    market_type: str
    path: str  # with {inst}, {start}, {end} (ms)
    rows_per_request: int
    step_ms: int  # the series' spacing: one request covers rows_per_request steps
    retention_days: int | None = None
    period: str | None = None  # ratio period as stored
    parser: str = "feed"  # "feed": the exchange Feed's REST parser; else a function below

    @property
    def exchange(self) -> str:
        return self.feed.split("_")[0]

    def instrument(self, symbol: str) -> str:
        return f"{symbol}-SWAP" if self.feed == "okx" else symbol.replace("-", "")


RUBIK = "/api/v5/rubik/stat/contracts"
SOURCES = (  # request and response shapes: the venues' API docs (and the simulator that follows them)
    Source("lsr_top_position", "binance_usdm", "perpetual", "/futures/data/topLongShortPositionRatio?symbol={inst}"
           "&period=5m&startTime={start}&endTime={end}&limit=500", 500, PERIOD_MS, 30, "5m"),
    Source("lsr_all_account", "binance_usdm", "perpetual", "/futures/data/globalLongShortAccountRatio?symbol={inst}"
           "&period=5m&startTime={start}&endTime={end}&limit=500", 500, PERIOD_MS, 30, "5m"),
    Source("lsr_top_position", "okx", "perpetual", f"{RUBIK}/long-short-position-ratio-contract-top-trader"
           "?instId={inst}&period=5m&begin={start}&end={end}&limit=100", 100, PERIOD_MS, None, "5m"),
    Source("lsr_all_account", "okx", "perpetual", f"{RUBIK}/long-short-account-ratio-contract"
           "?instId={inst}&period=5m&begin={start}&end={end}&limit=100", 100, PERIOD_MS, None, "5m"),
    Source("lsr_all_account", "bybit_linear", "perpetual", "/v5/market/account-ratio?category=linear&symbol={inst}"
           "&period=5min&startTime={start}&endTime={end}&limit=500", 500, PERIOD_MS, None, "5m"),
    Source("open_interest", "bybit_linear", "perpetual", "/v5/market/open-interest?category=linear&symbol={inst}"
           "&intervalTime=5min&startTime={start}&endTime={end}&limit=200", 200, PERIOD_MS),
    Source("funding_rate", "binance_usdm", "perpetual", "/fapi/v1/fundingRate?symbol={inst}&startTime={start}"
           "&endTime={end}&limit=1000", 1000, FUNDING_MS, parser="binance_funding"),
    Source("funding_rate", "bybit_linear", "perpetual", "/v5/market/funding/history?category=linear&symbol={inst}"
           "&startTime={start}&endTime={end}&limit=200", 200, FUNDING_MS, parser="bybit_funding"),
)


# -- parsers for history bodies no Feed parses ------------------------------------------------------------------
class BinanceFundingRow(msgspec.Struct):
    symbol: str
    fundingRate: str
    fundingTime: int
    markPrice: str | None = None


class BybitFundingRow(msgspec.Struct):
    symbol: str
    fundingRate: str
    fundingRateTimestamp: str


class BybitFundingResult(msgspec.Struct):
    rows: list[BybitFundingRow] = msgspec.field(name="list")


class BybitFundingBody(msgspec.Struct):
    retCode: int
    result: BybitFundingResult


def funding_record(exchange: str, instrument: str, symbol: str, rate: str, at: int, mark: str | None,
                   received_at: int) -> records.FundingRate:
    # A settled rate: the event is the settlement itself, so timestamp and funding_time are both its time.
    return records.FundingRate(exchange=exchange, market_type="perpetual", symbol=symbol, instrument=instrument,
                               timestamp=at, received_at=received_at, funding_rate=rate, funding_time=at,
                               mark_price=mark or None, index_price=None)


def parse_binance_funding(body: bytes, symbol: str, received_at: int) -> list[records.Record]:
    """GET /fapi/v1/fundingRate: [{symbol, fundingRate, fundingTime, markPrice}] oldest first."""
    return [funding_record("binance", r.symbol, symbol, r.fundingRate, r.fundingTime, r.markPrice, received_at)
            for r in msgspec.json.decode(body, type=list[BinanceFundingRow])]


def parse_bybit_funding(body: bytes, symbol: str, received_at: int) -> list[records.Record]:
    """GET /v5/market/funding/history: result.list of {symbol, fundingRate, fundingRateTimestamp}, newest first."""
    decoded = msgspec.json.decode(body, type=BybitFundingBody)
    if decoded.retCode != 0:
        raise ValueError(f"Bybit retCode {decoded.retCode}")
    return [funding_record("bybit", r.symbol, symbol, r.fundingRate, int(r.fundingRateTimestamp), None, received_at)
            for r in decoded.result.rows]


PARSERS = {"binance_funding": parse_binance_funding, "bybit_funding": parse_bybit_funding}


# -- what is stored -----------------------------------------------------------------------------------------
def stored_times(readers, src: Source, symbol: str, start: int, end: int) -> set[int]:
    """Timestamps (ms) the stream holds in hot or cold over [start, end), bucketed by NEAR_MS unless bucketed."""
    bucket = "toUnixTimestamp64Milli(timestamp)" if src.period else f"intDiv(toUnixTimestamp64Milli(timestamp), {NEAR_MS})"
    period = f" AND period = '{src.period}'" if src.period else ""
    table = records.TABLE_FOR[src.data_type]
    out: set[int] = set()
    for database, rows in zip((HOT, COLD), readers):
        out |= {int(t) for (t,) in rows(
            f"SELECT DISTINCT {bucket} FROM {database}.{table} WHERE exchange = '{src.exchange}' AND market_type = "
            f"'{src.market_type}' AND symbol = '{symbol}'{period} AND timestamp >= {ms_literal(start - NEAR_MS)} "
            f"AND timestamp < {ms_literal(end + NEAR_MS)}")}
    return out


def is_stored(src: Source, ts: int, stored: set[int]) -> bool:
    if src.period:
        return ts in stored
    return any(ts // NEAR_MS + d in stored for d in (-1, 0, 1))


# -- fetching -------------------------------------------------------------------------------------------------
async def fetch(session: aiohttp.ClientSession, url: str) -> bytes:
    for _ in range(3):
        async with session.get(url) as resp:
            body = await resp.read()
            if resp.status == 200:
                return body
            if resp.status not in (418, 429):
                raise RuntimeError(f"HTTP {resp.status} from {url.split('?')[0]}")
            await asyncio.sleep(float(resp.headers.get("Retry-After", "2") or 2))
    raise RuntimeError(f"still rate limited by {url.split('?')[0]}")


async def history(session, settings: Settings, src: Source, symbol: str, start: int, end: int) -> list[records.Record]:
    """Every history row of [start, end), one request per rows_per_request steps, parsed."""
    feed = make_feed(src.feed) if src.parser == "feed" else None
    out: list[records.Record] = []
    span = src.rows_per_request * src.step_ms
    for lo in range(start, end, span):
        path = src.path.format(inst=src.instrument(symbol), start=lo, end=min(end, lo + span) - 1)
        body = await fetch(session, settings.rest_url(src.feed) + path)
        received = now_ms()
        if feed is None:
            out += PARSERS[src.parser](body, symbol, received)
            continue
        if feed.name == "okx" and msgspec.json.decode(body).get("data") == []:
            continue  # OKX answers a range without rows with an empty list, which its feed counts as an error
        errors = sum(feed.errors.values())
        out += feed.on_message(body, path, received)
        if sum(feed.errors.values()) > errors:
            raise RuntimeError(f"unparseable body from {path.split('?')[0]}: {dict(feed.errors)}")
    return [r for r in out if r.symbol == symbol and start <= r.timestamp < end]


async def backfill_stream(session, settings: Settings, readers, hot: Store, src: Source, symbol: str, since: int,
                          until: int) -> dict:
    result = {"stream": f"{src.data_type}/{src.exchange}/{src.market_type}/{symbol}", "filled": 0,
              "unrecoverable": 0, "note": ""}
    start = since
    if src.retention_days:
        cutoff = until - src.retention_days * 24 * HOUR_MS
        if since < cutoff:
            start = cutoff
            stored = stored_times(readers, src, symbol, since, cutoff)
            result["unrecoverable"] += sum(1 for t in expected(src, since, cutoff) if t not in stored)
            result["note"] = f"before {iso(cutoff)}: beyond the exchange's {src.retention_days}-day retention"
    stored = stored_times(readers, src, symbol, start, until)
    if src.period:
        # the newest bucket may not be published yet: its period must have ended a period ago
        missing = [t for t in expected(src, start, until - src.step_ms) if t not in stored]
        if not missing:
            return result
        start, until = missing[0], missing[-1] + src.step_ms
    fresh = [r for r in await history(session, settings, src, symbol, start, until)
             if not is_stored(src, r.timestamp, stored)]
    fresh = list({r.timestamp: r for r in fresh}.values())
    if fresh:
        await asyncio.to_thread(hot.insert_json, schema.ingest_table(src.data_type),
                                b"\n".join(records.encode(r) for r in fresh))
    result["filled"] = len(fresh)
    result["times"] = sorted(r.timestamp for r in fresh)
    if src.period:
        got = {r.timestamp for r in fresh}
        result["unrecoverable"] += sum(1 for t in missing if t not in got)
    return result


def expected(src: Source, start: int, end: int) -> list[int]:
    """The bucket starts in [start, end): the collector stores every one."""
    return list(range(start + (-start) % src.step_ms, end, src.step_ms))


async def backfill(settings: Settings, readers, hot: Store, since: int, until: int) -> tuple[list[dict], list[dict]]:
    out = []
    timeout = aiohttp.ClientTimeout(total=60, connect=settings.connect_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for src in SOURCES:
            if src.feed not in settings.feeds or src.data_type not in settings.data_types:
                continue
            for symbol in settings.symbols:
                try:
                    out.append(await backfill_stream(session, settings, readers, hot, src, symbol, since, until))
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, RuntimeError, ValueError,
                        msgspec.MsgspecError) as e:
                    out.append({"stream": f"{src.data_type}/{src.exchange}/{src.market_type}/{symbol}", "filled": 0,
                                "unrecoverable": 0, "error": str(e) or type(e).__name__})
        trades, left = await trades_backfill.backfill_trades(lambda url: fetch(session, url), settings, readers, hot,
                                                             since)
    return out + trades, left


# -- cold windows ---------------------------------------------------------------------------------------------
def recopy(archiver: Archiver, readers, since: int, extra: dict[str, set[int]], scan: bool = True) -> list[dict]:
    """`extra` (table -> starts of windows that received backfilled rows) and, with `scan`, failed windows and
    windows behind the watermark that cold lacks keys of, are copied again and verified."""
    hot_rows, cold_rows = readers
    w = archiver.window_ms
    todo: dict[tuple[str, int], str] = {(r["table"], r["start"]): "failed"
                                        for r in ledger.read_windows(cold_rows, status="failed")} if scan else {}
    marks = ledger.read_watermarks(cold_rows)
    for table in TABLES:
        watermark = marks.get(table, (0, 0))[0]
        for start in extra.get(table, ()):
            if start + w <= watermark:
                todo.setdefault((table, start), "backfilled")
        for start, _, _ in integrity.incomplete_windows(hot_rows, cold_rows, table, since - since % w, watermark,
                                                         w, None) if scan else ():
            todo.setdefault((table, start), "incomplete")
    out = []
    for (table, start), why in sorted(todo.items()):
        ok = archiver.archive_window(table, start, start + w, precheck=True)
        out.append({"table": table, "window": iso(start), "why": why, "verified": ok})
    return out


def gaps_unrecoverable(hot_rows, since: int, trade_gaps: list[dict] | None = None) -> list[str]:
    """Recorded gaps of streams without a history source (the others are filled by the backfill above). Trade
    gaps: only `trade_gaps` (those the trade backfill could not take), or all of them when it did not run."""
    reasons = {"trade": "not backfilled (--no-backfill)", "orderbook": "order books have no public history"}
    covered = {(src.data_type, src.exchange) for src in SOURCES}
    out = []
    if trade_gaps is not None:
        for g in trade_gaps:
            out.append(f"trade/{g['exchange']}/{g['market_type']}/{g['symbol']}: gap {iso(g['started_at'])}.."
                       f"{iso(g['ended_at'])}: {g['reason']}")
    for g in integrity.gaps(hot_rows, since):
        data_type, exchange = g["stream"].split("/")[:2]
        if data_type == "trade" and trade_gaps is not None:
            continue
        if (data_type, exchange) not in covered:
            out.append(f"{g['stream']}: {g['gaps']} gap(s), {g['duration_s']} s: "
                       f"{reasons.get(data_type, 'no history source')}")
    return out


# -- the command ------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hours", type=positive_float, default=24.0, help="how far back to look (default 24)")
    parser.add_argument("--no-backfill", action="store_true", help="only re-copy cold windows")
    parser.add_argument("--no-recopy", action="store_true", help="only backfill from exchange history")
    parser.add_argument("--json", action="store_true", help="one JSON document for scripts")


async def repair(settings: Settings, hot: Store, cold: Store, source, hours: float = 24.0, backfill_on: bool = True,
                 recopy_on: bool = True) -> dict:
    until = now_ms()
    since = until - int(hours * HOUR_MS)
    readers = (ledger.rows_of(hot), ledger.rows_of(cold))
    report: dict = {"since": iso(since), "until": iso(until), "backfill": [], "recopy": [],
                    "unrecoverable": [], "not_covered": list(NO_SOURCE)}
    archiver = Archiver(hot, cold, settings, source)
    await asyncio.to_thread(archiver.start)
    touched: dict[str, set[int]] = {}
    left: list[dict] = []
    if backfill_on:
        report["backfill"], left = await backfill(settings, readers, hot, since, until)
        for item in report["backfill"]:
            table = records.TABLE_FOR[item["stream"].split("/")[0]]
            touched.setdefault(table, set()).update(t - t % archiver.window_ms for t in item.pop("times", []))
    report["unrecoverable"] = gaps_unrecoverable(readers[0], since, left if backfill_on else None)
    if recopy_on or touched:
        report["recopy"] = await asyncio.to_thread(recopy, archiver, readers, since, touched, recopy_on)
    report["ok"] = all(r["verified"] for r in report["recopy"]) and not any("error" in b for b in report["backfill"])
    return report


def render(report: dict) -> str:
    lines = [f"repair {report['since']} .. {report['until']}"]
    for b in report["backfill"]:
        state = f"ERROR {b['error']}" if "error" in b else f"filled {b['filled']}, unrecoverable {b['unrecoverable']}"
        lines.append(f"  backfill {b['stream']}: {state}{'  (' + b['note'] + ')' if b.get('note') else ''}")
    for r in report["recopy"]:
        lines.append(f"  re-copy {r['table']} {r['window']} ({r['why']}): {'verified' if r['verified'] else 'FAILED'}")
    lines += [f"  unrecoverable {u}" for u in report["unrecoverable"]]
    lines.append(f"  not covered (no history source): {'; '.join(report['not_covered'])}")
    lines.append("OK" if report["ok"] else "NOT OK: see the lines above")
    return "\n".join(lines)


def main(args, settings: Settings) -> int:
    from marketprism.ops.lock import InstanceLock, LockedError
    lock = None if settings.clickhouse_url else InstanceLock(Path(settings.data_dir))
    try:
        if lock:
            lock.acquire()  # the embedded chDB directory: keep `run` out while repair writes
    except LockedError as e:
        print(f"marketprism: {e}; repair writes to the store: stop `marketprism run` first (its archiver "
              "re-copies failed windows by itself)", file=sys.stderr)
        return 1
    try:
        archiver = Archiver.open(settings)
        try:
            report = asyncio.run(repair(settings, archiver.hot, archiver.cold, archiver.source, args.hours,
                                        not args.no_backfill, not args.no_recopy))
        finally:
            archiver.close()
    finally:
        if lock:
            lock.release()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["ok"] else 1
