"""GET /health (JSON), GET /metrics (Prometheus) and, in the embedded run, POST /query (read-only)."""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from marketprism.ops import metrics

ORDER = {"healthy": 0, "starting": 1, "degraded": 2, "unhealthy": 3}
COLLECTOR_METRICS_PORT = 9093  # the collector's conventional Prometheus port (also served on the health port)


def overall(sections: dict[str, dict]) -> str:
    worst = max((s.get("status", "healthy") for s in sections.values()), key=lambda v: ORDER.get(v, 3),
                default="healthy")
    return worst


class HealthServer:
    def __init__(self, host: str, port: int, sections: dict[str, Callable[[], dict]], store=None, *,
                 role: str = "", metrics_port: int = 0, metrics_port_required: bool = True) -> None:
        """store: a read-only Store; when given, POST /query serves `marketprism query` (embedded run).
        metrics_port: a second listener serving only /metrics; when not required, a taken port is a warning."""
        self.host, self.port = host, port
        self.sections = sections
        self.store = store
        self.role = role
        self.metrics_port = metrics_port
        self.metrics_port_required = metrics_port_required
        self.started = time.time()
        self._runners: list[web.AppRunner] = []

    @classmethod
    def for_role(cls, settings, role: str, sections: dict[str, Callable[[], dict]], store=None) -> HealthServer:
        """The role's health port; /metrics also on settings.metrics_port (collector and run: 9093 by default)."""
        metrics_port = settings.metrics_port or (COLLECTOR_METRICS_PORT if role in ("collector", "run") else 0)
        metrics.DISK.watch(settings.data_dir)
        return cls(settings.health_host, settings.port_for(role), sections, store, role=role,
                   metrics_port=metrics_port, metrics_port_required=bool(settings.metrics_port))

    def report(self) -> dict:
        parts = {name: fn() for name, fn in self.sections.items()}
        for name, part in parts.items():
            metrics.HEALTH_STATUS.labels(section=name).set(ORDER.get(part.get("status", "healthy"), 3))
        return {"status": overall(parts), "role": self.role, "version": metrics.version(), "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1), **parts}

    async def _health(self, request: web.Request) -> web.Response:
        body = self.report()
        return web.json_response(body, status=503 if body["status"] == "unhealthy" else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.report()  # refreshes marketprism_health_status
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _query(self, request: web.Request) -> web.Response:
        sql = (await request.text()).strip()
        try:
            out = await asyncio.to_thread(self.store.raw_query, sql)
        except Exception as e:  # noqa: BLE001 - the caller gets the one-line reason
            return web.Response(status=400, text=str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        return web.Response(body=out, content_type="text/tab-separated-values")

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runners.append(runner)
        return site._server.sockets[0].getsockname()[1] if port == 0 else port

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/health", self._health), web.get("/metrics", self._metrics)])
        if self.store is not None:
            app.add_routes([web.post("/query", self._query)])
        try:
            self.port = await self._serve(app, self.port)
        except OSError as e:
            raise OSError(f"health port {self.host}:{self.port} is taken ({e.strerror}); set "
                          "MARKETPRISM_HEALTH_PORT, or see `marketprism diagnose`") from None
        if self.metrics_port and self.metrics_port != self.port:
            only_metrics = web.Application()
            only_metrics.add_routes([web.get("/metrics", self._metrics)])
            try:
                self.metrics_port = await self._serve(only_metrics, self.metrics_port)
            except OSError as e:
                if self.metrics_port_required:
                    await self.stop()
                    raise OSError(f"metrics port {self.host}:{self.metrics_port} is taken ({e.strerror}); set "
                                  "MARKETPRISM_METRICS_PORT") from None
                logger.warning("metrics port {} is taken ({}); /metrics stays on the health port {}",
                               self.metrics_port, e.strerror, self.port)
                self.metrics_port = 0

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []


class ConsumerWatch:
    """JetStream consumer and stream state for a synchronous health section, refreshed in the background:
    a consumer_info round trip per /health request would tie the health check to NATS latency."""

    def __init__(self, nc, consumers: list[tuple[str, str]], interval_s: float = 5.0) -> None:
        self.nc = nc
        self.consumers = consumers  # (stream, durable)
        self.interval_s = interval_s
        self.consumer_state: dict[str, dict] = {}
        self.stream_state: dict[str, dict] = {}
        self.checked_at = 0.0
        self.error = ""
        self._task: asyncio.Task | None = None

    async def refresh(self) -> None:
        js = self.nc.jetstream()
        try:
            for stream, durable in self.consumers:
                info = await js.consumer_info(stream, durable, timeout=2.0)
                self.consumer_state[f"{stream}/{durable}"] = {
                    "pending": info.num_pending or 0, "ack_pending": info.num_ack_pending or 0,
                    "redelivered": info.num_redelivered or 0, "waiting_pulls": info.num_waiting or 0}
                metrics.CONSUMER_PENDING.labels(stream=stream, consumer=durable).set(info.num_pending or 0)
                metrics.CONSUMER_ACK_PENDING.labels(stream=stream, consumer=durable).set(info.num_ack_pending or 0)
                metrics.CONSUMER_REDELIVERED.labels(stream=stream, consumer=durable).set(info.num_redelivered or 0)
            for stream in dict.fromkeys(s for s, _ in self.consumers):
                s = await js.stream_info(stream)
                self.stream_state[stream] = {"messages": s.state.messages, "bytes": s.state.bytes,
                                             "max_bytes": s.config.max_bytes}
                metrics.STREAM_MESSAGES.labels(stream=stream).set(s.state.messages)
                metrics.STREAM_BYTES.labels(stream=stream).set(s.state.bytes)
                metrics.STREAM_MAX_BYTES.labels(stream=stream).set(s.config.max_bytes or 0)
        except Exception as e:  # noqa: BLE001 - NATS down or a timeout: report it, keep the last known state
            self.error = f"{type(e).__name__}: {e}".strip().rstrip(":")
            return
        self.error = ""
        self.checked_at = time.time()

    async def _loop(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def section(self) -> dict:
        out = {"consumers": dict(self.consumer_state), "streams": dict(self.stream_state),
               "checked_age_s": round(time.time() - self.checked_at, 1) if self.checked_at else None}
        if self.error:
            out["consumer_info_error"] = self.error
        return out


class Rate:
    """Events per minute of a monotonically growing count, over a sliding window of samples."""

    def __init__(self, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.samples: deque[tuple[float, int]] = deque(maxlen=1000)

    def per_min(self, count: int) -> float:
        now = self.clock()
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, c0 = self.samples[0]
        return round((count - c0) * 60 / (now - t0), 2) if now > t0 else 0.0
