"""Disk pressure (issue 9, item 6): the MARKET_DATA stream reaches its byte limit while storage-hot is down.

Real nats-server, simulator, collector and storage-hot processes; the stream shrunk to 256 KiB after `init`
so that its limit is reached in seconds. With `discard: new` JetStream refuses further publishes: the
collector counts them (metric, /health degraded with the reason), holds them up to its bound
(publish_max_pending) and turns what does not fit into `backpressure` gaps; it neither crashes nor grows.
Once storage-hot runs, interest retention frees the stream, the held publishes are accepted, health
returns to healthy, and every trade the simulator sent is stored exactly once or lies in a recorded gap."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from prometheus_client import REGISTRY

from faults_support import wait
from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from soak_support import TunedStack, drained, duplicates, rss_mb, stream_state, trade_accounting, update_stream

MAX_BYTES = 256 * 1024
MAX_PENDING = 2000
RATE = 200  # trade + depth messages per second for the one symbol: ~100 trades/s, ~35 KB/s into MARKET_DATA


@pytest.fixture
def stack(tmp_path):
    s = TunedStack(tmp_path, feeds=("binance_spot",), rate=RATE,
                   extra={"MARKETPRISM_PUBLISH_MAX_PENDING": str(MAX_PENDING), "MARKETPRISM_GRACE_S": "2"})
    yield s
    s.close()


def collector(stack) -> dict:
    return (stack.health("collector") or {}).get("collector", {})


def test_full_stream_rejects_visibly_stays_bounded_and_recovers_without_loss(stack):
    started = time.monotonic()
    stack.start_nats()
    stack.start_sim()
    stack.init()
    assert update_stream(stack.nats_port, "MARKET_DATA", max_bytes=MAX_BYTES) == {"max_bytes": MAX_BYTES}
    proc = stack.start("collector")  # storage-hot not running: nothing frees the stream

    # JetStream refuses: counted in the metric, shown by /health
    wait(lambda: stack.metric("collector", "marketprism_publish_failures_total", reason="rejected") > 0, 60)
    pressure = time.monotonic()
    wait(lambda: collector(stack).get("status") == "degraded", 20)
    health = collector(stack)
    assert health["publish_rejecting"] is True and health["publish_rejected"] > 0
    assert health["last_rejection"] == "maximum bytes exceeded"
    full = stream_state(stack.nats_port, "MARKET_DATA")
    assert MAX_BYTES * 0.9 < full["bytes"] <= MAX_BYTES

    # bounded: pending never past its limit, the overflow becomes drops (a gap later), RSS flat
    pending, rss = [], []
    wait(lambda: stack.metric("collector", "marketprism_records_dropped_total") > 0, 60, 0.3)
    for _ in range(20):  # 10 s under pressure
        assert proc.poll() is None, "collector died under disk pressure"
        pending.append(collector(stack)["publish_pending"])
        rss.append(rss_mb(proc.pid))
        time.sleep(0.5)
    assert max(pending) <= MAX_PENDING and max(pending) >= MAX_PENDING * 0.9
    assert max(rss) - min(rss) < 20, rss  # MB: held publishes are bounded, drops keep only a range per stream
    dropped = stack.metric("collector", "marketprism_records_dropped_total")
    rejected = stack.metric("collector", "marketprism_publish_failures_total", reason="rejected")

    # storage-hot frees the stream; the held publishes go in; health recovers
    stack.start("storage-hot")
    recovery = time.monotonic()
    pressure_s = recovery - pressure
    wait(lambda: collector(stack).get("publish_pending", MAX_PENDING) < 200, 90)
    wait(lambda: collector(stack).get("status") == "healthy", 60)
    recovered_s = time.monotonic() - recovery
    assert collector(stack)["publish_rejecting"] is False
    overflow_gaps = stack.metric("collector", "marketprism_gaps_total", reason="backpressure")
    assert overflow_gaps > 0  # published once there was room again

    # stop the source, let everything reach the store, account for every trade
    stack.sim_fault({"type": "stale", "seconds": 3600})
    (sent,) = wait(lambda: stable(stack.sent_trades), 20)
    wait(lambda: stack.metric("collector", "marketprism_records_published_total", data_type="trade")
         + stack.metric("collector", "marketprism_records_dropped_total", data_type="trade")
         == sent["binance_spot"], 20)
    assert stack.kill("collector", signal.SIGTERM) == 0
    wait(lambda: drained(stack.nats_port), 60)
    assert stack.kill("storage-hot", signal.SIGTERM) == 0
    after = stream_state(stack.nats_port, "MARKET_DATA")
    acct = trade_accounting(stack, sent)
    stored_gaps = stack.query("SELECT stream_type, count() FROM marketprism_hot.gaps WHERE reason = 'backpressure' "
                              "GROUP BY 1 ORDER BY 1")
    dups = duplicates(stack)
    print(f"\nFAULT disk pressure: max_bytes={MAX_BYTES} stream_bytes_full={full['bytes']} rejected={rejected:.0f} "
          f"dropped={dropped:.0f} max_pending={max(pending)} rss_mb={min(rss):.1f}..{max(rss):.1f} "
          f"full_for_s={pressure_s:.1f} recovered_in_s={recovered_s:.1f} backpressure_gaps={stored_gaps} "
          f"stream_after={after} accounting={acct} "
          f"rows_vs_keys={dups} wall_s={time.monotonic() - started:.1f}")
    assert acct["unexplained_holes"] == [] and acct["missing_ids_outside_gaps"] == 0
    assert acct["ids_in_range"] == acct["sent"]  # Binance spot: every sent id is between the first and last stored
    assert acct["missing_ids_in_gaps"] == acct["lost"] > 0  # the overflow: lost, but inside recorded gaps
    assert all(rows == keys for rows, keys in dups.values()), dups
    assert int(dict(stored_gaps).get("trade", 0)) >= 1, stored_gaps  # the overflow is a recorded gap
    assert after["messages"] == 0  # interest retention: everything stored was removed from the stream


def stable(read) -> tuple | None:
    """(value,) once two reads half a second apart agree."""
    first = read()
    time.sleep(0.5)
    return (first,) if read() == first else None


def failures(reason: str) -> float:
    labels = {"exchange": "publishtest", "data_type": "trade", "reason": reason}
    return REGISTRY.get_sample_value("marketprism_publish_failures_total", labels) or 0.0


async def test_publish_failures_are_counted_by_reason(nats_server):
    """In process: a lost ack is re-sent and counted as `ack_timeout`; a refusal by a full stream is counted as
    `rejected` each time, its re-sends are not ack timeouts, and the message goes in once there is room."""
    nc = await streams.connect(nats_server.url)
    await streams.ensure(nc)
    js = nc.jetstream()
    before = {r: failures(r) for r in ("rejected", "ack_timeout")}
    publisher = Publisher(nc, ack_timeout_s=0.4)
    lost: list[bytes] = []
    on_ack = publisher._on_ack

    def lose_first_ack(subject: bytes, reply: bytes, data: bytes) -> None:
        if not lost:
            lost.append(subject)
            return
        on_ack(subject, reply, data)
    publisher._on_ack = lose_first_ack
    await publisher.start()
    try:
        await publisher.publish("trade.publishtest.spot.BTC-USDT", b'{"n": 1}', "publishtest-1")
        assert await publisher.flush(5)
        assert (failures("ack_timeout") - before["ack_timeout"], publisher.duplicates) == (1, 1)

        cfg = (await js.stream_info("MARKET_DATA")).config
        cfg.max_bytes = 1024
        await js.update_stream(cfg)
        await publisher.publish("trade.publishtest.spot.BTC-USDT", b'{"n": "%s"}' % (b"2" * 2000), "publishtest-2")
        await asyncio.sleep(1.5)  # refused, re-sent after 0.4 s, refused again ...
        assert failures("rejected") - before["rejected"] == publisher.rejected >= 2
        assert failures("ack_timeout") - before["ack_timeout"] == 1
        assert publisher.last_rejection[1] == "maximum bytes exceeded" and len(publisher.pending) == 1
        cfg.max_bytes = 1 << 20
        await js.update_stream(cfg)
        assert await publisher.flush(5)  # room again: the held message is accepted
        assert (await js.stream_info("MARKET_DATA")).state.messages == 2
    finally:
        await publisher.close()
        await nc.drain()
