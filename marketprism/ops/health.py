"""GET /health (JSON), GET /metrics (Prometheus) and, in the embedded run, POST /query (read-only)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ORDER = {"healthy": 0, "starting": 1, "degraded": 2, "unhealthy": 3}


def overall(sections: dict[str, dict]) -> str:
    worst = max((s.get("status", "healthy") for s in sections.values()), key=lambda v: ORDER.get(v, 3),
                default="healthy")
    return worst


class HealthServer:
    def __init__(self, host: str, port: int, sections: dict[str, Callable[[], dict]], store=None) -> None:
        """store: a read-only Store; when given, POST /query serves `marketprism query` (embedded run)."""
        self.host, self.port = host, port
        self.sections = sections
        self.store = store
        self._runner: web.AppRunner | None = None

    def report(self) -> dict:
        parts = {name: fn() for name, fn in self.sections.items()}
        return {"status": overall(parts), **parts}

    async def _health(self, request: web.Request) -> web.Response:
        body = self.report()
        return web.json_response(body, status=503 if body["status"] == "unhealthy" else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _query(self, request: web.Request) -> web.Response:
        sql = (await request.text()).strip()
        try:
            out = await asyncio.to_thread(self.store.raw_query, sql)
        except Exception as e:  # noqa: BLE001 - the caller gets the one-line reason
            return web.Response(status=400, text=str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        return web.Response(body=out, content_type="text/tab-separated-values")

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.get("/health", self._health), web.get("/metrics", self._metrics)])
        if self.store is not None:
            app.add_routes([web.post("/query", self._query)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
