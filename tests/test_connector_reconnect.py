"""Reconnect behaviour per venue, end to end: simulator -> collector -> nats-server -> storage-hot -> chDB.

After the simulator drops a feed's socket the collector reconnects with backoff, subscribes again, the
book resyncs from a new snapshot by its venue's rule (Binance: REST; OKX, Deribit, Bybit: the snapshot a
new subscription brings), a gap is stored for the book and for the other streams of the connection,
and no row is stored twice (count = count FINAL = distinct keys, in every table)."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import wait_for
from marketprism import records
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.collector.service import Collector
from marketprism.ops import metrics
from marketprism.settings import FEEDS, load
from marketprism.sim import start
from marketprism.store.hot import HotWriter

# How each venue's book snapshot shows in what the collector received (REST path or WS frame).
SNAPSHOT = {
    "binance_spot": lambda source, text: "/depth?" in source,
    "binance_usdm": lambda source, text: "/depth?" in source,
    "okx": lambda source, text: '"channel":"books"' in text and '"action":"snapshot"' in text,
    "deribit": lambda source, text: '"channel":"book.' in text and '"type":"snapshot"' in text,
    "bybit_spot": lambda source, text: '"topic":"orderbook.' in text and '"type":"snapshot"' in text,
    "bybit_linear": lambda source, text: '"topic":"orderbook.' in text and '"type":"snapshot"' in text,
}


class Snapshots:
    """A recorder that only counts the book snapshots the collector received."""

    def __init__(self, feed: str) -> None:
        self.is_snapshot = SNAPSHOT[feed]
        self.count = 0

    def write(self, feed: str, received_at: int, source: str, data) -> None:
        text = data if isinstance(data, str) else data.decode(errors="replace")
        self.count += self.is_snapshot(source, text)

    def close(self) -> None:
        pass


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def one(store, sql: str):
    return store.query(sql).result_rows[0][0]


def duplicates(store) -> dict[str, tuple[int, int, int]]:
    """Per table with rows: (count, count FINAL, distinct dedup keys) where they differ."""
    out = {}
    for dt, table in records.TABLE_FOR.items():
        key = ", ".join(("exchange", "market_type", "symbol", *records.KEY_FIELDS[dt]))
        n = one(store, f"SELECT count() FROM marketprism_hot.{table}")
        final = one(store, f"SELECT count() FROM marketprism_hot.{table} FINAL")
        distinct = one(store, f"SELECT uniqExact({key}) FROM marketprism_hot.{table}")
        if not n == final == distinct:
            out[table] = (n, final, distinct)
    return out


@pytest.mark.parametrize("feed", FEEDS)
async def test_drop_reconnects_resyncs_records_gaps_and_stores_nothing_twice(feed, nats_server, store):
    sim = await start(port=0, feeds=(feed,), symbols="BTC-USDT", rate=60, speed=20, seed=5)
    env = {"MARKETPRISM_NATS_URL": nats_server.url, "MARKETPRISM_FEEDS": feed, "MARKETPRISM_SYMBOLS": "BTC-USDT",
           f"MARKETPRISM_{feed.upper()}_WS_URL": sim.url.replace("http://", "ws://") + f"/{feed}",
           f"MARKETPRISM_{feed.upper()}_REST_URL": f"{sim.url}/{feed}"}
    settings = load(environ=env, reconnect_max_s=0.5, connect_timeout_s=5.0)
    nc = await streams.connect(settings.nats_url)
    await streams.ensure(nc)
    publisher = Publisher(nc)
    await publisher.start()
    snapshots = Snapshots(feed)
    collector = Collector(settings, publisher.publish, snapshots)
    writer = HotWriter(nc, store, batch_rows=5000, flush_interval_s=0.1)
    tasks = [asyncio.create_task(collector.run()), asyncio.create_task(writer.run())]
    reconnects = metrics.RECONNECTS.labels(feed=feed)._value.get()
    try:
        assert await wait_for(lambda: store.count("marketprism_hot", "orderbook") > 0
                              and store.count("marketprism_hot", "trade") > 0, 10)
        books = 2 if feed == "okx" else 1  # OKX: BTC-USDT spot and BTC-USDT-SWAP
        assert await wait_for(lambda: snapshots.count == books, 5)
        dropped = now_ms()
        sim.inject({"type": "drop", "feed": feed})
        assert await wait_for(lambda: snapshots.count >= 2 * books and one(
            store, f"SELECT count() FROM marketprism_hot.orderbooks WHERE timestamp > fromUnixTimestamp64Milli({dropped})") > 0
            and one(store, f"SELECT count() FROM marketprism_hot.trades WHERE timestamp > fromUnixTimestamp64Milli({dropped})") > 0, 10)
        assert sim.stats()["feeds"][feed]["connections"] == 1  # the old socket is gone, one new one
        stopped = now_ms()
    finally:
        collector.stop()
        await tasks[0]
        assert await publisher.flush(10)
        await asyncio.sleep(0.3)
        writer.stop()
        await tasks[1]
        await publisher.close()
        await nc.drain()
        await sim.stop()
    assert metrics.RECONNECTS.labels(feed=feed)._value.get() - reconnects >= 1
    gaps = store.query("SELECT stream_type, reason, toUnixTimestamp64Milli(started_at), toUnixTimestamp64Milli(ended_at) "
                       f"FROM marketprism_hot.gaps FINAL WHERE timestamp >= fromUnixTimestamp64Milli({dropped}) "
                       f"AND timestamp < fromUnixTimestamp64Milli({stopped})").result_rows
    kinds = {(stream_type, reason) for stream_type, reason, _, _ in gaps}
    assert ("orderbook", "disconnect") in kinds, gaps
    if feed == "binance_spot":
        assert ("trade", "disconnect") not in kinds  # trade ids tell any loss exactly, as a sequence gap
    else:
        assert ("trade", "disconnect") in kinds, gaps
    assert all(start <= end for _, _, start, end in gaps)
    assert duplicates(store) == {}
