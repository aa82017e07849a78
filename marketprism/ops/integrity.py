"""`marketprism integrity`: is my data whole? Exit 0 only when it is, 1 when it is not.

- coverage: every exchange x market_type x data_type the configured feeds collect has rows in its last window
  (5 min for trades and books, 8 h for the slow types). Liquidations are event-driven: none is not an error
  while the collector reports healthy. With the newest timestamp in hot and in cold (the hot/cold lag).
- archive (per table, over --hours): windows the archiver recorded as failed; windows behind the watermark
  whose cold copy lacks keys hot has (rows received in the last few minutes are still being swept, and do not
  count); windows whose cold keys fell below the count verified when they were archived (rows deleted from
  cold); rows due for archiving, received long enough ago, that no verified window holds yet.
- duplicates: rows vs distinct dedup keys per table and tier, on data older than --settle-s so that
  ReplacingMergeTree has had time to merge redeliveries.
- gaps: count and total duration per stream from the `gaps` table.
- schema: the hot and the cold tables have identical columns and types (the hot TTL is not a column).

While the embedded `run` holds the chDB directory, the checks are read-only SELECTs through its POST /query.
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

from marketprism.records import DATA_TYPES, TABLE_FOR
from marketprism.settings import Settings
from marketprism.store import ledger
from marketprism.store.cold import lag_s
from marketprism.store.ledger import COLD, HOT, TABLES, in_window, iso, key_columns, ms_literal, now_ms
from marketprism.ops.args import positive_float

FAST_WINDOW_S, SLOW_WINDOW_S = 300, 8 * 3600
CELL_FEEDS = {  # (exchange, market_type) -> the feed collecting it
    ("binance", "spot"): "binance_spot", ("binance", "perpetual"): "binance_usdm", ("okx", "spot"): "okx",
    ("okx", "perpetual"): "okx", ("deribit", "perpetual"): "deribit", ("deribit", "options"): "deribit",
    ("bybit", "spot"): "bybit_spot", ("bybit", "perpetual"): "bybit_linear"}
ALL_MARKETS = [m for m in CELL_FEEDS if m != ("deribit", "options")]
PERPETUALS = [("binance", "perpetual"), ("okx", "perpetual"), ("deribit", "perpetual"), ("bybit", "perpetual")]
# DESIGN.md §2 as collected: Deribit dated futures are not subscribed for the default symbols, Bybit publishes
# no top-trader position ratio, Deribit no liquidations or ratios.
COLLECTED = {
    "trade": ALL_MARKETS, "orderbook": ALL_MARKETS, "funding_rate": PERPETUALS, "open_interest": PERPETUALS,
    "liquidation": [m for m in PERPETUALS if m[0] != "deribit"],
    "lsr_top_position": [("binance", "perpetual"), ("okx", "perpetual")],
    "lsr_all_account": [m for m in PERPETUALS if m[0] != "deribit"],
    "volatility_index": [("deribit", "options")],
}



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document for scripts")
    parser.add_argument("--hours", type=positive_float, default=24.0, help="range of the archive, duplicate and gap checks")
    parser.add_argument("--settle-s", type=positive_float, default=600.0,
                        help="leave the newest seconds out of the duplicate check (merges still pending)")
    parser.add_argument("--collector-url", default="", help="the collector's /health (default: local health port)")


def expected_cells(settings: Settings) -> list[tuple[str, str, str]]:
    return [(dt, ex, mt) for dt in DATA_TYPES if dt in COLLECTED and dt in settings.data_types
            for ex, mt in COLLECTED[dt] if CELL_FEEDS[(ex, mt)] in settings.feeds]


def coverage(hot, cold, settings: Settings, now: int, collector_ok: bool) -> list[dict]:
    out = []
    by_table: dict[str, dict] = {}
    for dt, ex, mt in expected_cells(settings):
        table = TABLE_FOR[dt]
        if table not in by_table:
            window = (FAST_WINDOW_S if dt in ("trade", "orderbook") else SLOW_WINDOW_S) * 1000
            since = ms_literal(now - window)
            hot_rows = hot(f"SELECT exchange, market_type, countIf(timestamp >= {since}), "
                           f"toUnixTimestamp64Milli(max(timestamp)) FROM {HOT}.{table} GROUP BY 1, 2")
            cold_rows = cold(f"SELECT exchange, market_type, toUnixTimestamp64Milli(max(timestamp)) "
                             f"FROM {COLD}.{table} WHERE timestamp >= {ms_literal(now - SLOW_WINDOW_S * 3000)} "
                             "GROUP BY 1, 2")
            by_table[table] = {"window_s": window // 1000, "hot": {(e, m): (int(n), int(t)) for e, m, n, t in hot_rows},
                               "cold": {(e, m): int(t) for e, m, t in cold_rows}}
        info = by_table[table]
        rows, newest = info["hot"].get((ex, mt), (0, None))
        archived = info["cold"].get((ex, mt))
        if rows:
            status = "ok"
        elif dt == "liquidation" and collector_ok:
            status = "ok (event-driven; collector healthy)"
        else:
            status = "MISSING"
        out.append({"data_type": dt, "exchange": ex, "market_type": mt, "window_s": info["window_s"], "rows": rows,
                    "max_timestamp": iso(newest), "cold_max_timestamp": iso(archived),
                    "hot_cold_lag_s": round((newest - archived) / 1000, 1) if newest and archived else None,
                    "status": status})
    return out


def archive(hot, cold, settings: Settings, now: int, since: int) -> list[dict]:
    """Per table: watermark, lag, and the windows that are not whole in cold."""
    grace = int((2 * settings.archive_interval_s + 60) * 1000)  # the archiver's next round has not come yet
    w = settings.archive_window_s * 1000
    marks = ledger.read_watermarks(cold)
    windows = ledger.read_windows(cold, since_ms=since - since % w)
    out = []
    for table in TABLES:
        watermark = marks.get(table, (None, None))[0]
        entry = {"table": table, "watermark": iso(watermark), "lag_s": None, "problems": []}
        newest = hot(f"SELECT toUnixTimestamp64Milli(max(timestamp)) FROM {HOT}.{table}")[0][0]
        if watermark and newest:
            entry["lag_s"] = round(max(0, int(newest) - watermark) / 1000, 1)
        entry["problems"] += [f"window {iso(r['start'])} failed to archive ({r['attempts']} attempts): {r['reason']}"
                              for r in windows if r["table"] == table and r["status"] == "failed"]
        entry["problems"] += _overdue(hot, table, settings, now, watermark, grace)
        if watermark:
            entry["problems"] += _incomplete(hot, cold, table, since - since % w, watermark, w, now - grace,
                                             [r for r in windows if r["table"] == table and r["status"] == "verified"])
        out.append(entry)
    return out


def _overdue(hot, table: str, settings: Settings, now: int, watermark: int | None, grace: int) -> list[str]:
    w = settings.archive_window_s * 1000
    due = now - int(lag_s(table, settings.archive_delay_s) * 1000) - grace
    due -= due % w
    (n, oldest), = hot(f"SELECT count(), toUnixTimestamp64Milli(min(timestamp)) FROM {HOT}.{table} WHERE "
                       f"timestamp >= {ms_literal(watermark or 0)} AND timestamp < {ms_literal(due)} "
                       f"AND received_at < {ms_literal(now - grace)}")
    if int(n) == 0:
        return []
    return [f"{n} rows due for archiving since {iso(int(oldest))} are not archived (is storage-cold running?)"]


def window_keys(hot, cold, table: str, since: int, until: int, w: int, settled: int | None) -> tuple[dict, dict]:
    """Distinct keys per window of [since, until): hot {start: (keys, keys received at or after `settled`)},
    cold {start: keys}."""
    key, where = key_columns(table), in_window(since, until)
    bucket = f"intDiv(toUnixTimestamp64Milli(timestamp), {w}) * {w}"
    recent = "0" if settled is None else f"received_at >= {ms_literal(settled)}"
    hot_n = {int(s): (int(n), int(r)) for s, n, r in hot(
        f"SELECT {bucket} AS s, uniqExact({key}), uniqExactIf({key}, {recent}) "
        f"FROM {HOT}.{table} WHERE {where} GROUP BY s")}
    cold_n = {int(s): int(n) for s, n in cold(f"SELECT {bucket} AS s, uniqExact({key}) FROM {COLD}.{table} "
                                              f"WHERE {where} GROUP BY s")}
    return hot_n, cold_n


def incomplete_windows(hot, cold, table: str, since: int, until: int, w: int, settled: int | None) -> list[tuple]:
    """(start, hot keys, cold keys) of the windows whose cold copy lacks keys hot received before `settled`
    (None: any key)."""
    return _lacking(*window_keys(hot, cold, table, since, until, w, settled))


def _lacking(hot_n: dict, cold_n: dict) -> list[tuple]:
    return [(start, n, cold_n.get(start, 0)) for start, (n, recent) in sorted(hot_n.items())
            if cold_n.get(start, 0) < n - recent]


def _incomplete(hot, cold, table: str, since: int, watermark: int, w: int, settled: int,
                verified: list[dict]) -> list[str]:
    hot_n, cold_n = window_keys(hot, cold, table, since, watermark, w, settled)
    out = [f"window {iso(start)}: cold has {have} keys, hot {n} (run `marketprism repair`)"
           for start, n, have in _lacking(hot_n, cold_n)]
    for row in verified:
        have = cold_n.get(row["start"], 0)
        if row["end"] - row["start"] == w and have < int(row["cold_keys"]):
            out.append(f"window {iso(row['start'])}: cold has {have} keys, {row['cold_keys']} were verified "
                       "(rows were deleted from cold)")
    return out


def duplicates(hot, cold, since: int, settled: int) -> list[dict]:
    out = []
    for database, rows in ((HOT, hot), (COLD, cold)):
        for table in TABLES:
            (n, distinct), = rows(f"SELECT count(), uniqExact({key_columns(table)}) FROM {database}.{table} "
                                  f"WHERE {in_window(since, settled)}")
            out.append({"tier": database.rsplit("_", 1)[1], "table": table, "rows": int(n), "distinct": int(distinct),
                        "duplicates": int(n) - int(distinct)})
    return out


def gaps(hot, since: int) -> list[dict]:
    rows = hot("SELECT stream_type, exchange, market_type, symbol, count(), "
               "sum(greatest(0, toUnixTimestamp64Milli(ended_at) - toUnixTimestamp64Milli(started_at))) FROM "
               f"(SELECT * FROM {HOT}.gaps WHERE timestamp >= {ms_literal(since)} LIMIT 1 BY {key_columns('gaps')}) "
               "GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")
    return [{"stream": f"{s}/{e}/{m}/{sym}", "gaps": int(n), "duration_s": round(int(d) / 1000, 3)}
            for s, e, m, sym, n, d in rows]


def schema_diff(hot, cold) -> list[dict]:
    def columns(rows, database: str) -> dict[str, list]:
        found: dict[str, list] = {}
        for table, name, type_ in rows(f"SELECT table, name, type FROM system.columns WHERE database = '{database}' "
                                       f"AND table IN ({', '.join(repr(t) for t in TABLES)}) ORDER BY table, position"):
            found.setdefault(table, []).append(f"{name} {type_}")
        return found
    hot_cols, cold_cols = columns(hot, HOT), columns(cold, COLD)
    out = []
    for table in TABLES:
        a, b = hot_cols.get(table), cold_cols.get(table)
        if a == b:
            continue
        detail = ("missing in hot" if a is None else "missing in cold" if b is None else
                  f"hot only: {sorted(set(a) - set(b)) or 'order'}; cold only: {sorted(set(b) - set(a)) or 'order'}")
        out.append({"table": table, "difference": detail})
    return out


def check(hot, cold, settings: Settings, hours: float = 24.0, settle_s: float = 600.0, collector_ok: bool = False,
          now: int | None = None) -> dict:
    """Every check; `hot`/`cold` are rows(sql) -> list[tuple]. `whole` is the answer, `problems` the reasons."""
    now = now or now_ms()
    since = now - int(hours * 3600_000)
    report = {"checked_at": iso(now), "hours": hours, "collector_healthy": collector_ok,
              "coverage": coverage(hot, cold, settings, now, collector_ok),
              "archive": archive(hot, cold, settings, now, since),
              "duplicates": duplicates(hot, cold, since, now - int(settle_s * 1000)),
              "gaps": gaps(hot, since), "schema": schema_diff(hot, cold)}
    problems = [f"coverage: {c['data_type']}/{c['exchange']}/{c['market_type']}: no rows in the last "
                f"{c['window_s']} s" for c in report["coverage"] if c["status"] == "MISSING"]
    problems += [f"archive: {a['table']}: {p}" for a in report["archive"] for p in a["problems"]]
    problems += [f"duplicates: {d['tier']}.{d['table']}: {d['duplicates']} rows repeat a dedup key"
                 for d in report["duplicates"] if d["duplicates"]]
    problems += [f"gaps: {g['stream']}: {g['gaps']} gap(s), {g['duration_s']} s" for g in report["gaps"]]
    problems += [f"schema: {s['table']}: {s['difference']}" for s in report["schema"]]
    report["whole"], report["problems"] = not problems, problems
    return report


# -- presentation -------------------------------------------------------------------------------------------
def render(report: dict) -> str:
    lines = [f"integrity at {report['checked_at']} (archive, duplicates and gaps over {report['hours']} h)", "",
             _table(["data type", "exchange", "market", "window", "rows", "newest", "hot-cold lag s", "status"],
                    [[c["data_type"], c["exchange"], c["market_type"], f"{c['window_s']} s", c["rows"],
                      c["max_timestamp"] or "-", _num(c["hot_cold_lag_s"]), c["status"]] for c in report["coverage"]]),
             "", _table(["table", "watermark", "lag s", "problems"],
                        [[a["table"], a["watermark"] or "-", _num(a["lag_s"]), len(a["problems"])]
                         for a in report["archive"]]),
             "", _table(["tier", "table", "rows", "distinct keys", "duplicates"],
                        [[d["tier"], d["table"], d["rows"], d["distinct"], d["duplicates"]] for d in report["duplicates"]])]
    if report["gaps"]:
        lines += ["", _table(["stream", "gaps", "duration s"], [[g["stream"], g["gaps"], g["duration_s"]]
                                                               for g in report["gaps"]])]
    lines += ["", "schema: hot and cold identical" if not report["schema"] else "schema: DIFFERENT", ""]
    if report["whole"]:
        lines.append("WHOLE: every check passed")
    else:
        lines += [f"NOT WHOLE: {len(report['problems'])} problem(s)", *(f"  - {p}" for p in report["problems"])]
    return "\n".join(lines)


def _num(value) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header, *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(widths[i]) for i, v in enumerate(row)).rstrip() for row in cells)


# -- reaching the store ---------------------------------------------------------------------------------------
def http_rows(port: int):
    """rows(sql) through a running embedded instance's POST /query (TabSeparatedWithNames)."""
    def rows(sql: str) -> list[tuple]:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/query", data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            raise ConnectionError(f"query through the running instance failed: {e.read().decode().strip()}") from None
        return [tuple(_cell(c) for c in line.split("\t")) for line in text.split("\n")[1:] if line]
    return rows


def _cell(text: str):
    if text == "\\N":
        return None
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "0": "\0"}.get(m.group(1), m.group(1)), text)


def _collector_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.HTTPError):
        return False
    return body.get("collector", {}).get("status") in ("healthy", "starting")


def running_port(settings: Settings) -> int | None:
    """The health port of a running embedded instance holding the default chDB directory, if one does."""
    from marketprism.ops.lock import InstanceLock, LockedError
    if settings.clickhouse_url:
        return None
    lock = InstanceLock(Path(settings.data_dir))
    try:
        lock.acquire()  # taken only if nobody holds it: a lock file left by a dead process does not count
    except LockedError:
        return lock.holder().get("port") or 0
    lock.release()
    return None


def main(args, settings: Settings) -> int:
    from marketprism.store.client import Store, connect
    port = running_port(settings)
    if port == 0:
        raise ConnectionError("the running `marketprism run` has not opened its health port yet; try again")
    stores = []
    if port:
        hot = cold = http_rows(port)
    else:
        stores = [Store(connect(settings.store_url, readonly=True, settings=settings))]
        if settings.cold_clickhouse_url and settings.cold_clickhouse_url != settings.store_url:
            stores.append(Store(connect(settings.cold_clickhouse_url, readonly=True, settings=settings)))
        hot, cold = ledger.rows_of(stores[0]), ledger.rows_of(stores[-1])
    url = args.collector_url or f"http://127.0.0.1:{settings.port_for('collector')}/health"
    try:
        report = check(hot, cold, settings, args.hours, args.settle_s, _collector_ok(url))
    finally:
        for store in stores:
            store.close()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["whole"] else 1

