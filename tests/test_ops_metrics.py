"""Metric values after a known simulator session: Binance spot trades and books through the real collector,
nats-server, storage-hot and chDB, with scripted faults (two malformed frames, one skipped book message, one
429 on the resync snapshot). The counters must say exactly what happened."""

from __future__ import annotations

import asyncio

import pytest_asyncio
from prometheus_client import REGISTRY

from conftest import wait_for
from marketprism import sim
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.collector.service import Collector
from marketprism.settings import load
from marketprism.store.hot import HotWriter

FEED = "binance_spot"


def value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def total(name: str, **match) -> float:
    """Sum over every label set of a family that matches the given labels."""
    out = 0.0
    for fam in REGISTRY.collect():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                out += s.value
    return out


WATCHED = {
    "published_trades": lambda: value("marketprism_records_published_total", exchange="binance", data_type="trade"),
    "published_books": lambda: value("marketprism_records_published_total", exchange="binance", data_type="orderbook"),
    "published": lambda: total("marketprism_records_published_total", exchange="binance"),
    "gaps": lambda: total("marketprism_records_published_total", exchange="binance", data_type="gap"),
    "parse_errors": lambda: total("marketprism_parse_errors_total", feed=FEED),
    "sequence_gaps": lambda: value("marketprism_gaps_total", exchange="binance", stream_type="orderbook",
                                   reason="sequence"),
    "book_gaps": lambda: total("marketprism_gaps_total", exchange="binance", stream_type="orderbook"),
    "resyncs": lambda: value("marketprism_book_resyncs_total", exchange="binance", market_type="spot"),
    "rest_429": lambda: value("marketprism_rest_requests_total", feed=FEED, status="429"),
    "rate_limit_waits": lambda: value("marketprism_rate_limit_waits_total", feed=FEED),
    "reconnects": lambda: value("marketprism_reconnects_total", feed=FEED),
    "rows_trades": lambda: value("marketprism_rows_inserted_total", table="trades"),
    "rows": lambda: total("marketprism_rows_inserted_total"),
    "batch_rows_sum": lambda: value("marketprism_insert_batch_rows_sum"),
    "batches": lambda: value("marketprism_insert_batch_rows_count"),
    "insert_durations": lambda: value("marketprism_insert_duration_seconds_count"),
    "latency_count": lambda: total("marketprism_exchange_latency_seconds_count", exchange="binance"),
    "store_latency_count": lambda: value("marketprism_store_latency_seconds_count"),
    "collector_store_latency_count": lambda: value("marketprism_collector_store_latency_seconds_count"),
}


def snapshot() -> dict[str, float]:
    return {k: fn() for k, fn in WATCHED.items()}


def delta(before: dict[str, float]) -> dict[str, float]:
    return {k: fn() - before[k] for k, fn in WATCHED.items()}


def settings_for(sim_url: str, nats_url: str):
    env = {"MARKETPRISM_NATS_URL": nats_url, "MARKETPRISM_FEEDS": FEED, "MARKETPRISM_SYMBOLS": "BTC-USDT",
           "MARKETPRISM_DATA_TYPES": "trade,orderbook", "MARKETPRISM_BOOK_INTERVAL_MS": "0",
           f"MARKETPRISM_{FEED.upper()}_WS_URL": sim_url.replace("http://", "ws://") + f"/{FEED}",
           f"MARKETPRISM_{FEED.upper()}_REST_URL": f"{sim_url}/{FEED}"}
    return load(environ=env)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session(tmp_path_factory, store_session):
    """Runs the session once; yields (metric deltas, simulator stats, stored trade count)."""
    from marketprism.bus.server import NatsServer, free_port
    from marketprism.store import schema
    for db in (schema.HOT, schema.COLD):
        store_session.command(f"TRUNCATE TABLE {db}.trades")
    server = NatsServer(str(tmp_path_factory.mktemp("nats")), free_port())
    await server.start()
    simulator = await sim.start(feeds=FEED, symbols="BTC-USDT", rate=40)
    nc = await streams.connect(server.url)
    await streams.ensure(nc)
    publisher = Publisher(nc)
    await publisher.start()
    before = snapshot()
    collector = Collector(settings_for(simulator.url, server.url), publisher.publish)
    writer = HotWriter(nc, store_session, batch_rows=5000, flush_interval_s=0.1)
    tasks = [asyncio.create_task(collector.run()), asyncio.create_task(writer.run())]
    try:
        assert await wait_for(lambda: delta(before)["published_books"] >= 20, 10)
        simulator.inject([{"type": "rest_status", "feed": FEED, "status": 429, "retry_after": 0, "count": 1,
                           "path": "/api/v3/depth"},
                          {"type": "malformed", "feed": FEED, "count": 2},
                          {"type": "skip_sequence", "feed": FEED, "count": 1}])
        books_at_gap = await wait_for(lambda: delta(before)["sequence_gaps"] and delta(before)["published_books"], 10)
        assert await wait_for(lambda: delta(before)["published_books"] > books_at_gap + 10, 15), "book not resynced"
        simulator.inject({"type": "stale", "feed": FEED, "seconds": 60})  # quiet from here on
        sent = lambda: simulator.stats()["sent"][FEED].get("trade", 0)  # noqa: E731
        assert await wait_for(lambda: delta(before)["published_trades"] == sent() > 0, 10)
    finally:
        collector.stop()
        await tasks[0]
        assert await publisher.flush(10)
    published = delta(before)["published"]
    assert await wait_for(lambda: delta(before)["rows"] >= published, 15)
    writer.stop()
    await tasks[1]
    await publisher.close()
    await nc.drain()
    stats = simulator.stats()["sent"][FEED]
    await simulator.stop()
    server.stop()
    d = delta(before)
    # The collector sets this counter to its feed's own count (service.py _count_errors), so a collector
    # created earlier in this test process does not show up as a delta: take the absolute value then.
    d["parse_errors_absolute"] = WATCHED["parse_errors"]()
    d["feed_parse_errors"] = sum(collector.feeds[FEED].errors.values())
    yield d, stats, store_session.count("marketprism_hot", "trade")


def test_collector_counters_match_the_script(session):
    d, sent, _ = session
    assert d["feed_parse_errors"] == 2 and 2 in (d["parse_errors"], d["parse_errors_absolute"])
    assert d["sequence_gaps"] == 1
    assert d["rest_429"] == 1 and d["rate_limit_waits"] == 1
    assert d["reconnects"] == 0
    assert d["published_trades"] == sent["trade"]


def test_store_counters_match_what_was_published(session):
    d, sent, stored_trades = session
    assert d["rows_trades"] == d["published_trades"] == stored_trades
    assert d["rows"] == d["published"]  # every record, gaps included, inserted exactly once
    assert d["batch_rows_sum"] == d["rows"]
    assert d["batches"] == d["insert_durations"] > 0


def test_latency_and_resync_counters(session):
    d, _, _ = session
    assert d["latency_count"] == d["published"] - d["gaps"]  # one observation per non-gap record
    assert d["resyncs"] == d["book_gaps"] >= 1


def test_collector_store_latency_is_sampled_per_insert(session):
    d, _, _ = session
    assert d["batches"] <= d["collector_store_latency_count"] <= d["batches"] + d["rows"] / 16  # rows 0, 16, 32..
