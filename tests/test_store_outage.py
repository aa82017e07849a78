"""ClickHouse unavailable (issue 9, fault 3): JetStream holds the backlog, storage-hot retries with
backoff and no busy loop, and drains after recovery with zero loss.

There is no ClickHouse server to stop here, so the outage is injected at the store boundary: the real chDB
store underneath, every insert failing with the error clickhouse-connect raises for a refused
connection while the outage lasts: 10 s in the suite, STORE_OUTAGE_S=60 for the issue's full minute (the
backoff is capped at 30 s)."""

from __future__ import annotations

import asyncio
import os
import time

from clickhouse_connect.driver.exceptions import OperationalError

from conftest import fixture_lines, wait_for
from marketprism import records
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.exchanges.binance import BinanceSpotFeed
from marketprism.replay import replay
from marketprism.store.client import Store
from marketprism.store.hot import HotWriter

OUTAGE_S = float(os.environ.get("STORE_OUTAGE_S", "10"))


class OutageStore(Store):
    def __init__(self, real: Store) -> None:
        super().__init__(real.client)
        self.down_until = 0.0
        self.attempts_while_down = 0

    def insert_json(self, table: str, rows: bytes) -> None:
        if time.monotonic() < self.down_until:
            self.attempts_while_down += 1
            raise OperationalError("Error HTTPConnectionPool(host='clickhouse', port=8123): Connection refused")
        super().insert_json(table, rows)


async def test_store_outage_backs_off_holds_backlog_and_drains(nats_server, store):
    recs = list(replay(BinanceSpotFeed(), fixture_lines("binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"),
                       received_at=int(time.time() * 1000)))
    nc = await streams.connect(nats_server.url)
    await streams.ensure(nc)
    publisher = Publisher(nc)
    await publisher.start()
    outage = OutageStore(store)
    outage.down_until = time.monotonic() + OUTAGE_S
    writer = HotWriter(nc, outage, batch_rows=20, flush_interval_s=0.1)
    task = asyncio.create_task(writer.run())
    for r in recs:
        await publisher.publish(records.subject(r), records.encode(r), records.dedup_key(r))
    assert await publisher.flush(10)
    await asyncio.sleep(OUTAGE_S / 2)
    info = await nc.jetstream().consumer_info("MARKET_DATA", "storage-hot")
    assert info.num_pending + info.num_ack_pending == 100  # JetStream holds everything meanwhile
    assert writer.health()["failing"] and store.count("marketprism_hot", "trade", final=False) == 0
    assert await wait_for(lambda: store.count("marketprism_hot", "trade", final=False) >= 100, OUTAGE_S + 40)
    writer.stop()
    await task
    await publisher.close()
    await nc.drain()
    # exponential backoff (0.5 s doubling): a handful of attempts in 10 s, not a busy loop
    assert 1 <= outage.attempts_while_down <= 12
    print(f"\nFAULT ClickHouse outage {OUTAGE_S:.0f} s: attempts {outage.attempts_while_down}, stored 100 of 100")
    assert store.count("marketprism_hot", "trade", final=False) == 100  # zero loss, no duplicates
    assert writer.terminated == 0 and not writer.health()["failing"]
