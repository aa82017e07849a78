"""The roles as asyncio programs: run (embedded all-in-one), collector, storage-hot, init.

Lifecycle: bounded connect retries, signal handlers that drain (stop fetching -> flush -> ack -> close).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from loguru import logger

from marketprism.bus import streams
from marketprism.bus.publisher import Publisher
from marketprism.bus.server import NatsServer
from marketprism.collector.coverage import Coverage
from marketprism.collector.service import Collector
from marketprism.ops.health import ConsumerWatch, HealthServer, Rate
from marketprism.ops.lock import InstanceLock
from marketprism.ops import metrics
from marketprism import record
from marketprism.settings import Settings
from marketprism.store import schema
from marketprism.store.client import Store, connect, redact
from marketprism.store.cold import Archiver
from marketprism.store.hot import DURABLE, STREAMS, HotWriter


def _on_signals(stop) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


async def _nats(settings: Settings, name: str, url: str | None = None):
    """The NATS connection, retried with backoff. connect_timeout_s bounds the whole wait (every try and pause
    included), so an unreachable URL fails the role within it with one line naming the key."""
    key = "nats_url" if settings.nats_url else "embedded_nats_port"  # `run` without nats_url: managed server
    url = url or settings.nats_url
    if not url:
        raise ValueError("nats_url: MARKETPRISM_NATS_URL is required for this role")
    errors: list[str] = []
    try:
        return await asyncio.wait_for(_nats_tries(settings, name, url, errors), settings.connect_timeout_s)
    except TimeoutError:  # the budget ran out (a failed try is caught, logged and retried inside)
        raise ConnectionError(f"{key}: cannot reach NATS at {redact(url)} within {settings.connect_timeout_s:g} s "
                              f"(connect_timeout_s): {errors[-1] if errors else 'no answer'}") from None


async def _nats_tries(settings: Settings, name: str, url: str, errors: list[str]):
    attempt = 0
    while True:
        try:
            return await streams.connect(url, name=name, **streams.client_options(settings))
        except Exception as e:  # noqa: BLE001 - nats-py raises several types for "not reachable"
            errors.append(str(e) or type(e).__name__)
            logger.warning("NATS at {} not reachable yet ({}), retrying", redact(url), errors[-1])
            await asyncio.sleep(min(5.0, 0.5 * 2 ** attempt))
            attempt += 1


def _store(settings: Settings) -> Store:
    return Store(connect(settings.store_url, settings=settings))


async def init(settings: Settings, do_streams: bool = True, do_schema: bool = True) -> list[str]:
    done = []
    if do_streams:
        nc = await _nats(settings, "marketprism-init")
        done += await streams.ensure(nc)
        await nc.drain()
    if do_schema:
        store = _store(settings)
        await asyncio.to_thread(schema.apply, store.client, settings.hot_ttl_days)
        store.close()
        done.append(f"schema applied to {redact(settings.store_url)} (hot TTL {settings.hot_ttl_days} d)")
    return done


async def _collector_part(settings: Settings, nc):
    publisher = Publisher(nc, max_pending=settings.publish_max_pending)
    await publisher.start()

    metrics.PUBLISH_PENDING.set_function(lambda: len(publisher.pending))  # read at each scrape
    collector = Collector(settings, publisher.publish, record.from_settings(settings),
                          has_room=lambda: len(publisher.pending) < publisher.max_pending,
                          state_path=Path(settings.data_dir) / "collector-state.json")
    # delivery positions advance on JetStream's acks; what waits for one is where a kill's hole starts
    publisher.on_acked = collector.state.acked
    collector.state.unacked = publisher.unacked_tokens
    collector.coverage = Coverage.from_settings(settings)  # grace and staleness thresholds from settings
    return publisher, collector


# A stream at its limit (discard new) rejects every re-send of the held publishes, which come at least every
# ack timeout (5 s): rejections older than this mean the stream takes records again.
REJECTION_RECENT_S = 15.0


def _collector_health(collector: Collector, publisher: Publisher, nc):
    def section() -> dict:
        body = collector.health()
        status = collector.coverage.status()
        last = publisher.last_rejection
        rejecting = last is not None and time.monotonic() - last[0] < REJECTION_RECENT_S
        if (collector.blocked or not nc.is_connected or rejecting) and status == "healthy":
            status = "degraded"
        grace = collector.coverage.grace_remaining()
        rejection = {"publish_rejected": publisher.rejected, "publish_rejecting": rejecting,
                     **({"last_rejection": last[1], "last_rejection_age_s": round(time.monotonic() - last[0], 1)}
                        if last else {})}
        return {"status": status, **({"grace_remaining_s": round(grace, 1)} if grace else {}),
                "nats_connected": nc.is_connected, "publish_pending": len(publisher.pending),
                "published_acked": publisher.acked, **rejection, **body}
    return section


def _hot_health(writer: HotWriter, nc, consumers: ConsumerWatch):
    errors = Rate()

    def section() -> dict:
        status = "healthy" if nc.is_connected and not writer.failures else "degraded"
        return {"status": status, "nats_connected": nc.is_connected,
                "insert_errors_per_min": errors.per_min(writer.errors), **consumers.section(), **writer.health()}
    return section


async def run_collector(settings: Settings, nc=None) -> None:
    own = nc is None
    nc = nc or await _nats(settings, "marketprism-collector")
    publisher, collector = await _collector_part(settings, nc)
    health = HealthServer.for_role(settings, "collector", {"collector": _collector_health(collector, publisher, nc)})
    await health.start()
    _on_signals(collector.stop)
    await collector.run()
    if collector.recorder:
        collector.recorder.close()
    logger.info("collector stopping: waiting for {} unacknowledged publishes", len(publisher.pending))
    if not await publisher.flush():
        logger.error("collector stopping with {} records JetStream never acknowledged: they are lost",
                     len(publisher.pending))
    collector.state.save()  # after the last acks: the next start's restart gaps begin where delivery ended
    await publisher.close()
    await health.stop()
    if own:
        await nc.drain()


async def run_storage_hot(settings: Settings) -> None:
    nc = await _nats(settings, "marketprism-storage-hot")
    store = _store(settings)
    writer = HotWriter(nc, store, settings.batch_rows, settings.flush_interval_s)
    consumers = ConsumerWatch(nc, [(stream, DURABLE) for stream in STREAMS])
    consumers.start()
    health = HealthServer.for_role(settings, "storage-hot", {"storage_hot": _hot_health(writer, nc, consumers)})
    await health.start()
    _on_signals(writer.stop)
    await writer.run()
    await health.stop()
    await consumers.stop()
    await nc.drain()
    store.close()


async def run_embedded(settings: Settings) -> None:
    """Every role in one process: managed nats-server (unless a URL is set), chDB, collector, storage-hot."""
    data = Path(settings.data_dir)
    lock = InstanceLock(data)
    lock.acquire()
    server = None
    try:
        url = settings.nats_url
        if not url:
            server = NatsServer(str(data / "nats"), settings.embedded_nats_port)
            await server.start()
            url = server.url
            logger.info("managed nats-server pid {} on {}", server.pid, url)
        nc = await _nats(settings, "marketprism-run", url)
        await streams.ensure(nc)
        store = _store(settings)
        await asyncio.to_thread(schema.apply, store.client, settings.hot_ttl_days)
        publisher, collector = await _collector_part(settings, nc)
        writer = HotWriter(nc, store, settings.batch_rows, settings.flush_interval_s)
        consumers = ConsumerWatch(nc, [(stream, DURABLE) for stream in STREAMS])
        consumers.start()
        archiver = await asyncio.to_thread(Archiver.open, settings)  # its own session on the same chDB
        health = HealthServer.for_role(settings, "run", {"collector": _collector_health(collector, publisher, nc),
                                                         "storage_hot": _hot_health(writer, nc, consumers),
                                                         "storage_cold": archiver.health},
                                       store=Store(connect(settings.store_url, readonly=True, settings=settings)))
        await health.start()
        lock.write_port(health.port)
        logger.info("marketprism run: health on http://{}:{}/health, store {}", settings.health_host, health.port,
                    redact(settings.store_url))
        stopped = asyncio.Event()
        _on_signals(stopped.set)
        tasks = [asyncio.create_task(collector.run()), asyncio.create_task(writer.run()),
                 asyncio.create_task(archiver.run())]
        waiter = asyncio.create_task(stopped.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter and t.exception():
                logger.error("a role failed: {}", t.exception())
        # Drain in order: no new records, everything published is acked, everything fetched is stored.
        collector.stop()
        await tasks[0]
        if collector.recorder:
            collector.recorder.close()
        await publisher.flush()
        collector.state.save()
        await publisher.close()
        await asyncio.sleep(settings.flush_interval_s * 2)
        writer.stop()
        await tasks[1]
        archiver.stop()
        await tasks[2]
        archiver.close()
        await health.stop()
        await consumers.stop()
        await nc.drain()
        store.close()
    finally:
        if server:
            server.stop()
        lock.release()
