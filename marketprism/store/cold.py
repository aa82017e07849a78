"""storage-cold: copy closed time windows of every hot table into the cold tier, verify each, and advance a
per-table watermark kept in ClickHouse (marketprism_cold.archive_watermarks, clickhouse/30_cold.sql).

Windows are [start, start + archive_window_s) on the record's `timestamp` (exchange time), epoch-aligned.

- Closed: a window is copied once `lag_s` has passed since its end, on the clock of the data: min(now, the
  newest received_at stored from the same JetStream stream). archive_delay_s, three times that for the slow
  tables whose rows are published or polled late (ratios, funding, open interest, volatility index). When
  storage-hot stalls, its stream's frontier stalls with it, so no window closes under a backlog.
- Copy: INSERT INTO cold SELECT * FROM hot WHERE <window> AND <key> NOT IN (<keys of the window in cold>)
  LIMIT 1 BY <key>. Only keys cold lacks are written, once each, so a retry, a re-copy after a crash or a
  late row never duplicates anything, and no count relies on background merges of the ReplacingMergeTree.
- Verify: uniqExact(dedup key) over the window in cold equals hot. Cold may hold more (hot rows expired by
  TTL or deleted by hand): accepted when no hot key of the window is missing from cold. A mismatch is retried
  with backoff, then the window is recorded as failed (archive_windows, metric, health, log), the watermark
  stays before it, and every later round retries it.
- Late rows: a row may reach hot after its window was archived (repair backfills, late REST publications,
  several collectors). Hot's TTL counts from received_at, so such a row stays in hot a full TTL. Each round
  looks at the rows received since the last sweep (less an allowance of lag_s / 2 for rows inserted out of
  receipt order) that were received after their window closed and lie before the watermark; those windows
  are re-verified and re-copied. The sweep mark `swept_to` (newest received_at seen) is stored with the
  watermark and advanced only when all of them verified. A row stored more than lag_s / 2 out of receipt
  order behind rows of the same stream escapes the sweep: `marketprism integrity` reports it and
  `marketprism repair` re-copies its window.
- Same server (and the embedded chDB): the copy reads marketprism_hot directly. Separate servers: the cold
  server reads hot with remote()/remoteSecure() on the native port (9000/9440) of the hot URL's host, as the
  hot URL's user (that user needs the REMOTE and CREATE TEMPORARY TABLE grants on the cold server).
- Never deletes hot rows: the hot TTL does that; start-up warns when it is not longer than the worst-case lag.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from loguru import logger
from prometheus_client import Counter, Gauge

from marketprism.records import STREAM_FOR
from marketprism.settings import ConfigError, Settings
from marketprism.store.client import Store, connect
from marketprism.store.ledger import (COLD, DATA_TYPE_OF, HOT, TABLES, Ledger, copy_sql, count_sql, hot_source, iso,
                                      missing_sql, ms_literal, now_ms, read_watermarks, read_windows, rows_of)

SLOW_TABLES = frozenset({"funding_rates", "open_interests", "lsr_top_positions", "lsr_all_accounts",
                         "volatility_indices"})
SLOW_LAG_FACTOR = 3
MAX_WINDOWS_PER_ROUND = 24  # per table: a long backlog is caught up in rounds that follow each other at once
RETRY_DELAYS_S = (1.0, 2.0, 4.0)


def lag_s(table: str, delay_s: float) -> float:
    return delay_s * (SLOW_LAG_FACTOR if table in SLOW_TABLES else 1)


ROWS = Counter("marketprism_archive_rows_total", "Rows (distinct keys) copied into the cold tier", ["table"])
WATERMARK = Gauge("marketprism_archive_watermark_seconds", "Time up to which the cold tier is verified", ["table"])
LAG = Gauge("marketprism_archive_lag_seconds", "Newest hot timestamp minus the archive watermark", ["table"])
FAILED = Gauge("marketprism_archive_failed_windows", "Windows whose copy could not be verified", ["table"])


# -- the hot TTL against the worst-case lag ------------------------------------------------------------------
def hot_ttl_s(hot: Store, default_days: int) -> int:
    """The shortest TTL on the hot tables as the server has it (settings may differ from what was applied)."""
    days = [int(m) for (q,) in hot.query(f"SELECT create_table_query FROM system.tables WHERE database = '{HOT}' "
                                         "AND engine LIKE '%MergeTree'").result_rows
            for m in re.findall(r"toIntervalDay\((\d+)\)", q)]
    return 86400 * (min(days) if days else default_days)


def worst_case_lag_s(settings: Settings) -> float:
    """How old an unarchived hot row can get in normal operation: a whole window, the slow tables' lag,
    two rounds and the retries of one window."""
    return (settings.archive_window_s + lag_s("funding_rates", settings.archive_delay_s)
            + 2 * settings.archive_interval_s + sum(RETRY_DELAYS_S))


def ttl_warning(ttl_s: float, worst_s: float) -> str | None:
    if ttl_s <= worst_s:
        return (f"hot TTL {ttl_s / 3600:.1f} h is not longer than the worst-case archive lag {worst_s / 3600:.1f} h: "
                "hot rows can expire before they are archived; raise MARKETPRISM_HOT_TTL_DAYS")
    if ttl_s < 2 * worst_s:
        return (f"hot TTL {ttl_s / 3600:.1f} h leaves less than twice the worst-case archive lag "
                f"({worst_s / 3600:.1f} h) for outages of storage-cold")
    return None


@dataclass
class TableState:
    watermark: int | None = None
    swept_to: int | None = None
    hot_max: int | None = None
    frontier: int | None = None
    late: list[int] = field(default_factory=list)
    swept: set[int] = field(default_factory=set)  # late windows verified since swept_to last advanced
    failed: dict[int, dict] = field(default_factory=dict)


class Archiver:
    """Archives every hot table round by round; the blocking ClickHouse work runs in a worker thread."""

    def __init__(self, hot: Store, cold: Store, settings: Settings, source=None, clock=now_ms,
                 retry_delays_s=RETRY_DELAYS_S, max_windows: int = MAX_WINDOWS_PER_ROUND) -> None:
        self.hot, self.cold, self.settings, self.clock = hot, cold, settings, clock
        self.source = source or hot_source("", "")
        self.window_ms = settings.archive_window_s * 1000
        self.retry_delays_s, self.max_windows = retry_delays_s, max_windows
        self.ledger = Ledger(cold, clock)
        self.state = {t: TableState() for t in TABLES}
        self.rounds = self.errors = 0
        self.last_error = ""
        self.ttl_s = 0
        self._stop = threading.Event()
        self._wake: asyncio.Event | None = None

    @classmethod
    def open(cls, settings: Settings) -> "Archiver":
        """Own sessions on the configured stores (in the embedded run: a second session on the same chDB)."""
        source = hot_source(settings.store_url, settings.cold_clickhouse_url)
        hot = Store(connect(settings.store_url, settings=settings))
        separate = settings.cold_clickhouse_url and settings.cold_clickhouse_url != settings.store_url
        return cls(hot, Store(connect(settings.cold_clickhouse_url, settings=settings)) if separate else hot,
                   settings, source)

    def close(self) -> None:
        self.hot.close()
        if self.cold is not self.hot:
            self.cold.close()

    def start(self) -> None:
        """Ledger tables, stored watermarks, and the TTL check."""
        self.ledger.ensure()
        for table, (watermark, swept_to) in read_watermarks(rows_of(self.cold)).items():
            if table in self.state:
                self.state[table].watermark, self.state[table].swept_to = watermark, swept_to
        for row in read_windows(rows_of(self.cold), status="failed"):
            self.state[row["table"]].failed[row["start"]] = row
        ttl_s = hot_ttl_s(self.hot, self.settings.hot_ttl_days)
        warning = ttl_warning(ttl_s, worst_case_lag_s(self.settings))
        if warning and ttl_s != self.ttl_s:  # once, not at every restart of the loop after an outage
            logger.warning("storage-cold: {}", warning)
        self.ttl_s = ttl_s

    def stop(self) -> None:
        self._stop.set()
        if self._wake:
            self._wake.set()

    async def run(self) -> None:
        self._wake = asyncio.Event()
        failures = 0
        while not self._stop.is_set():
            try:
                if failures or not self.rounds:
                    await asyncio.to_thread(self.start)
                behind = await asyncio.to_thread(self.run_round)
                failures = 0
            except Exception as e:  # noqa: BLE001 - a store outage: report, back off, try again
                failures += 1
                self.errors += 1
                self.last_error = self._redact(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
                logger.warning("storage-cold round failed ({} in a row): {}", failures, self.last_error)
                behind = False
            delay = 0.2 if behind else min(300.0, self.settings.archive_interval_s * 2 ** min(failures, 4))
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass

    # -- one round ---------------------------------------------------------------------------------------------
    def run_round(self) -> bool:
        """One pass over every table; True when more windows are due than one round takes."""
        for table in TABLES:
            self._scan(table)
        frontier: dict[str, int] = {}
        for table, st in self.state.items():
            stream = STREAM_FOR[DATA_TYPE_OF[table]]
            frontier[stream] = max(frontier.get(stream, 0), st.frontier or st.swept_to or 0)
        behind = False
        for table, st in self.state.items():
            if self._stop.is_set():
                break
            behind |= self._sweep(table, st)
            closed = min(self.clock(), frontier[STREAM_FOR[DATA_TYPE_OF[table]]])
            limit = self._align(closed - int(lag_s(table, self.settings.archive_delay_s) * 1000))
            behind |= self._advance(table, st, limit)
        self.rounds += 1
        self.last_error = ""
        self._publish()
        return behind

    def _scan(self, table: str) -> None:
        """Newest hot timestamp, newest received_at since the last sweep, and windows with late rows."""
        st, w = self.state[table], self.window_ms
        allowance = int(lag_s(table, self.settings.archive_delay_s) * 500)
        since = max(0, (st.swept_to or 0) - allowance)
        ts = "toUnixTimestamp64Milli(timestamp)"
        late = (f"timestamp < {ms_literal(st.watermark or 0)} AND "
                f"toUnixTimestamp64Milli(received_at) >= (intDiv({ts}, {w}) + 1) * {w} + {allowance}")
        received, windows = self.hot.query(
            f"SELECT toUnixTimestamp64Milli(max(received_at)), groupUniqArrayIf(intDiv({ts}, {w}), {late}) "
            f"FROM {HOT}.{table} WHERE received_at >= {ms_literal(since)}").result_rows[0]
        st.frontier = int(received) or None
        st.late = sorted(int(i) * w for i in windows)
        newest = self.hot.query(f"SELECT toUnixTimestamp64Milli(max(timestamp)) FROM {HOT}.{table}").result_rows
        st.hot_max = int(newest[0][0]) or None

    def _sweep(self, table: str, st: TableState) -> bool:
        """Re-verify the windows that received late rows; True when some are left for the next round."""
        todo = [s for s in st.late if s not in st.swept]
        for start in todo[:self.max_windows]:
            if self.archive_window(table, start, start + self.window_ms, precheck=True):
                st.swept.add(start)
        if st.frontier and all(s in st.swept for s in st.late):
            st.swept_to, st.swept = max(st.swept_to or 0, st.frontier), set()
            if st.watermark is not None:
                self.ledger.save(table, st.watermark, st.swept_to)
        return len(todo) > self.max_windows

    def _advance(self, table: str, st: TableState, limit: int) -> bool:
        """Copy closed windows from the watermark on; True when more are due after this round's share."""
        for _ in range(self.max_windows):
            if self._stop.is_set():
                return False
            start = self._next_start(table, st.watermark, limit)
            if start is None:  # nothing stored up to the limit: every window before it is complete
                if st.watermark is not None and st.watermark < limit:
                    st.watermark = limit
                    self.ledger.save(table, st.watermark, st.swept_to or 0)
                return False
            if not self.archive_window(table, start, start + self.window_ms):
                return False  # the watermark waits at a failing window; the next round retries it
            st.watermark = start + self.window_ms
            self.ledger.save(table, st.watermark, st.swept_to or 0)
        return self._next_start(table, st.watermark, limit) is not None

    def _next_start(self, table: str, watermark: int | None, limit: int) -> int | None:
        """Start of the first window at or after the watermark with hot rows, if it closed before limit."""
        low = f"timestamp >= {ms_literal(watermark)} AND " if watermark is not None else ""
        first = self.hot.query(f"SELECT toUnixTimestamp64Milli(minOrNull(timestamp)) FROM {HOT}.{table} "
                               f"WHERE {low}timestamp < {ms_literal(limit)}").result_rows[0][0]
        if first is None:
            return None
        start = self._align(int(first))
        return start if start + self.window_ms <= limit else None

    def _align(self, ms: int) -> int:
        return ms - ms % self.window_ms

    # -- one window ----------------------------------------------------------------------------------------------
    def archive_window(self, table: str, start: int, end: int, precheck: bool = False) -> bool:
        """Copy and verify one window, retrying with backoff; record the outcome. True when verified."""
        reason, counts, attempts = "", (0, 0), 0
        for delay in (0.0, *self.retry_delays_s):
            if delay and self._stop.wait(delay):
                break
            attempts += 1
            try:
                ok, counts = self._attempt(table, start, end, precheck)
                reason = "" if ok else f"cold has {counts[1]} distinct keys, hot {counts[0]}"
            except Exception as e:  # noqa: BLE001 - a ClickHouse error: retried like a mismatch
                ok, reason = False, self._redact(str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
            if ok:
                self.ledger.record(table, start, end, "verified", counts, attempts)
                self.state[table].failed.pop(start, None)
                return True
        failure = {"table": table, "start": start, "end": end, "attempts": attempts, "reason": reason[:300]}
        previous = self.state[table].failed.get(start)
        failure["attempts"] += previous["attempts"] if previous else 0
        self.state[table].failed[start] = failure
        logger.error("storage-cold: window {} [{}, {}) failed after {} attempts: {}", table, start, end,
                     attempts, reason)
        try:
            self.ledger.record(table, start, end, "failed", counts, failure["attempts"], reason)
        except Exception as e:  # noqa: BLE001 - the cold store is down: health and the metric still show it
            logger.warning("storage-cold: cannot record the failed window: {}", self._redact(str(e)[:200]))
        return False

    def _attempt(self, table: str, start: int, end: int, precheck: bool) -> tuple[bool, tuple[int, int]]:
        cold_before = self._count(self.cold, COLD, table, start, end)
        if precheck:  # a window swept for late rows is usually complete already: count before copying
            hot_n = self._count(self.hot, HOT, table, start, end)
            if self._complete(table, start, end, hot_n, cold_before):
                return True, (hot_n, cold_before)
        self.cold.command(copy_sql(table, self.source(table), start, end))
        hot_n, cold_n = self._count(self.hot, HOT, table, start, end), self._count(self.cold, COLD, table, start, end)
        ROWS.labels(table=table).inc(max(0, cold_n - cold_before))
        return self._complete(table, start, end, hot_n, cold_n), (hot_n, cold_n)

    def _complete(self, table: str, start: int, end: int, hot_n: int, cold_n: int) -> bool:
        if cold_n == hot_n:
            return True
        if cold_n < hot_n:
            return False
        missing = self.cold.query(missing_sql(table, self.source(table), start, end)).result_rows[0][0]
        return int(missing) == 0

    @staticmethod
    def _count(store: Store, database: str, table: str, start: int, end: int) -> int:
        return int(store.query(count_sql(database, table, start, end)).result_rows[0][0])

    def _redact(self, text: str) -> str:
        password = unquote(urlsplit(self.settings.store_url).password or "")
        return text.replace(password, "***") if password else text

    # -- health and metrics --------------------------------------------------------------------------------------
    def _publish(self) -> None:
        for table, st in self.state.items():
            if st.watermark is not None:
                WATERMARK.labels(table=table).set(st.watermark / 1000)
            LAG.labels(table=table).set(self._lag_s(st) or 0.0)
            FAILED.labels(table=table).set(len(st.failed))

    @staticmethod
    def _lag_s(st: TableState) -> float | None:
        if st.hot_max is None or st.watermark is None:
            return None
        return max(0.0, (st.hot_max - st.watermark) / 1000)

    def health(self) -> dict:
        tables = {}
        for table, st in self.state.items():
            lag = self._lag_s(st)
            tables[table] = {"watermark": iso(st.watermark), "watermark_ms": st.watermark, "swept_to_ms": st.swept_to,
                             "lag_s": None if lag is None else round(lag, 1),
                             "failed_windows": [{k: f[k] for k in ("start", "end", "attempts", "reason")}
                                                for f in st.failed.values()]}
        failing = sum(len(st.failed) for st in self.state.values())
        at_risk = self.ttl_s and any((v["lag_s"] or 0) > self.ttl_s / 2 for v in tables.values())
        if self.last_error or failing or at_risk:
            status = "degraded"
        else:
            status = "healthy" if self.rounds else "starting"
        return {"status": status, "rounds": self.rounds, "round_errors": self.errors, "last_error": self.last_error,
                "failed_windows": failing, "hot_ttl_s": self.ttl_s, "tables": tables}


# -- the storage-cold role --------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true",
                        help="archive what is due (catching up fully), then exit: 0 when no window failed")


async def _open(settings: Settings) -> Archiver:
    """Retries: a ClickHouse server may still be starting when the role does. connect_timeout_s bounds the
    wait (plus the try under way); then the last error goes to the operator as one line."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.connect_timeout_s
    attempt = 0
    while True:
        try:
            return await asyncio.to_thread(Archiver.open, settings)
        except Exception as e:  # noqa: BLE001 - StoreError for any driver failure; a config error is final
            attempt += 1
            left = deadline - loop.time()
            if isinstance(e, ConfigError) or left <= 0 or settings.store_url.startswith("chdb://"):
                raise
            logger.warning("storage-cold: store not reachable yet ({}), retrying", e)
            await asyncio.sleep(min(5.0, 0.5 * 2 ** attempt, left))


async def serve(settings: Settings) -> int:
    from marketprism.ops.health import HealthServer
    from marketprism.ops.roles import _on_signals
    archiver = await _open(settings)
    health = HealthServer.for_role(settings, "storage-cold", {"storage_cold": archiver.health})
    await health.start()
    _on_signals(archiver.stop)
    logger.info("storage-cold: windows of {} s, delay {} s, every {} s; health on port {}",
                settings.archive_window_s, settings.archive_delay_s, settings.archive_interval_s, health.port)
    try:
        await archiver.run()
    finally:
        await health.stop()
        archiver.close()
    return 0


def run_once(settings: Settings) -> int:
    archiver = Archiver.open(settings)
    try:
        archiver.start()
        while archiver.run_round():
            pass
        for table, st in archiver.state.items():
            print(f"{table}: verified up to {iso(st.watermark) or '-'}, failed windows {len(st.failed)}")
        return 1 if any(st.failed for st in archiver.state.values()) else 0
    finally:
        archiver.close()


def main(args, settings: Settings) -> int:
    if args.once:
        return run_once(settings)
    return asyncio.run(serve(settings))
