"""One clickhouse-connect client for both stores: chdb://PATH (embedded) or http(s)://user:pass@host:port."""

from __future__ import annotations

import threading
from pathlib import Path

import clickhouse_connect

from marketprism.records import TABLE_FOR
from marketprism.settings import redact


class StoreError(RuntimeError):
    """The store cannot be opened (one line, names the URL without its password)."""


QUERY_LIMITS = {"max_result_rows": 100_000, "result_overflow_mode": "break", "max_execution_time": 30}


def connect(url: str, readonly: bool = False):
    """A clickhouse-connect client; chDB directories are created on first use.

    A readonly client is a separate session (settings are per session, also in chDB): its limits are set
    first because nothing can be changed once readonly=1 is in force."""
    settings = {**QUERY_LIMITS, "readonly": 1} if readonly else {}
    try:
        if url.startswith("chdb://"):
            path = Path(url[len("chdb://"):]).resolve()  # a relative dir would parse as a host name
            path.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=settings)
        return clickhouse_connect.get_client(dsn=url, settings=settings, connect_timeout=10)
    except Exception as e:  # the drivers raise many types; the operator needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (is another marketprism process holding this chDB directory?)" if url.startswith("chdb://") else ""
        raise StoreError(f"cannot open store {redact(url)}: {first}{hint}") from None


class Store:
    """Thread-safe inserts of JSON rows; used from worker threads, never on the event loop."""

    def __init__(self, client) -> None:
        self.client = client
        self._lock = threading.Lock()

    def insert_json(self, table: str, rows: bytes) -> None:
        """Insert newline-separated JSON objects (JSONEachRow) into a table."""
        with self._lock:
            self.client.raw_insert(table, None, rows, fmt="JSONEachRow")

    def query(self, sql: str, **kw):
        with self._lock:
            return self.client.query(sql, **kw)

    def raw_query(self, sql: str) -> bytes:
        with self._lock:
            return self.client.raw_query(sql, fmt="TabSeparatedWithNames")

    def command(self, sql: str, **kw):
        with self._lock:
            return self.client.command(sql, **kw)

    def count(self, database: str, data_type: str, final: bool = True) -> int:
        sql = f"SELECT count() FROM {database}.{TABLE_FOR[data_type]}{' FINAL' if final else ''}"
        return int(self.query(sql).result_rows[0][0])

    def close(self) -> None:
        with self._lock:
            self.client.close()

