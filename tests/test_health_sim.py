"""Collector health against the simulator, through the real roles code and HTTP: healthy -> degraded when a
venue goes quiet -> healthy after it recovers -> unhealthy (503) when every venue is quiet; a venue that
answers 451 is listed as blocked with the reason."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from contextlib import asynccontextmanager

from conftest import wait_for
from marketprism import sim
from marketprism.bus import streams
from marketprism.ops import cli, roles
from marketprism.ops.health import HealthServer
from marketprism.settings import load


def settings_for(sim_url: str, nats_url: str, feeds: tuple[str, ...], **overrides):
    env = {"MARKETPRISM_NATS_URL": nats_url, "MARKETPRISM_FEEDS": ",".join(feeds), "MARKETPRISM_SYMBOLS": "BTC-USDT"}
    for feed in feeds:
        env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = sim_url.replace("http://", "ws://") + f"/{feed}"
        env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"{sim_url}/{feed}"
    return load(environ=env, **overrides)


def get_health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@asynccontextmanager
async def collector_with_health(settings):
    """The collector role as `marketprism collector` builds it, health on a free port."""
    nc = await streams.connect(settings.nats_url)
    await streams.ensure(nc)
    publisher, collector = await roles._collector_part(settings, nc)
    health = HealthServer("127.0.0.1", 0, {"collector": roles._collector_health(collector, publisher, nc)})
    await health.start()
    task = asyncio.create_task(collector.run())
    try:
        yield health, collector
    finally:
        collector.stop()
        await task
        await publisher.close()
        await health.stop()
        await nc.drain()


async def poll(port: int, predicate, timeout_s: float = 10.0):
    async def probe():
        code, body = await asyncio.to_thread(get_health, port)
        return (code, body) if predicate(code, body) else None
    return await wait_for(probe, timeout_s, 0.2)


async def test_stale_stream_degrades_and_recovers(nats_server):
    simulator = await sim.start(feeds="binance_spot,okx", symbols="BTC-USDT", rate=50)
    settings = settings_for(simulator.url, nats_server.url, ("binance_spot", "okx"), data_types=("trade",),
                            grace_s=0.0, stale_fast_s=1.0)
    try:
        async with collector_with_health(settings) as (health, collector):
            code, body = await poll(health.port, lambda c, b: b["status"] == "healthy"
                                    and {"trade/binance/spot", "trade/okx/spot", "trade/okx/perpetual"}
                                    <= set(b["collector"]["coverage"]))
            assert code == 200 and "grace_remaining_s" not in body["collector"]

            simulator.inject({"type": "stale", "feed": "okx", "seconds": 2.5})
            code, body = await poll(health.port, lambda c, b: b["status"] == "degraded")
            cov = body["collector"]["coverage"]
            assert code == 200
            assert cov["trade/okx/spot"]["status"] == "stale" and cov["trade/okx/spot"]["age_s"] >= 1.0
            assert cov["trade/binance/spot"]["status"] == "healthy"
            assert (await poll(health.port, lambda c, b: b["status"] == "healthy"))[0] == 200  # recovered

            simulator.inject({"type": "stale", "feed": "*", "seconds": 2.5})
            code, body = await poll(health.port, lambda c, b: b["status"] == "unhealthy")
            assert code == 503
            check = load(environ={"MARKETPRISM_HEALTH_PORT": str(health.port)})
            assert await asyncio.to_thread(cli._check, check, "collector") == 1
            assert (await poll(health.port, lambda c, b: b["status"] == "healthy"))[0] == 200
            assert await asyncio.to_thread(cli._check, check, "collector") == 0
    finally:
        await simulator.stop()


async def test_blocked_venue_is_reported_with_its_reason(nats_server):
    blocked = {"type": "rest_status", "feed": "binance_spot", "status": 451, "count": 1000, "path": "/api/v3/depth"}
    simulator = await sim.start(feeds="binance_spot", symbols="BTC-USDT", rate=50, faults=[blocked])
    settings = settings_for(simulator.url, nats_server.url, ("binance_spot",), data_types=("trade", "orderbook"),
                            grace_s=0.0)
    try:
        async with collector_with_health(settings) as (health, collector):
            code, body = await poll(health.port, lambda c, b: b["collector"]["blocked"]
                                    and "trade/binance/spot" in b["collector"]["coverage"])
            assert code == 200 and body["status"] == "degraded"  # trades flow, the book cannot be synced
            assert body["collector"]["blocked"]["binance_spot"].startswith("HTTP 451 on /api/v3/depth")
    finally:
        await simulator.stop()
