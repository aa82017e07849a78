"""Apply the DDL under clickhouse/ (the same files the compose init container applies)."""

from __future__ import annotations

import re
from pathlib import Path

from marketprism.records import TABLE_FOR

HOT, COLD = "marketprism_hot", "marketprism_cold"
TIME_COLUMNS = ("timestamp", "received_at", "funding_time", "started_at", "ended_at")


def ddl_dir() -> Path:
    """clickhouse/ of the repository, shipped in the package as store/ddl (a symlink in the checkout)."""
    path = Path(__file__).resolve().parent / "ddl"
    if not (path / "10_tables.sql").exists():
        raise FileNotFoundError("the clickhouse/ DDL files are missing from this installation")
    return path


def statements(text: str) -> list[str]:
    """Split a SQL file into statements; `--` comments are dropped first (they may hold semicolons)."""
    text = re.sub(r"--[^\n]*", "", text)
    return [s.strip() for s in text.split(";") if s.strip()]


def render(hot_ttl_days: int) -> list[str]:
    """Every statement for both tiers, in order. Idempotent: all CREATE ... IF NOT EXISTS."""
    d = ddl_dir()
    out = statements((d / "00_databases.sql").read_text())
    tables = (d / "10_tables.sql").read_text()
    # TTL on the receipt time: a late or re-ingested row still gets its full hot lifetime for the archiver.
    ttl = f"TTL toDateTime(received_at) + INTERVAL {int(hot_ttl_days)} DAY"
    out += statements(tables.replace("{db}", HOT).replace("{ttl}", ttl))
    out += statements(tables.replace("{db}", COLD).replace("{ttl}", ""))
    out += statements((d / "20_ingest.sql").read_text().replace("{db}", HOT))
    return out


def apply(client, hot_ttl_days: int) -> None:
    for stmt in render(hot_ttl_days):
        client.command(stmt)
    _sync_ttl(client, hot_ttl_days)


def _sync_ttl(client, hot_ttl_days: int) -> None:
    """CREATE IF NOT EXISTS keeps an old TTL: bring every hot table to the configured one."""
    want = f"toDateTime(received_at) + toIntervalDay({int(hot_ttl_days)})"
    rows = client.query(f"SELECT name, create_table_query FROM system.tables WHERE database = '{HOT}' "
                        "AND engine = 'ReplacingMergeTree'").result_rows
    for name, create in rows:
        if want not in create:
            client.command(f"ALTER TABLE {HOT}.{name} MODIFY TTL toDateTime(received_at) + INTERVAL "
                           f"{int(hot_ttl_days)} DAY SETTINGS materialize_ttl_after_modify = 0")


def ingest_table(data_type: str) -> str:
    return f"{HOT}.{TABLE_FOR[data_type]}_ingest"
