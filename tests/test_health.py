"""Health without exchanges: coverage thresholds and grace on a controlled clock, the health server's status
codes and ports, `--check`, and the metric helpers the collector and storage-hot call."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from prometheus_client import REGISTRY

from marketprism.bus.server import free_port
from marketprism.collector.coverage import Coverage
from marketprism.ops import cli, metrics
from marketprism.ops.health import HealthServer, Rate
from marketprism.settings import load


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_coverage_goes_starting_healthy_degraded_healthy():
    clock = Clock()
    cov = Coverage(grace_s=120, clock=clock)
    assert cov.status() == "starting" and cov.grace_remaining() == 120
    cov.seen("trade", "okx", "spot")
    cov.seen("funding_rate", "okx", "perpetual")
    clock.now += 121
    assert cov.status() == "degraded"  # the trade stream is 121 s old: stale after 60 s
    cov.seen("trade", "okx", "spot")
    assert cov.status() == "healthy"
    clock.now += 61
    report = cov.report()
    assert report["trade/okx/spot"] == {"last_success_ts": clock.now - 61, "age_s": 61.0, "stale_after_s": 60.0,
                                        "status": "stale"}
    assert report["funding_rate/okx/perpetual"]["status"] == "healthy"  # 182 s, threshold 8 h
    assert cov.status() == "degraded"
    cov.seen("trade", "okx", "spot")  # recovery
    assert cov.status() == "healthy"


def test_coverage_thresholds_are_configurable_per_kind():
    clock = Clock()
    cov = Coverage(grace_s=0, stale_fast_s=5, stale_liquidation_s=50, stale_slow_s=500, clock=clock)
    assert cov.status() == "unhealthy"  # past the grace and nothing ever arrived
    for dt in ("trade", "orderbook", "liquidation", "open_interest"):
        cov.seen(dt, "binance", "perpetual")
    clock.now += 6
    stale = {k for k, v in cov.report().items() if v["status"] == "stale"}
    assert stale == {"trade/binance/perpetual", "orderbook/binance/perpetual"}
    clock.now += 45
    assert "liquidation/binance/perpetual" in {k for k, v in cov.report().items() if v["status"] == "stale"}
    clock.now += 450
    assert cov.status() == "unhealthy"  # every stream stale: nothing is being collected


def test_coverage_from_settings():
    s = load(environ={"MARKETPRISM_GRACE_S": "7", "MARKETPRISM_STALE_FAST_S": "2", "MARKETPRISM_STALE_SLOW_S": "9",
                      "MARKETPRISM_STALE_LIQUIDATION_S": "3"})
    cov = Coverage.from_settings(s)
    assert (cov.grace_s, cov.stale_after("orderbook"), cov.stale_after("liquidation"),
            cov.stale_after("volatility_index")) == (7, 2, 3, 9)


def test_coverage_is_exported_at_scrape_time():
    clock = Clock()
    cov = Coverage(grace_s=0, stale_fast_s=60, clock=clock)
    cov.seen("trade", "testex", "spot")
    labels = {"data_type": "trade", "exchange": "testex", "market_type": "spot"}
    assert REGISTRY.get_sample_value("marketprism_coverage_stale_after_seconds", labels) == 60
    assert REGISTRY.get_sample_value("marketprism_coverage_age_seconds", labels) is not None


def test_rate_per_minute_over_a_window():
    clock = Clock()
    rate = Rate(window_s=300, clock=clock)
    assert rate.per_min(0) == 0
    clock.now += 60
    assert rate.per_min(10) == 10
    clock.now += 600  # the old samples leave the window
    rate.per_min(10)
    clock.now += 60
    assert rate.per_min(13) == pytest.approx(3 * 60 / 660, abs=0.01)


def test_metric_helpers():
    def value(name, labels=None):
        return REGISTRY.get_sample_value(name, labels or {}) or 0

    lat = {"exchange": "testex", "data_type": "trade"}
    before = value("marketprism_exchange_latency_seconds_count", lat)
    metrics.TALLY.published("testex", "trade", 1_000_050, 1_000_000)  # 50 ms
    metrics.TALLY.published("testex", "trade", 1_000_000, 1_000_100)  # -100 ms: a clock offset
    metrics.TALLY.published("testex", "gap")
    assert value("marketprism_exchange_latency_seconds_count", lat) == before + 2
    assert value("marketprism_exchange_latency_seconds_sum", lat) == pytest.approx(-0.05)
    assert [value("marketprism_exchange_latency_seconds_bucket", {**lat, "le": le})
            for le in ("0.005", "0.025", "0.05", "0.1", "+Inf")] == [1, 1, 2, 2, 2]  # le: upper bound included
    assert value("marketprism_records_published_total", lat) == 2
    assert value("marketprism_records_published_total", {**lat, "data_type": "gap"}) == 1
    assert value("marketprism_exchange_latency_seconds_count", {**lat, "data_type": "gap"}) == 0  # no time of its own
    metrics.TALLY.frame("testex_feed")
    assert value("marketprism_messages_received_total", {"feed": "testex_feed"}) == 1

    resync = {"exchange": "testex", "market_type": "spot"}
    metrics.count_gap("testex", "spot", "orderbook", "sequence")
    metrics.count_gap("testex", "spot", "trade", "sequence")
    assert value("marketprism_book_resyncs_total", resync) == 1
    assert value("marketprism_gaps_total", {"exchange": "testex", "stream_type": "trade", "reason": "sequence"}) == 1

    metrics.publish_failed("trade.testex.spot.BTC-USDT", "rejected")
    assert value("marketprism_publish_failures_total",
                 {"exchange": "testex", "data_type": "trade", "reason": "rejected"}) == 1

    name = "marketprism_collector_store_latency_seconds"
    count, total = value(name + "_count"), value(name + "_sum")
    payloads = [b'{"data_type":"trade","received_at":1000000}', b'{"received_at":1009000}', b"not json"]
    metrics.observe_collector_store_latency(payloads, now_s=1010.0)
    assert value(name + "_count") == count + 2
    assert value(name + "_sum") == pytest.approx(total + 10 + 1)
    assert value(name + "_bucket", {"le": "1.0"}) >= 1


async def _get(url: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, (await r.json() if r.content_type == "application/json" else await r.text())


async def test_health_server_status_codes_ports_and_check():
    state = {"status": "healthy"}
    metrics_port = free_port()
    server = HealthServer("127.0.0.1", 0, {"collector": lambda: dict(state)}, role="collector",
                          metrics_port=metrics_port)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        settings = load(environ={"MARKETPRISM_HEALTH_PORT": str(server.port)})
        for status, code, check in (("healthy", 200, 0), ("starting", 200, 0), ("degraded", 200, 0),
                                    ("unhealthy", 503, 1)):
            state["status"] = status
            got, body = await _get(url + "/health")
            assert (got, body["status"], body["collector"]["status"], body["role"]) == (code, status, status,
                                                                                        "collector")
            assert await asyncio.to_thread(cli._check, settings, "collector") == check
        got, text = await _get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert got == 200 and 'marketprism_health_status{section="collector"} 3.0' in text
        assert "process_resident_memory_bytes" in text and "marketprism_build_info" in text
        got, _ = await _get(f"http://127.0.0.1:{metrics_port}/health")
        assert got == 404  # the metrics port serves /metrics only
    finally:
        await server.stop()
    assert await asyncio.to_thread(cli._check, settings, "collector") == 1  # nothing answers


async def test_taken_metrics_port_is_a_warning_unless_configured():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lenient = HealthServer("127.0.0.1", 0, {}, metrics_port=port, metrics_port_required=False)
        await lenient.start()
        assert lenient.metrics_port == 0  # /metrics stays on the health port
        got, _ = await _get(f"http://127.0.0.1:{lenient.port}/metrics")
        assert got == 200
        await lenient.stop()
        strict = HealthServer("127.0.0.1", 0, {}, metrics_port=port)
        with pytest.raises(OSError, match=f"metrics port 127.0.0.1:{port} is taken"):
            await strict.start()
        with pytest.raises(OSError, match=f"health port 127.0.0.1:{port} is taken"):
            await HealthServer("127.0.0.1", port, {}).start()


def test_for_role_ports():
    s = load(environ={"MARKETPRISM_HEALTH_PORT": "0"})
    assert HealthServer.for_role(s, "collector", {}).metrics_port == 9093
    assert HealthServer.for_role(s, "run", {}).metrics_port == 9093
    assert HealthServer.for_role(s, "storage-hot", {}).metrics_port == 0
    explicit = load(environ={"MARKETPRISM_METRICS_PORT": "9999"})
    server = HealthServer.for_role(explicit, "storage-hot", {})
    assert (server.port, server.metrics_port, server.metrics_port_required) == (8085, 9999, True)
