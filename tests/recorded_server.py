"""A local WebSocket + REST server that plays recorded Binance frames, for pipeline tests.

WS /stream?streams=... sends the recorded frames of the requested streams (and optional garbage);
REST /api/v3/depth answers with the recorded snapshot.
"""

from __future__ import annotations

import asyncio

from aiohttp import web


class RecordedBinance:
    def __init__(self, frames: list[bytes], snapshot: bytes, garbage: list[bytes] = (), hold_open_s: float = 60.0,
                 drop_after: int | None = None) -> None:
        self.frames = frames
        self.snapshot = snapshot
        self.garbage = list(garbage)
        self.hold_open_s = hold_open_s
        self.drop_after = drop_after  # close the socket after this many frames on the first connection
        self.connections = 0
        self.snapshot_requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connections += 1
        first = self.connections == 1
        frames = self.frames
        for i, frame in enumerate(frames):
            if first and self.drop_after is not None and i == self.drop_after:
                await ws.close()
                return ws
            await ws.send_str(frame.decode())
            if i == 3:
                for junk in self.garbage:
                    await ws.send_str(junk.decode(errors="replace"))
            await asyncio.sleep(0)
        await asyncio.sleep(self.hold_open_s)
        return ws

    async def _depth(self, request: web.Request) -> web.Response:
        self.snapshot_requests += 1
        return web.Response(body=self.snapshot, content_type="application/json")

    async def start(self) -> str:
        app = web.Application()
        app.add_routes([web.get("/stream", self._ws), web.get("/api/v3/depth", self._depth)])
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()
