"""The archive ledger and the SQL of one window: how storage-cold copies a window hot -> cold, counts it,
and records watermarks and window outcomes in the cold tier (clickhouse/30_cold.sql).

Shared by the archiver (marketprism/store/cold.py), `marketprism integrity` and `marketprism repair`.
Readers take `rows(sql) -> list[tuple]`, so integrity can also ask a running embedded instance over HTTP.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from urllib.parse import unquote, urlsplit

from marketprism.records import KEY_FIELDS, TABLE_FOR
from marketprism.settings import ConfigError
from marketprism.store import schema
from marketprism.store.client import Store

HOT, COLD = schema.HOT, schema.COLD
TABLES = tuple(TABLE_FOR.values())
DATA_TYPE_OF = {table: dt for dt, table in TABLE_FOR.items()}
LEDGER_DDL = "30_cold.sql"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def key_columns(table: str) -> str:
    return ", ".join(("exchange", "market_type", "symbol", *KEY_FIELDS[DATA_TYPE_OF[table]]))


def ms_literal(ms: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(ms)}), 'UTC')"


def in_window(start: int, end: int) -> str:
    return f"timestamp >= {ms_literal(start)} AND timestamp < {ms_literal(end)}"


def quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def copy_sql(table: str, source: str, start: int, end: int) -> str:
    key, where = key_columns(table), in_window(start, end)
    return (f"INSERT INTO {COLD}.{table} SELECT * FROM {source} WHERE {where} AND ({key}) NOT IN "
            f"(SELECT {key} FROM {COLD}.{table} WHERE {where}) LIMIT 1 BY {key}")


def missing_sql(table: str, source: str, start: int, end: int) -> str:
    """Hot keys of the window that cold lacks (run on the cold server)."""
    key, where = key_columns(table), in_window(start, end)
    return (f"SELECT count() FROM (SELECT DISTINCT {key} FROM {source} WHERE {where}) WHERE ({key}) NOT IN "
            f"(SELECT {key} FROM {COLD}.{table} WHERE {where})")


def count_sql(database: str, table: str, start: int, end: int) -> str:
    return f"SELECT uniqExact({key_columns(table)}) FROM {database}.{table} WHERE {in_window(start, end)}"


def hot_source(hot_url: str, cold_url: str):
    """table -> the FROM expression the cold server reads hot rows with."""
    if not cold_url or cold_url == hot_url:
        return lambda table: f"{HOT}.{table}"
    parts = urlsplit(hot_url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError("cold_clickhouse_url: a separate cold server reads the hot one with remote(), so "
                          "clickhouse_url must be an http(s):// ClickHouse server")
    fn, port = ("remoteSecure", 9440) if parts.scheme == "https" else ("remote", 9000)
    address, user = f"{parts.hostname}:{port}", unquote(parts.username or "default")
    password = unquote(parts.password or "")
    return lambda table: f"{fn}({quote(address)}, {quote(HOT)}, {quote(table)}, {quote(user)}, {quote(password)})"


def rows_of(store: Store):
    return lambda sql: store.query(sql).result_rows


# -- the ledger: watermarks and window outcomes in the cold tier ------------------------------------------------
def ledger_exists(rows) -> bool:
    found = rows(f"SELECT count() FROM system.tables WHERE database = '{COLD}' "
                 "AND name IN ('archive_watermarks', 'archive_windows')")
    return int(found[0][0]) == 2


def read_watermarks(rows) -> dict[str, tuple[int, int]]:
    """table -> (watermark ms, swept_to ms)."""
    if not ledger_exists(rows):
        return {}
    return {t: (int(w), int(s)) for t, w, s in rows(
        "SELECT table_name, toUnixTimestamp64Milli(argMax(watermark, updated_at)), "
        f"toUnixTimestamp64Milli(argMax(swept_to, updated_at)) FROM {COLD}.archive_watermarks GROUP BY table_name")}


def read_windows(rows, status: str | None = None, since_ms: int = 0) -> list[dict]:
    """The latest outcome of every recorded window (optionally only those with `status`)."""
    if not ledger_exists(rows):
        return []
    having = f"HAVING s = {quote(status)}" if status else ""
    out = rows("SELECT table_name, toUnixTimestamp64Milli(window_start), toUnixTimestamp64Milli(any(window_end)), "
               "argMax(status, updated_at) AS s, argMax(hot_keys, updated_at), argMax(cold_keys, updated_at), "
               f"argMax(attempts, updated_at), argMax(reason, updated_at) FROM {COLD}.archive_windows "
               f"WHERE window_start >= {ms_literal(since_ms)} GROUP BY table_name, window_start {having} "
               "ORDER BY table_name, window_start")
    names = ("table", "start", "end", "status", "hot_keys", "cold_keys", "attempts", "reason")
    return [dict(zip(names, row)) for row in out]


class Ledger:
    def __init__(self, cold: Store, clock=now_ms) -> None:
        self.cold, self.clock = cold, clock
        self._version = 0

    def ensure(self) -> None:
        for stmt in schema.statements((schema.ddl_dir() / LEDGER_DDL).read_text()):
            self.cold.command(stmt)
        # Continue after the newest version stored, so a clock set back never makes a new row lose to an old one.
        newest = self.cold.query("SELECT greatest((SELECT toUnixTimestamp64Milli(max(updated_at)) FROM "
                                 f"{COLD}.archive_watermarks), (SELECT toUnixTimestamp64Milli(max(updated_at)) "
                                 f"FROM {COLD}.archive_windows))").result_rows[0][0]
        self._version = max(self._version, int(newest))

    def _next_version(self) -> int:
        # Strictly increasing, so two writes in the same millisecond still have an order for argMax.
        self._version = max(self._version + 1, self.clock())
        return self._version

    def save(self, table: str, watermark: int, swept_to: int) -> None:
        self.cold.command(f"INSERT INTO {COLD}.archive_watermarks VALUES ({quote(table)}, {ms_literal(watermark)}, "
                          f"{ms_literal(swept_to)}, {ms_literal(self._next_version())})")

    def record(self, table: str, start: int, end: int, status: str, counts: tuple[int, int], attempts: int,
               reason: str = "") -> None:
        self.cold.command(f"INSERT INTO {COLD}.archive_windows VALUES ({quote(table)}, {ms_literal(start)}, "
                          f"{ms_literal(end)}, {quote(status)}, {int(counts[0])}, {int(counts[1])}, {attempts}, "
                          f"{quote(reason[:500])}, {ms_literal(self._next_version())})")
