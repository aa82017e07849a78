"""Pipelined JetStream publishing: many publishes in flight, each acked by the server asynchronously.

Every message carries `Nats-Msg-Id` (the record's dedup key), so a message re-sent after a lost ack or
a reconnect is dropped by the stream's duplicate window instead of being stored twice. Unacked messages
are held (bounded by `max_pending`) and re-sent until the stream acknowledges them.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
import nats
from loguru import logger


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_ack = msgspec.json.Decoder(PubAck)


class Publisher:
    def __init__(self, nc: nats.NATS, max_pending: int = 50000, ack_timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.max_pending = max_pending
        self.ack_timeout_s = ack_timeout_s
        self.pending: dict[int, tuple[str, bytes, dict, float]] = {}
        self.acked = 0
        self.duplicates = 0
        self.resent = 0
        self.rejected = 0
        self._ids = itertools.count(1)
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._prefix = ""
        self._sub = None
        self._retry_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._on_ack)
        self._retry_task = asyncio.create_task(self._retry_loop())

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Send one message; waits only while max_pending messages are unacknowledged."""
        while len(self.pending) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        n = next(self._ids)
        headers = {"Nats-Msg-Id": msg_id}
        self.pending[n] = (subject, payload, headers, time.monotonic())
        self._empty.clear()
        await self.nc.publish(subject, payload, reply=f"{self._prefix}{n}", headers=headers)

    async def _on_ack(self, msg) -> None:
        n = int(msg.subject[len(self._prefix):])
        entry = self.pending.get(n)
        if entry is None:
            return  # an ack for a message already acked through a re-send
        try:
            ack = _ack.decode(msg.data)
        except msgspec.MsgspecError:
            ack = PubAck(error={"description": "unreadable ack"})
        if ack.error:
            # Stream full (discard new) or unavailable: keep it and re-send later, never drop silently.
            self.rejected += 1
            if self.rejected % 1000 == 1:
                logger.warning("JetStream rejected a publish on {}: {}", entry[0], ack.error.get("description"))
            return
        del self.pending[n]
        self.acked += 1
        self.duplicates += ack.duplicate
        if len(self.pending) < self.max_pending:
            self._room.set()
        if not self.pending:
            self._empty.set()

    async def _retry_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.ack_timeout_s / 2))
            if not self.nc.is_connected:
                continue
            cutoff = time.monotonic() - self.ack_timeout_s
            for n, (subject, payload, headers, sent) in list(self.pending.items()):
                if sent < cutoff and n in self.pending:
                    self.pending[n] = (subject, payload, headers, time.monotonic())
                    self.resent += 1
                    await self.nc.publish(subject, payload, reply=f"{self._prefix}{n}", headers=headers)

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every published message is acknowledged; False on timeout."""
        try:
            await self.nc.flush()
            await asyncio.wait_for(self._empty.wait(), timeout_s)
            return True
        except (asyncio.TimeoutError, nats.errors.Error):
            return not self.pending

    async def close(self) -> None:
        if self._retry_task:
            self._retry_task.cancel()
        if self._sub:
            await self._sub.unsubscribe()
