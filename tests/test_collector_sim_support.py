"""Helpers for the collector-against-simulator tests (no tests here): settings pointing every feed at an
in-process simulator, and the real pipeline (collector -> nats-server -> storage-hot -> chDB) as an async
context manager, so a test can inject faults while it runs and read the store afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from conftest import wait_for
from marketprism import records
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.collector.service import Collector
from marketprism.ops import metrics
from marketprism.settings import FEEDS, Settings, load
from marketprism.store.hot import DURABLE, STREAMS, HotWriter

# feed -> (exchange, market types it carries); records are told apart by these.
FEED_MARKETS = {"binance_spot": ("binance", ("spot",)), "binance_usdm": ("binance", ("perpetual",)),
                "okx": ("okx", ("spot", "perpetual")), "deribit": ("deribit", ("perpetual", "futures", "options")),
                "bybit_spot": ("bybit", ("spot",)), "bybit_linear": ("bybit", ("perpetual",))}


def feed_of(exchange: str, market_type: str) -> str:
    return next(f for f, (ex, mts) in FEED_MARKETS.items() if ex == exchange and market_type in mts)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sim_settings(sim_url: str, nats_url: str, feeds=FEEDS, **overrides) -> Settings:
    env = {"MARKETPRISM_NATS_URL": nats_url, "MARKETPRISM_FEEDS": ",".join(feeds)}
    for feed in feeds:
        env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = sim_url.replace("http://", "ws://") + f"/{feed}"
        env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"{sim_url}/{feed}"
    return load(environ=env, **overrides)


@dataclass
class Session:
    collector: Collector
    writer: HotWriter
    publisher: Publisher
    published: list[bytes] = field(default_factory=list)  # every payload, in publish order (capture=True)


@asynccontextmanager
async def pipeline(settings: Settings, store, recorder=None, capture: bool = False):
    """collector + storage-hot in this process on a real nats-server; on exit everything published is
    acknowledged and stored before the roles stop (as `run` drains)."""
    nc = await streams.connect(settings.nats_url)
    await streams.ensure(nc)
    publisher = Publisher(nc)
    await publisher.start()
    session = Session(None, HotWriter(nc, store, batch_rows=5000, flush_interval_s=0.1), publisher)

    async def publish(subject: str, payload: bytes, msg_id: str, token=None) -> None:
        if capture:
            session.published.append(payload)
        await publisher.publish(subject, payload, msg_id, token)

    session.collector = Collector(settings, publish, recorder)
    tasks = [asyncio.create_task(session.collector.run()), asyncio.create_task(session.writer.run())]
    parse_errors = counter_values(metrics.PARSE_ERRORS)
    try:
        yield session
    finally:
        session.collector.stop()
        await tasks[0]
        if recorder is not None:
            recorder.close()
        assert await publisher.flush(10)
        assert await wait_for(lambda: consumed(nc), 15), "storage-hot did not store everything published"
        session.writer.stop()
        await tasks[1]
        await publisher.close()
        await nc.drain()
        # The collector *sets* the parse-error counters to its own feeds' counts, so another collector
        # later in this process would start from ours: put them back as they were (one collector per
        # process in production; tests run many).
        restore(metrics.PARSE_ERRORS, parse_errors)


async def consumed(nc) -> bool:
    """Nothing left for storage-hot: every message of both streams delivered and acknowledged."""
    for stream in STREAMS:
        info = await nc.jetstream().consumer_info(stream, DURABLE)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


def counter_values(counter) -> dict[tuple, float]:
    return {labels: child._value.get() for labels, child in counter._metrics.items()}


def restore(counter, values: dict[tuple, float]) -> None:
    for labels, child in counter._metrics.items():
        child._value.set(values.get(labels, 0.0))


def rows(store, sql: str) -> list[dict]:
    result = store.query(sql)
    return [dict(zip(result.column_names, r)) for r in result.result_rows]


def gaps(store, since_ms: int = 0) -> list[dict]:
    """Gap rows whose time is at or after since_ms, times as integer milliseconds."""
    return rows(store, "SELECT exchange, market_type, symbol, instrument, stream_type, reason, from_sequence, "
                       "to_sequence, toUnixTimestamp64Milli(timestamp) AS ts FROM marketprism_hot.gaps FINAL "
                       f"WHERE toUnixTimestamp64Milli(timestamp) >= {since_ms} ORDER BY timestamp")


def stored_after(store, since_ms: int, table: str = "orderbooks") -> set[tuple[str, str, str]]:
    """(exchange, market_type, symbol) that stored a row with an event time after since_ms."""
    return {tuple(r) for r in store.query(
        f"SELECT exchange, market_type, symbol FROM marketprism_hot.{table} "
        f"WHERE toUnixTimestamp64Milli(timestamp) > {since_ms} GROUP BY 1, 2, 3").result_rows}


def instruments(store, table: str = "orderbooks") -> set[tuple[str, str, str]]:
    return {tuple(r) for r in store.query(
        f"SELECT exchange, market_type, symbol FROM marketprism_hot.{table} GROUP BY 1, 2, 3").result_rows}


def metric(counter, **labels) -> float:
    return counter.labels(**labels)._value.get()


def counters(counter, feeds=FEEDS) -> dict[str, float]:
    return {f: metric(counter, feed=f) for f in feeds}


def record_feed(rec: dict) -> str:
    return feed_of(rec["exchange"], rec["market_type"])


def decode_all(payloads: list[bytes]) -> list[dict]:
    """Published payloads as JSON objects (validated against the vocabulary first)."""
    for p in payloads:
        records.decode(p)
    return [json.loads(p) for p in payloads]

