"""storage-hot: durable pull consumers -> batches per table -> insert -> ack (only after the insert)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import Counter, defaultdict

import msgspec
import nats
from loguru import logger

from marketprism import records
from marketprism.bus import wire
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


class _Stamp(msgspec.Struct):
    timestamp: int


_stamp = msgspec.json.Decoder(_Stamp)
LATENCY_SAMPLE_EVERY = 16
_LOG_STEP = math.log(1.05)  # latency buckets 5 % wide: percentiles exact to 5 %


def latency_bucket(ms: float) -> float:
    """Upper bound (ms) of the log-spaced bucket that holds a latency."""
    return 1.0 if ms <= 1.0 else round(1.05 ** math.ceil(math.log(ms) / _LOG_STEP), 1)


def latency_percentiles(buckets: dict[float, int]) -> tuple[float | None, float | None, int]:
    """(p50, p99, samples) from bucket upper bound -> count; each percentile is its bucket's upper bound."""
    n = sum(buckets.values())
    out: list[float | None] = []
    for q in (0.50, 0.99):
        seen, found = 0, None
        for bound in sorted(buckets):
            seen += buckets[bound]
            if seen >= q * n:
                found = bound
                break
        out.append(found if n else None)
    return out[0], out[1], n


class Puller:
    """One durable pull consumer, read through a plain inbox subscription.

    A pull request asks the server for up to `batch` messages within `expires`; the lean parser hands
    each arrival to `_on_msg` as (subject, reply, payload) bytes. (nats-py's fetch() waits for every
    message with its own timeout, a timer and a task per message, which costs more than the rest of
    storage-hot's work on a message.) A message with a reply subject is a stream message (its ack
    subject); one without is the server's status for the request (408 expired, 404 nothing, 409 ...),
    which ends that request.
    """

    def __init__(self, nc: nats.NATS, stream: str, durable: str) -> None:
        self.nc = nc
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = nc.new_inbox()
        self.buffer: list = []
        self.want = 0
        self.ready = asyncio.Event()
        self._sub = None

    async def start(self) -> None:
        self._sub = await wire.subscribe(self.nc, self.inbox, self._on_msg)

    def _on_msg(self, subject: bytes, reply: bytes, data: bytes) -> None:
        if reply:
            self.buffer.append((subject, reply, data))
            if len(self.buffer) >= self.want:
                self.ready.set()
        else:
            self.ready.set()

    async def collect(self, rows: int, max_age_s: float, stopping: asyncio.Event) -> list:
        """Up to about `rows` messages, returning when that many arrived or `max_age_s` passed."""
        deadline = time.monotonic() + max_age_s
        while len(self.buffer) < rows and not stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            self.want = rows
            self.ready.clear()
            request = b'{"batch":%d,"expires":%d}' % (rows - len(self.buffer), int(remaining * 1e9))
            try:
                await self.nc.publish(self.next_subject, request, reply=self.inbox)
                await asyncio.wait_for(self.ready.wait(), remaining + 0.05)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                break
            except nats.errors.Error as e:
                logger.warning("pull request failed: {}", e)
                await asyncio.sleep(0.5)
                break
        out, self.buffer = self.buffer, []
        return out

    async def close(self) -> list:
        """Stop receiving; returns what was delivered but not yet collected."""
        if self._sub is not None:
            await wire.unsubscribe(self.nc, self._sub)
        out, self.buffer = self.buffer, []
        return out


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
        self.latency: Counter[float] = Counter()  # exchange time -> insert done, sampled

    def _observe_latency(self, group: list) -> None:
        now_ms = time.time() * 1000
        for _, _, data in group[::LATENCY_SAMPLE_EVERY]:
            try:
                ms = max(0.0, now_ms - _stamp.decode(data).timestamp)
            except msgspec.MsgspecError:
                continue
            self.latency[latency_bucket(ms)] += 1
            metrics.STORE_LATENCY.observe(ms / 1000)

    async def run(self) -> None:
        await asyncio.gather(*(self._consume(stream) for stream in STREAMS))

    def stop(self) -> None:
        """Stop fetching; the batch in hand is still inserted and acked."""
        self.stopping.set()

    async def _consume(self, stream: str) -> None:
        """Collect the next batch while the previous one is inserted (in a worker thread) and acked."""
        puller = Puller(self.nc, stream, DURABLE)
        await puller.start()
        writing: asyncio.Task | None = None
        while not self.stopping.is_set():
            batch = await puller.collect(self.batch_rows, self.flush_interval_s, self.stopping)
            if writing is not None:
                await writing
                writing = None
            if self.stopping.is_set():
                await self._release(batch)
                break
            if batch:
                writing = asyncio.create_task(self._write(batch))
            if self.failures:
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(self.failures, 6)))  # store down: no busy loop
        if writing is not None:
            await writing
        await self._release(await puller.close())

    async def _release(self, msgs: list) -> None:
        """Messages delivered after the stop: handed back at once rather than after ack_wait."""
        if msgs:
            await wire.reply_all(self.nc, [m[1] for m in msgs], wire.nak())

    async def _write(self, msgs: list) -> None:
        groups: dict[str, list] = defaultdict(list)
        for msg in msgs:
            dt = msg[0].split(b".", 1)[0].decode()
            try:
                rec = records.decode(msg[2])
                if records.data_type(rec) != dt:
                    raise ValueError("data_type does not match the subject")
            except (msgspec.MsgspecError, ValueError) as e:
                await self._term(msg, f"invalid record: {e}")
                continue
            groups[dt].append(msg)
        for dt, group in groups.items():
            await self._insert(dt, group)

    async def _insert(self, dt: str, group: list) -> None:
        payload = b"\n".join([m[2] for m in group])
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
            await wire.reply_all(self.nc, [m[1] for m in group], wire.nak(delay))
            return
        self.failures = 0
        table = records.TABLE_FOR[dt]
        metrics.INSERT_SECONDS.observe(time.monotonic() - started)
        metrics.BATCH_ROWS.observe(len(group))
        metrics.ROWS.labels(table=table).inc(len(group))
        self.inserted += len(group)
        self.last_insert[table] = time.time()
        self._observe_latency(group)
        metrics.observe_collector_store_latency([m[2] for m in group[::LATENCY_SAMPLE_EVERY]])
        await self._ack(group)

    async def _ack(self, group: list) -> None:
        """An explicit ack per message (never AckAll), all of a group's acks in one write."""
        await wire.reply_all(self.nc, [m[1] for m in group], wire.ACK)

    async def _term(self, msg, reason: str) -> None:
        self.terminated += 1
        metrics.TERMINATED.labels(reason=reason.split(":")[0]).inc()
        logger.error("dropping message on {} that can never be stored: {}", msg[0].decode(errors="replace"),
                     reason)
        await wire.reply_all(self.nc, [msg[1]], wire.TERM)

    def health(self) -> dict:
        p50, p99, n = latency_percentiles(self.latency)
        return {"inserted": self.inserted, "terminated": self.terminated, "insert_errors": self.errors,
                "failing": self.failures > 0,
                "last_insert": {t: round(ts, 3) for t, ts in self.last_insert.items()},
                "store_latency_ms": {"samples": n, "p50": p50, "p99": p99,
                                     "buckets": sorted(self.latency.items())}}
