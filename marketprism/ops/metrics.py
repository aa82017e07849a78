"""Prometheus metrics. The names are part of the interface (docs/operations.md lists them)."""

from __future__ import annotations

import bisect
import importlib.metadata
import shutil
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import msgspec
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PARSE_ERRORS = Counter("marketprism_parse_errors_total", "Frames that could not be parsed", ["feed", "reason"])
GAPS = Counter("marketprism_gaps_total", "Continuity breaks recorded as gap records",
               ["exchange", "stream_type", "reason"])
RECONNECTS = Counter("marketprism_reconnects_total", "WebSocket reconnects", ["feed"])
REST = Counter("marketprism_rest_requests_total", "REST requests by HTTP status", ["feed", "status"])
RATE_LIMIT_WAITS = Counter("marketprism_rate_limit_waits_total", "Waits imposed by 429/418 Retry-After", ["feed"])
PUBLISH_PENDING = Gauge("marketprism_publish_pending", "Published messages not yet acknowledged by JetStream")
ROWS = Counter("marketprism_rows_inserted_total", "Rows inserted into the hot tier", ["table"])
BATCH_ROWS = Histogram("marketprism_insert_batch_rows", "Rows per insert statement",
                       buckets=(1, 10, 100, 1000, 5000, 10000, 20000, 50000))
INSERT_SECONDS = Histogram("marketprism_insert_duration_seconds", "Duration of one insert statement")
TERMINATED = Counter("marketprism_messages_terminated_total", "Messages that can never be stored", ["reason"])
STORE_ERRORS = Counter("marketprism_store_errors_total", "Failed inserts (retried)", ["kind"])
STORE_LATENCY = Histogram("marketprism_store_latency_seconds", "Exchange event time to insert time",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
COLLECTOR_STORE_LATENCY = Histogram("marketprism_collector_store_latency_seconds",
                                    "Collector receipt (received_at) to hot-tier insert, sampled rows",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BOOK_RESYNCS = Counter("marketprism_book_resyncs_total",
                       "Order-book rebuilds started (one per book continuity break)", ["exchange", "market_type"])
PUBLISH_FAILURES = Counter("marketprism_publish_failures_total",
                           "Publishes rejected by JetStream or unacknowledged in time (re-sent, never dropped)",
                           ["exchange", "data_type", "reason"])
CONSUMER_PENDING = Gauge("marketprism_consumer_pending_messages", "Stream messages not yet delivered to the consumer",
                         ["stream", "consumer"])
CONSUMER_ACK_PENDING = Gauge("marketprism_consumer_ack_pending_messages", "Delivered to the consumer, not yet acked",
                             ["stream", "consumer"])
CONSUMER_REDELIVERED = Gauge("marketprism_consumer_redelivered_messages",
                             "Unacked messages that were delivered more than once", ["stream", "consumer"])
STREAM_MESSAGES = Gauge("marketprism_stream_messages", "Messages held by the JetStream stream", ["stream"])
STREAM_BYTES = Gauge("marketprism_stream_bytes", "Bytes held by the JetStream stream", ["stream"])
STREAM_MAX_BYTES = Gauge("marketprism_stream_max_bytes", "The stream's byte limit (discard new beyond it)", ["stream"])
HEALTH_STATUS = Gauge("marketprism_health_status", "Health of each /health section: 0 healthy, 1 starting, "
                      "2 degraded, 3 unhealthy", ["section"])
BUILD_INFO = Gauge("marketprism_build_info", "Always 1; the running version in the label", ["version"])


def version() -> str:
    try:
        return importlib.metadata.version("marketprism")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


BUILD_INFO.labels(version=version()).set(1)

EXCHANGE_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class Tally:
    """The collector's per-frame and per-record metrics, counted in plain dicts and turned into Prometheus
    samples only when scraped. A prometheus_client counter or histogram takes a lock per update: on the
    collector's hot path that was a tenth of its CPU. Exposes, with the usual names, types and labels:
    marketprism_messages_received_total{feed}, marketprism_records_published_total{exchange, data_type},
    marketprism_exchange_latency_seconds{exchange, data_type} (a histogram)."""

    def __init__(self) -> None:
        self.frames: dict[str, int] = {}
        # (exchange, data_type) -> [count per latency bucket (the last one +Inf)..., latency sum, published]
        self.records: dict[tuple[str, str], list] = {}

    def frame(self, feed: str) -> None:
        self.frames[feed] = self.frames.get(feed, 0) + 1

    def published(self, exchange: str, data_type: str, received_ms: int | None = None,
                  event_ms: int | None = None) -> None:
        """One record published; with its receipt and exchange times, one exchange-latency observation."""
        entry = self.records.get((exchange, data_type))
        if entry is None:
            entry = self.records[(exchange, data_type)] = [0] * (len(EXCHANGE_LATENCY_BUCKETS) + 3)
        entry[-1] += 1
        if received_ms is not None:
            latency = (received_ms - event_ms) / 1000
            entry[bisect.bisect_left(EXCHANGE_LATENCY_BUCKETS, latency)] += 1  # bucket le >= latency
            entry[-2] += latency

    def collect(self):
        frames = CounterMetricFamily("marketprism_messages_received", "WS frames and REST bodies received",
                                     labels=["feed"])
        for feed, n in sorted(self.frames.items()):
            frames.add_metric([feed], n)
        published = CounterMetricFamily("marketprism_records_published", "Records published to JetStream",
                                        labels=["exchange", "data_type"])
        latency = HistogramMetricFamily("marketprism_exchange_latency_seconds",
                                        "Exchange event time to collector receipt (negative: clock offset, see "
                                        "diagnose)", labels=["exchange", "data_type"])
        for key, entry in sorted(self.records.items()):
            entry = entry[:]  # one consistent copy (the scrape may run beside the event loop)
            published.add_metric(list(key), entry[-1])
            if key[1] == "gap":
                continue  # a gap has no exchange time of its own
            cumulative, buckets = 0, []
            for bound, n in zip((*EXCHANGE_LATENCY_BUCKETS, float("inf")), entry[:-2]):
                cumulative += n
                buckets.append((str(float(bound)) if bound != float("inf") else "+Inf", cumulative))
            latency.add_metric(list(key), buckets, entry[-2])
        yield frames
        yield published
        yield latency


def count_gap(exchange: str, market_type: str, stream_type: str, reason: str) -> None:
    GAPS.labels(exchange=exchange, stream_type=stream_type, reason=reason).inc()
    if stream_type == "orderbook":  # a broken book emits nothing until it is rebuilt from a new snapshot
        BOOK_RESYNCS.labels(exchange=exchange, market_type=market_type).inc()


def publish_failed(subject: str, reason: str) -> None:
    """subject is {data_type}.{exchange}.{market_type}.{symbol}; reason `rejected` or `ack_timeout`."""
    data_type, _, rest = subject.partition(".")
    PUBLISH_FAILURES.labels(exchange=rest.partition(".")[0], data_type=data_type, reason=reason).inc()


class _ReceivedAt(msgspec.Struct):
    received_at: int = 0


_received_at = msgspec.json.Decoder(_ReceivedAt)


def observe_collector_store_latency(payloads: Iterable[bytes], now_s: float | None = None) -> None:
    """COLLECTOR_STORE_LATENCY for stored records (JSON payloads carrying received_at), binned in one pass."""
    now_ms = (time.time() if now_s is None else now_s) * 1000
    values = []
    for data in payloads:
        try:
            values.append((now_ms - _received_at.decode(data).received_at) / 1000)
        except msgspec.MsgspecError:
            continue
    observe_many(COLLECTOR_STORE_LATENCY, values)


def observe_many(histogram: Histogram, values: list[float]) -> None:
    """Histogram.observe for a batch: one increment per bucket instead of one lock round per value."""
    try:
        bounds, buckets, total = histogram._upper_bounds, histogram._buckets, histogram._sum
    except AttributeError:  # a labelled parent or another client version: the public way
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)
        counts[i] = counts.get(i, 0) + 1
    for i, n in counts.items():
        buckets[i].inc(n)
    total.inc(sum(values))


class CoverageCollector:
    """Per-stream freshness, computed at scrape time from the live Coverage objects: setting a labelled
    gauge per record would cost the collector's hot path."""

    def __init__(self) -> None:
        self._coverages: weakref.WeakSet = weakref.WeakSet()

    def watch(self, coverage) -> None:
        self._coverages.add(coverage)

    def collect(self):
        labels = ["data_type", "exchange", "market_type"]
        age = GaugeMetricFamily("marketprism_coverage_age_seconds", "Seconds since the stream last delivered data",
                                labels=labels)
        limit = GaugeMetricFamily("marketprism_coverage_stale_after_seconds",
                                  "Age beyond which the stream counts as stale", labels=labels)
        now = time.time()
        newest: dict[tuple[str, str, str], tuple[float, float]] = {}
        for cov in list(self._coverages):  # several only in tests; one series per stream all the same
            for key, ts in list(cov.last.items()):
                if key not in newest or ts > newest[key][0]:
                    newest[key] = (ts, cov.stale_after(key[0]))
        for key, (ts, stale_after) in sorted(newest.items()):
            age.add_metric(list(key), max(0.0, now - ts))
            limit.add_metric(list(key), stale_after)
        yield age
        yield limit


class DiskCollector:
    """Free and total bytes of the file systems holding the watched data directories, read at scrape time."""

    def __init__(self) -> None:
        self.paths: set[str] = set()

    def watch(self, path: str) -> None:
        self.paths.add(str(path))

    def collect(self):
        free = GaugeMetricFamily("marketprism_disk_free_bytes", "Free bytes on the file system of a data directory",
                                 labels=["path"])
        size = GaugeMetricFamily("marketprism_disk_size_bytes", "Size of the file system of a data directory",
                                 labels=["path"])
        for path in sorted(self.paths):
            probe = Path(path)
            while not probe.exists() and probe != probe.parent:  # not created yet: its parent's file system
                probe = probe.parent
            try:
                usage = shutil.disk_usage(probe)
            except OSError:
                continue
            free.add_metric([path], usage.free)
            size.add_metric([path], usage.total)
        yield free
        yield size


COVERAGE = CoverageCollector()
DISK = DiskCollector()
TALLY = Tally()
REGISTRY.register(COVERAGE)
REGISTRY.register(DISK)
REGISTRY.register(TALLY)

DROPPED = Counter("marketprism_records_dropped_total",
                  "Records dropped because the JetStream backlog was at its bound (each run becomes a gap)",
                  ["exchange", "data_type"])
