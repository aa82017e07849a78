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

With `fast_ingest` (the collector) messages go out in JetStream fast-ingest batches (ADR-50, nats-server
2.14+, streams with allow_batched): the server persists each message as it arrives and acknowledges
every `flow` messages of a batch instead of every message, which halves its work per record. A batch is
one data type's messages (so one stream's), opened with a handshake, flow-controlled, ended by the first
rejected message (the rest is re-sent later, in a new batch, with the same Nats-Msg-Id), by a reconnect,
or committed when idle so that its tail is acknowledged too. A stream without allow_batched gets
per-message publishes, as without fast_ingest. Duplicates dropped by the stream are not reported per
message in a batch: `duplicates` counts only per-message publishes.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque

import msgspec
import nats
from loguru import logger

from marketprism.bus import wire
from marketprism.ops import metrics

_UNSAFE = re.compile(r"[\s]")  # in a subject it would break the protocol line; publish() rejects it properly
_HDR_FIXED = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")
# Publishes queued within this long go out in one socket write: a frame at a time, the collector would
# otherwise make a write system call per record (a tenth of its CPU at 8k records/s). Adds at most this
# much to a record's latency.
FLUSH_DELAY_S = 0.002
FLOW = 200  # fast ingest: the ack interval asked for (the server may choose a shorter one)
OUTSTANDING_ACKS = 4  # run at most this many ack intervals ahead of the last flow ack
IDLE_COMMIT_S = 0.05  # a batch without publishes for this long is committed: its tail gets acknowledged
COMMIT_AGE_S = 0.1  # so is a batch whose oldest unacknowledged message is this old (slow streams)


class PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict | None = None


_ack = msgspec.json.Decoder(PubAck)


class BatchReply(msgspec.Struct):
    """Any reply on a fast-ingest batch's control channel: a flow ack ({"type":"ack","seq","msgs"}), a
    rejection ({"type":"err","seq","error"}) or the final publish ack of a commit ({"batch","count"})."""
    type: str = ""
    seq: int = 0  # flow ack and rejection: the batch sequence; final ack: the stream sequence
    msgs: int = 0  # flow ack: acks now come every `msgs` messages
    count: int = 0  # final ack: messages of the batch processed
    error: dict | None = None


_batch_reply = msgspec.json.Decoder(BatchReply)
# JetStream errors about the batch itself (ADR-50): fast ingest not enabled on the stream, bad reply pattern,
# bad or unknown batch id. Any other error is about the message (stream full, too large, ...).
BATCH_UNAVAILABLE = {10203, 10204, 10205, 10206, 10207, 10208}


class Batch:
    """One fast-ingest batch: batch sequence i (from 1) carried message `sent[i - acked - 1]`."""

    def __init__(self, bid: bytes, reconnects: int) -> None:
        self.id = bid
        self.reconnects = reconnects  # the connection it lives on: a reconnect ends it
        self.seq = 0
        self.acked = 0  # every sequence up to this one is persisted
        self.flow = 1  # until the server's first reply says otherwise
        self.sent: deque[int] = deque()
        self.subject = b""
        self.last_send = 0.0
        self.ready = asyncio.Event()  # the server answered the opening message
        self.room = asyncio.Event()
        self.done = False
        self.committing = False  # an end-of-batch commit is on its way: nothing more goes into it
        self.refused: str | None = None  # the error of a batch that could not be opened


class Publisher:
    def __init__(self, nc: nats.NATS, max_pending: int = 50000, ack_timeout_s: float = 5.0,
                 fast_ingest: bool = False) -> None:
        self.nc = nc
        self.fast_ingest = fast_ingest
        self.max_pending = max_pending
        self.ack_timeout_s = ack_timeout_s
        self.pending: dict[int, tuple[str, bytes, str, float]] = {}  # n -> subject, payload, msg id, sent
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
        self._batches: dict[str, Batch] = {}  # data type -> its open batch
        self._by_id: dict[bytes, Batch] = {}
        self._batch_ids = itertools.count(1)
        self._per_message: set[str] = set()  # data types whose stream refused batches
        self._refused_at: dict[str, float] = {}  # data type -> when its stream last rejected a message
        self._fi_prefix = b""
        self._fi_sub = None
        self._idle_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._reply_prefix = self._prefix.encode()
        self._sub = await wire.subscribe(self.nc, self._prefix + "*", self._on_ack)
        self._retry_task = asyncio.create_task(self._retry_loop())
        if self.fast_ingest and self._raw:
            inbox = self.nc.new_inbox()
            self._fi_prefix = inbox.encode() + b"."
            self._fi_sub = await wire.subscribe(self.nc, inbox + ".>", self._on_batch_reply)
            self._idle_task = asyncio.create_task(self._commit_idle_loop())

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Send one message; waits only while max_pending messages are unacknowledged."""
        while len(self.pending) >= self.max_pending:
            self._room.clear()
            await self._room.wait()
        n = next(self._ids)
        self.pending[n] = (subject, payload, msg_id, time.monotonic())
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
            if self._fi_prefix:
                key = subject[:subject.find(".")]
                if key not in self._per_message:
                    await self._send_batched(key, n, subj, payload, mid)
                    return
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

    # -- fast ingest ---------------------------------------------------------------------------------
    async def _send_batched(self, key: str, n: int, subj: bytes, payload: bytes, mid: bytes) -> None:
        while True:
            if time.monotonic() - self._refused_at.get(key, -1e9) < self.ack_timeout_s:
                self._refused.add(n)  # the stream refused this type moments ago: held, re-sent by the retry loop
                return
            b = self._batches.get(key)
            if b is None or b.done or b.committing or b.reconnects != self.nc.stats["reconnects"]:
                await self._open(key, n, subj, payload, mid)
                return
            if not b.ready.is_set():
                await b.ready.wait()
                continue
            if b.seq - b.acked >= b.flow * OUTSTANDING_ACKS:
                await self._wait_room(b)
                continue
            self._write_batched(b, 1, n, subj, payload, mid)
            return

    def _write_batched(self, b: Batch, op: int, n: int, subj: bytes, payload: bytes, mid: bytes) -> None:
        """Queue one message of batch b (op 0 opens it, 1 appends) without waiting."""
        b.seq += 1
        b.sent.append(n)
        b.subject, b.last_send = subj, time.monotonic()
        hdr = _HDR_FIXED + len(mid)
        self.nc._pending.append(b"HPUB %s %s%s.%d.fail.%d.%d.$FI %d %d\r\nNATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n%s\r\n" % (
            subj, self._fi_prefix, b.id, FLOW, b.seq, op, hdr, hdr + len(payload), mid, payload))
        self.nc._pending_data_size += hdr + len(payload)
        if self._wake is None:
            self._wake = asyncio.get_running_loop().call_later(FLUSH_DELAY_S, self._wake_flusher)

    async def _open(self, key: str, n: int, subj: bytes, payload: bytes, mid: bytes) -> None:
        """A new batch for `key`, opened with message n; waits for the server's answer (ADR-50: the
        client must learn the flow before it sends more)."""
        b = self._batches[key] = Batch(str(next(self._batch_ids)).encode(), self.nc.stats["reconnects"])
        self._by_id[b.id] = b
        self._write_batched(b, 0, n, subj, payload, mid)
        await wire.write_raw(self.nc, b"")  # out now: the handshake is a round trip
        try:
            await asyncio.wait_for(b.ready.wait(), self.ack_timeout_s)
        except asyncio.TimeoutError:
            self._end(b)  # n stays pending: the retry loop re-sends it
            return
        if b.refused is not None:  # no fast ingest on this stream (or this server): one message at a time
            logger.info("JetStream refused a fast-ingest batch for {} ({}); publishing it message by message",
                        key, b.refused)
            self._per_message.add(key)
            if n in self.pending:
                await self._send(n, subj.decode(), payload, mid.decode())

    async def _wait_room(self, b: Batch) -> None:
        b.room.clear()
        await wire.write_raw(self.nc, b"")
        try:
            await asyncio.wait_for(b.room.wait(), self.ack_timeout_s)
        except asyncio.TimeoutError:
            self._end(b)  # no flow ack for that long: its messages are re-sent in a new batch

    def _on_batch_reply(self, subject: bytes, reply: bytes, data: bytes) -> None:
        rest = subject[len(self._fi_prefix):]
        b = self._by_id.get(rest[:rest.find(b".")])
        if b is None:
            return
        try:
            r = _batch_reply.decode(data)
        except msgspec.MsgspecError:
            r = BatchReply(error={"description": "unreadable reply"})
        if r.type == "ack":
            b.flow = r.msgs or b.flow
            self._release(b, r.seq)
            b.ready.set()
        elif r.type == "err":
            # gap mode "fail": every earlier message is persisted, this one and the rest of the batch are not
            self._release(b, r.seq - 1)
            if b.sent and not b.done:
                self._rejected(b.sent[0], r.error)
            self._end(b, refused=True)
        elif r.error:  # a publish ack with an error: no batch (the feature, or a forgotten id), or a rejection
            if r.error.get("err_code") in BATCH_UNAVAILABLE and not b.ready.is_set():
                b.refused = str(r.error.get("description") or r.error)
            elif b.sent and not b.done and r.error.get("err_code") not in BATCH_UNAVAILABLE:
                self._rejected(b.sent[0], r.error)  # the stream refused the opening message (full, ...)
            self._end(b, refused=True)
        else:  # the final publish ack of a commit
            self._release(b, r.count)
            self._end(b)

    def _release(self, b: Batch, upto: int) -> None:
        """Batch sequences up to `upto` are persisted."""
        sent, pending, refused = b.sent, self.pending, self._refused
        while b.acked < upto and sent:
            n = sent.popleft()
            b.acked += 1
            if pending.pop(n, None) is not None:
                self.acked += 1
                if refused:
                    refused.discard(n)
        if len(pending) < self.max_pending:
            self._room.set()
        if not pending:
            self._empty.set()
        b.room.set()

    def _end(self, b: Batch, refused: bool = False) -> None:
        if b.done:
            return
        b.done = True
        if refused:
            self._refused.update(b.sent)  # their re-send is a new batch, not an ack timeout
        b.ready.set()
        b.room.set()
        # late replies (errors for what followed a rejection) still find it for a while
        asyncio.get_running_loop().call_later(60, self._by_id.pop, b.id, None)

    async def _commit_idle_loop(self) -> None:
        """Commit (end-of-batch, nothing stored) the batches nobody published to for IDLE_COMMIT_S, or whose
        oldest unacknowledged message is COMMIT_AGE_S old: flow acks cover only whole intervals, the final
        publish ack of a commit covers the rest. Unacknowledged messages are re-sent after a reconnect, and
        a restarted server knows the ids of only the messages still in the stream: the sooner a message is
        acknowledged, the less a server crash can store twice."""
        while True:
            await asyncio.sleep(IDLE_COMMIT_S)
            now = time.monotonic()
            for b in list(self._batches.values()):
                if b.done or b.committing or not b.ready.is_set() or b.seq == b.acked or not b.sent:
                    continue
                oldest = self.pending.get(b.sent[0])
                stale = now - b.last_send >= IDLE_COMMIT_S or (oldest is not None and now - oldest[3] >= COMMIT_AGE_S)
                if stale and self.nc.is_connected and b.reconnects == self.nc.stats["reconnects"]:
                    b.committing = True  # the final ack releases the rest and ends it
                    await wire.write_raw(self.nc, b"PUB %s %s%s.%d.fail.%d.3.$FI 0\r\n\r\n" % (
                        b.subject, self._fi_prefix, b.id, FLOW, b.seq + 1))
                    asyncio.get_running_loop().call_later(self.ack_timeout_s, self._end, b)

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
            self._rejected(n, ack.error)
            return
        del self.pending[n]
        self.acked += 1
        self.duplicates += ack.duplicate
        if len(self.pending) < self.max_pending:
            self._room.set()
        if not self.pending:
            self._empty.set()

    def _rejected(self, n: int, error: dict | None) -> None:
        """Stream full (discard new) or unavailable: keep it and re-send later, never drop silently."""
        entry = self.pending.get(n)
        if entry is None:
            return
        description = str((error or {}).get("description") or error)
        self.rejected += 1
        self.last_rejection = (time.monotonic(), description)
        self._refused.add(n)
        self._refused_at[entry[0][:entry[0].find(".")]] = time.monotonic()
        metrics.publish_failed(entry[0], "rejected")
        if self.rejected % 1000 == 1:
            logger.warning("JetStream rejected a publish on {}: {}", entry[0], description)

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
                subject, payload, msg_id, _ = entry
                self.pending[n] = (subject, payload, msg_id, time.monotonic())
                self.resent += 1
                if n in self._refused:
                    self._refused.discard(n)
                else:
                    metrics.publish_failed(subject, "ack_timeout")
                await self._send(n, subject, payload, msg_id)

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
        for task in (self._retry_task, self._idle_task):
            if task:
                task.cancel()
        if self._sub:
            await wire.unsubscribe(self.nc, self._sub)
        if self._fi_sub:
            await wire.unsubscribe(self.nc, self._fi_sub)
