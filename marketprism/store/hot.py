"""storage-hot: durable pull consumers -> batches per table -> insert -> ack (only after the insert)."""

from __future__ import annotations

import asyncio
import re
import time
from collections import defaultdict

import msgspec
import nats
from loguru import logger

from marketprism import records
from marketprism.ops import metrics
from marketprism.store.client import Store
from marketprism.store.schema import ingest_table

DURABLE = "storage-hot"
STREAMS = ("MARKET_DATA", "ORDERBOOK_SNAP")
# ClickHouse error codes that mean "this data can never be inserted" (parse/type/range problems).
DATA_ERROR_CODES = {6, 26, 27, 32, 33, 38, 41, 53, 62, 69, 70, 72, 117, 130, 131, 190, 321, 407, 691}


def is_data_error(exc: Exception) -> bool:
    m = re.search(r"Code: (\d+)", str(exc))
    return bool(m) and int(m.group(1)) in DATA_ERROR_CODES


class HotWriter:
    def __init__(self, nc: nats.NATS, store: Store, batch_rows: int = 20000, flush_interval_s: float = 0.25) -> None:
        self.nc = nc
        self.store = store
        self.batch_rows = batch_rows
        self.flush_interval_s = flush_interval_s
        self.stopping = asyncio.Event()
        self.failures = 0
        self.last_insert: dict[str, float] = {}
        self.inserted = 0
        self.terminated = 0
        self.errors = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._consume(stream) for stream in STREAMS))

    def stop(self) -> None:
        """Stop fetching; the batch in hand is still inserted and acked."""
        self.stopping.set()

    async def _consume(self, stream: str) -> None:
        sub = await self.nc.jetstream().pull_subscribe_bind(DURABLE, stream)
        while not self.stopping.is_set():
            batch = await self._collect(sub)
            if batch:
                await self._write(batch)
            if self.failures:
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self.failures, 6)))  # store down: no busy loop
        await sub.unsubscribe()

    async def _collect(self, sub) -> list:
        batch: list = []
        deadline = time.monotonic() + self.flush_interval_s
        while len(batch) < self.batch_rows and not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            try:
                batch += await sub.fetch(batch=min(self.batch_rows - len(batch), 5000), timeout=remaining)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                break
            except nats.errors.Error as e:
                logger.warning("fetch failed: {}", e)
                await asyncio.sleep(0.5)
                break
        return batch

    async def _write(self, msgs: list) -> None:
        groups: dict[str, list] = defaultdict(list)
        for msg in msgs:
            dt = msg.subject.split(".", 1)[0]
            try:
                rec = records.decode(msg.data)
                if records.data_type(rec) != dt:
                    raise ValueError("data_type does not match the subject")
            except (msgspec.MsgspecError, ValueError) as e:
                await self._term(msg, f"invalid record: {e}")
                continue
            groups[dt].append(msg)
        for dt, group in groups.items():
            await self._insert(dt, group)

    async def _insert(self, dt: str, group: list) -> None:
        payload = b"\n".join(m.data for m in group)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.store.insert_json, ingest_table(dt), payload)
        except Exception as e:  # noqa: BLE001 - classified below: data errors are split, others retried
            if is_data_error(e):
                if len(group) == 1:
                    await self._term(group[0], f"rejected by ClickHouse: {str(e).splitlines()[0][:200]}")
                    return
                half = len(group) // 2
                await self._insert(dt, group[:half])
                await self._insert(dt, group[half:])
                return
            self.failures += 1
            self.errors += 1
            metrics.STORE_ERRORS.labels(kind="transient").inc()
            delay = min(30.0, 0.5 * 2 ** min(self.failures, 6))
            logger.warning("insert into {} failed ({} rows), retry in {:.1f}s: {}", dt, len(group), delay,
                           str(e).splitlines()[0][:200])
            for m in group:
                await m.nak(delay=delay)
            return
        self.failures = 0
        table = records.TABLE_FOR[dt]
        metrics.INSERT_SECONDS.observe(time.monotonic() - started)
        metrics.BATCH_ROWS.observe(len(group))
        metrics.ROWS.labels(table=table).inc(len(group))
        self.inserted += len(group)
        self.last_insert[table] = time.time()
        for m in group:
            await m.ack()

    async def _term(self, msg, reason: str) -> None:
        self.terminated += 1
        metrics.TERMINATED.labels(reason=reason.split(":")[0]).inc()
        logger.error("dropping message on {} that can never be stored: {}", msg.subject, reason)
        await msg.term()

    def health(self) -> dict:
        return {"inserted": self.inserted, "terminated": self.terminated, "insert_errors": self.errors,
                "failing": self.failures > 0,
                "last_insert": {t: round(ts, 3) for t, ts in self.last_insert.items()}}
