"""One clickhouse-connect client for both stores: chdb://PATH (embedded) or http(s)://user:pass@host:port."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect

from marketprism.records import TABLE_FOR
from marketprism.settings import Settings, redact


class StoreError(RuntimeError):
    """The store cannot be opened (one line, names the URL without its password; `url` for the caller to
    name the setting)."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


# clickhouse-connect logs "Unexpected Http Driver Exception" (with a traceback unless show_clickhouse_errors)
# and then raises the error that connect() and the roles turn into their own line: drop the duplicate
logging.getLogger("clickhouse_connect.driver._backend.http_sync").addFilter(
    lambda record: record.msg != "Unexpected Http Driver Exception")


QUERY_LIMITS = {"max_result_rows": 100_000, "result_overflow_mode": "break", "max_execution_time": 30}
# A batch (~5 MB) is below the 10 MB chunk that parallel parsing splits into, yet its pipeline still costs:
# off, a 20,000-row JSONEachRow insert into chDB took 2.85 instead of 3.35 µs of CPU per row (merges
# included, 40 inserts, two runs each) and 2.1 instead of 2.6 µs of wall time.
INSERT_SETTINGS = {"input_format_parallel_parsing": 0}


def http_options(url: str, settings: Settings | None) -> dict:
    """clickhouse-connect arguments for an http(s):// URL: the interface its scheme names, and for https the
    TLS options from the settings (clickhouse_ca, clickhouse_tls_verify, clickhouse_tls_cert/key).

    The interface is passed because clickhouse-connect ignores a DSN's scheme: it speaks TLS only on ports
    443/8443 or when told, so https://host:9999 would otherwise go out in clear, password included.
    With a client certificate and a password in the URL the certificate secures the connection and the
    password authenticates (tls_mode "strict"); without a password ClickHouse authenticates the URL's user
    by the certificate (clickhouse-connect's default "mutual" mode, X-ClickHouse-SSL-Certificate-Auth)."""
    scheme = urlsplit(url).scheme
    opts: dict = {"interface": scheme}
    if scheme != "https" or settings is None:
        return opts
    opts["verify"] = settings.clickhouse_tls_verify
    if settings.clickhouse_ca:
        opts["ca_cert"] = settings.clickhouse_ca
    if settings.clickhouse_tls_cert:
        opts.update(client_cert=settings.clickhouse_tls_cert, client_cert_key=settings.clickhouse_tls_key)
        if urlsplit(url).password:
            opts["tls_mode"] = "strict"
    return opts


def connect(url: str, readonly: bool = False, settings: Settings | None = None):
    """A clickhouse-connect client; chDB directories are created on first use. `settings` supplies the TLS
    options of an https:// URL (clickhouse_ca, clickhouse_tls_*): every role passes them.

    A readonly client is a separate session (settings are per session, also in chDB): its limits are set
    first because nothing can be changed once readonly=1 is in force."""
    session = {**QUERY_LIMITS, "readonly": 1} if readonly else {}
    try:
        if url.startswith("chdb://"):
            path = Path(url[len("chdb://"):]).resolve()  # a relative dir would parse as a host name
            path.mkdir(parents=True, exist_ok=True)
            return clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=session)
        return clickhouse_connect.get_client(dsn=url, settings=session, connect_timeout=10,
                                             **http_options(url, settings))
    except Exception as e:  # the drivers raise many types; the operator needs one line
        reason = getattr(e.__cause__, "reason", None)  # urllib3's MaxRetryError: the connection failure itself
        text = str(reason).split("): ", 1)[-1] if reason is not None else str(e).strip()  # no "HTTPConnection(..."
        first = text.splitlines()[0] if text else type(e).__name__
        held = url.startswith("chdb://") and not isinstance(e, OSError)  # OSError: the directory itself
        hint = " (is another marketprism process holding this chDB directory?)" if held else ""
        raise StoreError(f"cannot open store {redact(url)}: {first}{hint}", url) from None


class Store:
    """Thread-safe inserts of JSON rows; used from worker threads, never on the event loop."""

    def __init__(self, client) -> None:
        self.client = client
        self._lock = threading.Lock()

    def insert_json(self, table: str, rows: bytes) -> None:
        """Insert newline-separated JSON objects (JSONEachRow) into a table."""
        with self._lock:
            self.client.raw_insert(table, None, rows, fmt="JSONEachRow", settings=INSERT_SETTINGS)

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

