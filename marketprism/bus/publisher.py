"""Pipelined JetStream publishing: many publishes in flight, each acked by the server asynchronously.

Every message carries `Nats-Msg-Id` (the record's dedup key), so a message re-sent after a lost ack or
a reconnect is dropped by the stream's duplicate window instead of being stored twice. Unacked messages
are held (bounded by `max_pending`) and re-sent until the stream acknowledges them.

On the hot path the protocol line is written straight into nats-py's outgoing buffer (`wire.write_raw`):
nats-py's publish() spends more time validating and assembling headers than the rest of a record's trip
through the collector. What goes on the wire is exactly what publish() would send; anything it would
have to check (whitespace in a subject or id, an oversized payload, a closed connection) takes the
ordinary publish() path, which raises as before. The buffer goes to the socket once per FLUSH_DELAY_S,
not once per record.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import msgspec
import nats
from loguru import logger

from marketprism.bus import wire
from marketprism.ops import metrics

_UNSAFE = re.compile(r"[\s]")  # in a subject it would break the protocol line; publish() rejects it properly
_HDR_FIXED = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
# Publishes queued within this long go out in one socket write: a frame at a time, the collector would
# otherwise make a write system call per record (a tenth of its CPU at 8k records/s). Adds at most this
# much to a record's latency. 5 ms rather than 2: at 30k records/s the collector then spent ~8 % less CPU
# (0.53/0.48 -> 0.48/0.44 cores, two A/B pairs) and nats-server a little less; 12 ms gained nothing more.
FLUSH_DELAY_S = 0.005


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
        # n -> subject, payload, msg id, sent (monotonic), the publisher's token (handed back on ack)
        self.pending: dict[int, tuple[str, bytes, str, float, object]] = {}
        self.on_acked = None  # (token) -> None, for every acknowledged message published with a token
        self.acked = 0
        self.duplicates = 0
        self.resent = 0
        self.rejected = 0
        self.last_rejection: tuple[float, str] | None = None  # (monotonic time, JetStream's description)
        self._refused: set[int] = set()  # rejected, not re-sent yet: their re-send is no ack timeout
        self._ids = itertools.count(1)
        self._room = asyncio.Event()
        self._room.set()
        self._empty = asyncio.Event()
        self._empty.set()
        self._prefix = ""
        self._reply_prefix = b""
        self._raw = wire.has_raw_writes(nc)
        self._wake: asyncio.TimerHandle | None = None  # the flusher wake-up of the publishes queued since
        self._subjects: dict[str, bytes] = {}  # subjects checked free of whitespace, encoded
        self._sub = None
        self._retry_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._reply_prefix = self._prefix.encode()
        self._sub = await wire.subscribe(self.nc, self._prefix + "*", self._on_ack)
        self._retry_task = asyncio.create_task(self._retry_loop())

    async def publish(self, subject: str, payload: bytes, msg_id: str, token: object = None) -> None:
        """Send one message; waits only while max_pending messages are unacknowledged. `token` (anything)
        goes to `on_acked` once the stream has the message, and is listed by `unacked_tokens` until then."""
        while len(self.pending) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        n = next(self._ids)
        self.pending[n] = (subject, payload, msg_id, time.monotonic(), token)
        self._empty.clear()
        await self._send(n, subject, payload, msg_id)

    def _plain(self, subject: str, msg_id: str) -> bytes | None:
        """The encoded subject if both fit the protocol line as they are (what publish() would send
        unchanged), else None."""
        encoded = self._subjects.get(subject)
        if encoded is None:
            if _UNSAFE.search(subject):
                return None
            if len(self._subjects) > 100_000:
                self._subjects.clear()
            encoded = self._subjects[subject] = subject.encode()
        # header value: no CR/LF or other control characters, nothing publish() would trim
        return encoded if msg_id.isprintable() and msg_id.strip() == msg_id else None

    async def _send(self, n: int, subject: str, payload: bytes, msg_id: str) -> None:
        nc = self.nc
        if (self._raw and nc.is_connected and not nc.is_draining_pubs and len(payload) <= nc.max_payload
                and (subj := self._plain(subject, msg_id)) is not None):
            mid = msg_id.encode()
            hdr = _HDR_FIXED + len(mid)
            await wire.write_raw(nc, b"HPUB %s %s%d %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n" % (
                subj, self._reply_prefix, n, hdr, hdr + len(payload), mid, payload), wake=False)
            if self._wake is None:
                self._wake = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._wake_flusher)
        else:
            await nc.publish(subject, payload, reply=f"{self._prefix}{n}", headers={"Nats-Msg-Id": msg_id})

    def _wake_flusher(self) -> None:
        self._wake = None
        queue = self.nc._flush_queue
        if queue is not None and queue.empty() and self.nc.is_connected:
            asyncio.ensure_future(self.nc._flush_pending())

    def _on_ack(self, subject: bytes, reply: bytes, data: bytes) -> None:
        n = int(subject[len(self._reply_prefix):])
        entry = self.pending.get(n)
        if entry is None:
            return  # an ack for a message already acked through a re-send
        try:
            ack = _ack.decode(data)
        except msgspec.MsgspecError:
            ack = PubAck(error={"description": "unreadable ack"})
        if ack.error:
            # Stream full (discard new) or unavailable: keep it and re-send later, never drop silently.
            self.rejected += 1
            self.last_rejection = (time.monotonic(), str(ack.error.get("description") or ack.error))
            self._refused.add(n)
            metrics.publish_failed(entry[0], "rejected")
            if self.rejected % 1000 == 1:
                logger.warning("JetStream rejected a publish on {}: {}", entry[0], ack.error.get("description"))
            return
        del self.pending[n]
        self.acked += 1
        if entry[4] is not None and self.on_acked is not None:
            self.on_acked(entry[4])
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
            # pending is in sending order (a re-sent message moves to the end): the overdue ones lead.
            cutoff = time.monotonic() - self.ack_timeout_s
            overdue = []
            for n, entry in self.pending.items():
                if entry[3] >= cutoff:
                    break
                overdue.append(n)
            for n in overdue:
                entry = self.pending.pop(n, None)
                if entry is None:
                    continue  # acked meanwhile
                subject, payload, msg_id, _, token = entry
                self.pending[n] = (subject, payload, msg_id, time.monotonic(), token)
                self.resent += 1
                if n in self._refused:
                    self._refused.discard(n)
                else:
                    metrics.publish_failed(subject, "ack_timeout")
                await self._send(n, subject, payload, msg_id)

    def unacked_tokens(self):
        """The tokens of the messages the stream has not acknowledged yet."""
        return [entry[4] for entry in self.pending.values() if entry[4] is not None]

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every published message is acknowledged; False on timeout."""
        try:
            await self.nc.flush()
            await asyncio.wait_for(self._empty.wait(), timeout_s)
            return True
        except (asyncio.TimeoutError, nats.errors.Error):
            return not self.pending

    async def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if self._retry_task:
            self._retry_task.cancel()
        if self._sub:
            await wire.unsubscribe(self.nc, self._sub)
