"""A leaner reader of the NATS protocol for the two hot subscriptions (publish acks, pulled messages).

nats-py turns every delivered message into a Msg object: a regular-expression match of its line, its
headers parsed into a dict, a put on the subscription's queue and a task switch to the callback. For a
JetStream publish ack or a pulled record that costs more than the rest of the record's handling, and the
headers (the stored Nats-Msg-Id) are never read. This parser hands the messages of registered
subscriptions straight to a plain function as (subject, reply, payload) bytes; every other message and
every other protocol line goes where nats-py's own parser would send it, with the same effect.
"""

from __future__ import annotations

import json
from typing import Callable

import nats
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

Handler = Callable[[bytes, bytes, bytes], None]
_MAX_LINE = 4096  # nats-server's default max control line


class FastParser(Parser):
    def __init__(self, nc) -> None:
        super().__init__(nc)
        self.handlers: dict[int, Handler] = {}

    def reset(self) -> None:
        super().reset()
        self.wanted = 0  # bytes the partial message in buf needs before it is worth parsing again

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        if buf:  # the partial message of the previous read goes first
            buf.extend(data)
            if len(buf) < self.wanted:
                return  # a large message still arriving: no copy of it per read
            data = bytes(buf)
        self.wanted = 0
        handlers = self.handlers
        nc = self.nc
        start = 0
        size = len(data)
        try:
            while start < size:
                eol = data.find(b"\r\n", start)
                if eol < 0:
                    if size - start > _MAX_LINE:
                        raise ProtocolError("nats: control line too long")
                    break
                plain = data.startswith(b"MSG ", start)
                if plain or data.startswith(b"HMSG", start):
                    args = data[start:eol].split()
                    if plain:  # MSG subject sid [reply] size
                        hdr_size, total = 0, int(args[-1])
                    else:  # HMSG subject sid [reply] hdr_size total_size
                        hdr_size, total = int(args[-2]), int(args[-1])
                    body = eol + 2
                    end = body + total
                    if end + 2 > size:
                        self.wanted = end + 2 - start
                        break  # the rest arrives with later reads; this line is parsed again then
                    subject, sid = args[1], int(args[2])
                    reply = args[3] if len(args) == (5 if plain else 6) else b""
                    payload = data[body + hdr_size:end]
                    start = end + 2
                    handler = handlers.get(sid)
                    if handler is not None:
                        handler(subject, reply, payload)
                    else:
                        await nc._process_msg(sid, subject, reply, payload, data[body:body + hdr_size] if hdr_size else None)
                    continue
                line = data[start:eol]
                start = eol + 2
                if line.startswith(b"PING"):
                    await nc._process_ping()
                elif line.startswith(b"PONG"):
                    await nc._process_pong()
                elif line.startswith(b"+OK"):
                    pass
                elif line.startswith(b"-ERR"):
                    await nc._process_err(line[4:].strip().decode(errors="replace").lower())
                elif line.startswith(b"INFO"):
                    await nc._process_info(json.loads(line[4:]))
                else:
                    raise ProtocolError("nats: unknown protocol")
        finally:
            if self.buf is buf:  # reset() on a reconnect replaces the buffer: nothing of it to keep then
                del buf[:]
                buf += memoryview(data)[start:]


def install(nc: nats.NATS) -> None:
    """Use the lean parser on a client before it connects (the parser outlives reconnects)."""
    nc._ps = FastParser(nc)


async def subscribe(nc: nats.NATS, subject: str, handler: Handler):
    """Subscribe so that each message reaches `handler(subject, reply, payload)` synchronously, from the
    reading loop itself. The subscription is nats-py's (resubscribed after a reconnect); without the lean
    parser, the handler is called from an ordinary callback."""
    async def fallback(msg) -> None:
        handler(msg.subject.encode(), (msg.reply or "").encode(), msg.data)

    sub = await nc.subscribe(subject, cb=fallback)
    if isinstance(nc._ps, FastParser):
        nc._ps.handlers[sub._id] = handler
    return sub


async def unsubscribe(nc: nats.NATS, sub) -> None:
    if isinstance(nc._ps, FastParser):
        nc._ps.handlers.pop(sub._id, None)
    await sub.unsubscribe()


def has_raw_writes(nc: nats.NATS) -> bool:
    """True if this nats-py has the outgoing buffer that write_raw() feeds."""
    return hasattr(nc, "_send_command") and hasattr(nc, "_flush_pending") and hasattr(nc, "_flush_queue")


def can_write_raw(nc: nats.NATS) -> bool:
    """True while protocol lines can go straight to the buffer (connected, not draining)."""
    return has_raw_writes(nc) and nc.is_connected and not nc.is_draining_pubs


async def write_raw(nc: nats.NATS, data: bytes, wake: bool = True) -> None:
    """Queue protocol bytes and (unless the caller wakes it later) wake nats-py's flusher, as its own
    publish() does after a PUB."""
    await nc._send_command(data)
    if wake and nc._flush_queue.empty():
        await nc._flush_pending()


def reply_lines(replies: list[bytes], body: bytes = b"") -> bytes:
    """One PUB of `body` to each reply subject (a JetStream ack, nak or term of each message): one join
    with the rest of each line as the separator, a third of the cost of a formatted line per reply."""
    if not replies:
        return b""
    tail = b" %d\r\n%s\r\n" % (len(body), body)
    return b"PUB " + (tail + b"PUB ").join(replies) + tail


async def reply_all(nc: nats.NATS, replies: list[bytes], body: bytes = b"") -> None:
    """Send `body` to every reply subject, in one buffer while connected (else through publish(), which
    buffers or raises as nats-py decides)."""
    if can_write_raw(nc):
        await write_raw(nc, reply_lines(replies, body))
    else:
        for r in replies:
            await nc.publish(r.decode(), body)


ACK = b""  # an empty reply is an explicit ack
TERM = b"+TERM"


def nak(delay_s: float = 0) -> bytes:
    return b'-NAK {"delay": %d}' % int(delay_s * 1e9) if delay_s > 0 else b"-NAK"
