"""The spine end to end with real components: recorded Binance frames -> collector -> nats-server ->
storage-hot -> chDB. No mocks of NATS or ClickHouse."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal


from conftest import fixture_lines, wait_for
from marketprism import records
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.collector.service import Collector
from marketprism.exchanges.binance import BinanceSpotFeed
from marketprism.replay import replay
from marketprism.settings import load
from marketprism.store.hot import HotWriter
from recorded_server import RecordedBinance

TRADES = fixture_lines("binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl")
DIFFS = fixture_lines("binance_spot/depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl")
SNAPSHOT = fixture_lines("binance_spot/depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json")[0]


NOW_MS = int(time.time() * 1000)  # receipt time of re-published fixtures (the hot TTL counts from it)


class OneBatchWriter(HotWriter):
    """A storage-hot that stops fetching after its first insert, leaving the rest unacked in JetStream."""

    async def _insert(self, dt, group):
        await super()._insert(dt, group)
        self.stop()


def settings_for(addr: str, nats_url: str, **kw):
    env = {"MARKETPRISM_NATS_URL": nats_url, "MARKETPRISM_FEEDS": "binance_spot", "MARKETPRISM_SYMBOLS": "BTC-USDT",
           "MARKETPRISM_DATA_TYPES": "trade,orderbook", "MARKETPRISM_BINANCE_SPOT_WS_URL": f"ws://{addr}",
           "MARKETPRISM_BINANCE_SPOT_REST_URL": f"http://{addr}", "MARKETPRISM_BOOK_INTERVAL_MS": "0"}
    return load(environ=env, **kw)


async def start_bus(url: str):
    nc = await streams.connect(url)
    await streams.ensure(nc)
    return nc


def stored_trades(store) -> list[tuple]:
    return store.query("SELECT trade_id, price, quantity, side, toUnixTimestamp64Milli(timestamp), symbol, instrument "
                       "FROM marketprism_hot.trades FINAL ORDER BY trade_id").result_rows


def expected_trades() -> list[tuple]:
    return sorted((r.trade_id, Decimal(r.price), Decimal(r.quantity), r.side, r.timestamp, r.symbol, r.instrument)
                  for r in replay(BinanceSpotFeed(), TRADES, received_at=0))


async def run_pipeline(settings, store, until, timeout_s=30.0):
    nc = await start_bus(settings.nats_url)
    publisher = Publisher(nc)
    await publisher.start()
    collector = Collector(settings, publisher.publish)
    writer = HotWriter(nc, store, batch_rows=5000, flush_interval_s=0.1)
    tasks = [asyncio.create_task(collector.run()), asyncio.create_task(writer.run())]
    try:
        ok = await wait_for(until, timeout_s)
    finally:
        collector.stop()
        await tasks[0]
        assert await publisher.flush(10)
        await asyncio.sleep(0.3)
        writer.stop()
        await tasks[1]
        await publisher.close()
        await nc.drain()
    return ok, collector


async def test_trades_and_books_stored_exactly_once(nats_server, store):
    server = RecordedBinance(TRADES + DIFFS, SNAPSHOT)
    addr = await server.start()
    settings = settings_for(addr, nats_server.url)
    ok, collector = await run_pipeline(
        settings, store, lambda: store.count("marketprism_hot", "trade") >= 100
        and store.count("marketprism_hot", "orderbook") >= 198)
    await server.stop()
    assert ok, (store.count("marketprism_hot", "trade"), store.count("marketprism_hot", "orderbook"))
    assert stored_trades(store) == expected_trades()
    assert store.query("SELECT count() FROM marketprism_hot.trades").result_rows[0][0] == 100  # no dup rows
    # every applied diff gave one book; the last one equals the replayed book exactly
    books = store.query("SELECT sequence, bids, asks FROM marketprism_hot.orderbooks FINAL ORDER BY sequence").result_rows
    replayed = [r for r in replay(BinanceSpotFeed(), [SNAPSHOT] + DIFFS, received_at=0)]
    assert [b[0] for b in books] == [r.sequence for r in replayed]
    last_bids = [(Decimal(p), Decimal(q)) for p, q in replayed[-1].bids]
    assert [(p, q) for p, q in books[-1][1]] == last_bids
    # the only gap is the book's end of continuity when the collector stopped
    gaps = store.query("SELECT stream_type, reason, from_sequence FROM marketprism_hot.gaps FINAL").result_rows
    assert gaps == [("orderbook", "disconnect", replayed[-1].sequence + 1)]
    assert server.snapshot_requests == 1
    assert collector.health()["coverage"]["trade/binance/spot"]["status"] == "healthy"


async def test_same_records_published_twice_leave_one_row(nats_server, store):
    recs = list(replay(BinanceSpotFeed(), TRADES, received_at=NOW_MS))
    nc = await start_bus(nats_server.url)
    publisher = Publisher(nc)
    await publisher.start()
    for _ in range(2):
        for r in recs:
            await publisher.publish(records.subject(r), records.encode(r), records.dedup_key(r))
    assert await publisher.flush(10)
    assert publisher.duplicates == 100  # JetStream's duplicate window dropped the second copies
    writer = HotWriter(nc, store, flush_interval_s=0.1)
    task = asyncio.create_task(writer.run())
    assert await wait_for(lambda: store.count("marketprism_hot", "trade", final=False) >= 100)
    # the same rows inserted again directly (as a re-delivery after a lost ack would) collapse by key
    store.insert_json("marketprism_hot.trades_ingest", b"\n".join(records.encode(r) for r in recs))
    writer.stop()
    await task
    await publisher.close()
    await nc.drain()
    assert store.count("marketprism_hot", "trade", final=True) == 100
    assert stored_trades(store) == expected_trades()


async def test_restart_resumes_unacked_messages(nats_server, store):
    recs = list(replay(BinanceSpotFeed(), TRADES, received_at=NOW_MS))
    nc = await start_bus(nats_server.url)
    publisher = Publisher(nc)
    await publisher.start()
    for r in recs:
        await publisher.publish(records.subject(r), records.encode(r), records.dedup_key(r))
    assert await publisher.flush(10)
    # first writer takes batches of 10 and stops after its first insert: the rest stays in JetStream
    first = OneBatchWriter(nc, store, batch_rows=10, flush_interval_s=0.05)
    await first.run()
    assert first.inserted == 10
    info = await nc.jetstream().consumer_info("MARKET_DATA", "storage-hot")
    assert info.num_pending + info.num_ack_pending == 100 - first.inserted
    second = HotWriter(nc, store, flush_interval_s=0.1)
    task = asyncio.create_task(second.run())
    assert await wait_for(lambda: store.count("marketprism_hot", "trade", final=False) >= 100)
    second.stop()
    await task
    await publisher.close()
    await nc.drain()
    assert store.count("marketprism_hot", "trade", final=False) == 100
    assert stored_trades(store) == expected_trades()


async def test_bad_frames_are_counted_and_the_stream_goes_on(nats_server, store):
    garbage = [b"not json at all", TRADES[5][:40], b'{"stream":"btcusdt@trade","data":{"e":"trade"}}', b"\x00\x01"]
    server = RecordedBinance(TRADES, SNAPSHOT, garbage=garbage)
    addr = await server.start()
    settings = settings_for(addr, nats_server.url, data_types=("trade",))
    ok, collector = await run_pipeline(settings, store, lambda: store.count("marketprism_hot", "trade") >= 100)
    await server.stop()
    assert ok
    assert sum(collector.feeds["binance_spot"].errors.values()) == 4
    assert stored_trades(store) == expected_trades()


async def test_bad_payload_on_the_bus_is_terminated_not_fatal(nats_server, store):
    nc = await start_bus(nats_server.url)
    js = nc.jetstream()
    await js.publish("trade.binance.spot.BTC-USDT", b'{"data_type":"trade","price":1}', headers={"Nats-Msg-Id": "bad1"})
    good = next(iter(replay(BinanceSpotFeed(), TRADES[:1], received_at=NOW_MS)))
    await js.publish(records.subject(good), records.encode(good), headers={"Nats-Msg-Id": records.dedup_key(good)})
    writer = HotWriter(nc, store, flush_interval_s=0.1)
    task = asyncio.create_task(writer.run())
    assert await wait_for(lambda: writer.inserted >= 1 and writer.terminated >= 1)
    writer.stop()
    await task
    await nc.drain()
    assert (writer.inserted, writer.terminated) == (1, 1)


async def test_disconnect_resubscribes_resyncs_and_records_a_gap(nats_server, store):
    server = RecordedBinance(DIFFS, SNAPSHOT, drop_after=50)
    addr = await server.start()
    settings = settings_for(addr, nats_server.url, data_types=("orderbook",), reconnect_max_s=0.5)
    ok, collector = await run_pipeline(settings, store, lambda: store.count("marketprism_hot", "gap") >= 1
                                       and server.connections >= 2 and server.snapshot_requests >= 2)
    await server.stop()
    assert ok
    gap = store.query("SELECT stream_type, reason, from_sequence FROM marketprism_hot.gaps FINAL "
                      "ORDER BY timestamp").result_rows
    # the drop after 50 frames, then the stop at the end of the test
    assert gap[0] == ("orderbook", "disconnect", json.loads(DIFFS[49])["data"]["u"] + 1)
    assert len(gap) == 2
