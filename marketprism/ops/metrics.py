"""Prometheus metrics. The names are part of the interface (docs/operations.md lists them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

FRAMES = Counter("marketprism_messages_received_total", "WS frames and REST bodies received", ["feed"])
PUBLISHED = Counter("marketprism_records_published_total", "Records published to JetStream",
                    ["exchange", "data_type"])
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
