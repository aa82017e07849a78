"""The lean protocol reader against nats-py's own parser: same effects on every split of the same bytes,
and the two hot subscriptions (publish acks, pulled messages) through a real nats-server."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from marketprism.bus import streams, wire
from marketprism.bus.publisher import Publisher
from marketprism.bus.server import NatsServer, free_port
from marketprism.store.hot import Puller

def _msg(subject: bytes, sid: int, payload: bytes, reply: bytes = b"") -> bytes:
    return b"MSG %s %d %s%d\r\n%s\r\n" % (subject, sid, reply + b" " if reply else b"", len(payload), payload)


def _hmsg(subject: bytes, sid: int, headers: bytes, payload: bytes, reply: bytes = b"") -> bytes:
    return b"HMSG %s %d %s%d %d\r\n%s%s\r\n" % (subject, sid, reply + b" " if reply else b"", len(headers),
                                                  len(headers) + len(payload), headers, payload)


JS_REPLY = b"$JS.ACK.MARKET_DATA.storage-hot.1.7.7.1795324397764000000.0"
STREAM = b"".join([
    b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n',
    b"+OK\r\n",
    _msg(b"_INBOX.ack.17", 5, b'{"stream":"MARKET_DATA","seq":1}'),
    b"PING\r\n",
    _hmsg(b"trade.binance.spot.BTC-USDT", 9, b"NATS/1.0\r\nNats-Msg-Id: a:b:c:1\r\n\r\n", b'{"a":"b\r\n"}', JS_REPLY),
    _hmsg(b"_INBOX.pull", 9, b"NATS/1.0 408 Request Timeout\r\n\r\n", b""),
    _msg(b"other.subject", 3, b"ab\r\n"),
    _hmsg(b"other.headers", 3, b"NATS/1.0\r\nA: b\r\n\r\n", b"hi", b"reply.to"),
    b"PONG\r\n",
    _msg(b"empty", 3, b""),
    b"-ERR 'Permissions Violation for Publish to \"x\"'\r\n",
])


class Recorder:
    """Stands in for the client: records what the parser asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def _process_msg(self, sid, subject, reply, data, headers):
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self):
        self.calls.append(("ping",))

    async def _process_pong(self):
        self.calls.append(("pong",))

    async def _process_err(self, err):
        self.calls.append(("err", err))

    async def _process_info(self, info):
        self.calls.append(("info", info))


async def _feed(parser, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in [*cuts, len(data)]:
        await parser.parse(data[last:cut])
        last = cut


def _expected() -> list[tuple]:
    ref = Recorder()
    asyncio.run(_feed(Parser(ref), STREAM, []))
    return ref.calls


@pytest.mark.parametrize("seed", range(40))
def test_same_effects_as_nats_py_on_any_split(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(STREAM)), rng.randint(1, 25)))
    if seed == 0:
        cuts = list(range(1, len(STREAM)))  # one byte at a time
    rec = Recorder()
    fast = wire.FastParser(rec)
    asyncio.run(_feed(fast, STREAM, cuts))
    assert rec.calls == _expected()
    assert fast.buf == bytearray()


def test_registered_subscriptions_bypass_the_client():
    rec = Recorder()
    fast = wire.FastParser(rec)
    got: dict[int, list] = {5: [], 9: []}
    fast.handlers[5] = lambda s, r, d: got[5].append((s, r, d))
    fast.handlers[9] = lambda s, r, d: got[9].append((s, r, d))
    asyncio.run(_feed(fast, STREAM, [100, 101, 250]))
    assert got[5] == [(b"_INBOX.ack.17", b"", b'{"stream":"MARKET_DATA","seq":1}')]
    assert got[9] == [
        (b"trade.binance.spot.BTC-USDT", JS_REPLY, b'{"a":"b\r\n"}'),
        (b"_INBOX.pull", b"", b""),  # a status: no reply subject, headers dropped
    ]
    others = [c for c in rec.calls if c[0] == "msg"]
    assert [c[1:4] for c in others] == [(3, b"other.subject", b""), (3, b"other.headers", b"reply.to"),
                                         (3, b"empty", b"")]
    assert others[0][4:] == (b"ab\r\n", None)
    assert others[1][4:] == (b"hi", b"NATS/1.0\r\nA: b\r\n\r\n")
    assert ("err", "'permissions violation for publish to \"x\"'") in rec.calls


def test_a_large_message_is_parsed_once_when_all_of_it_arrived():
    fast = wire.FastParser(Recorder())
    got = []
    fast.handlers[9] = lambda s, r, d: got.append(d)
    payload = bytes(range(256)) * 4096  # 1 MiB, CR LF pairs inside
    msg = _hmsg(b"orderbook.binance.spot.BTC-USDT", 9, b"NATS/1.0\r\nNats-Msg-Id: k\r\n\r\n", payload, JS_REPLY)
    data = msg + _msg(b"_INBOX.ack.1", 9, b"{}")
    chunks = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    asyncio.run(fast.parse(chunks[0]))
    assert got == [] and fast.wanted == len(msg)  # the control line told how much is needed
    for chunk in chunks[1:-1]:
        asyncio.run(fast.parse(chunk))
        assert got == [] and len(fast.buf) < len(msg)
    asyncio.run(fast.parse(chunks[-1]))
    assert got == [payload, b"{}"] and fast.buf == bytearray() and fast.wanted == 0
    fast.reset()  # a reconnect: nothing of the old buffer is waited for
    assert fast.wanted == 0 and fast.buf == bytearray()


def test_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        asyncio.run(wire.FastParser(Recorder()).parse(b"HELLO\r\n"))


async def _round_trip(port: int, n: int) -> tuple[int, int, list]:
    nc = await streams.connect(f"nats://127.0.0.1:{port}")
    assert isinstance(nc._ps, wire.FastParser)
    await streams.ensure(nc)
    pub = Publisher(nc, max_pending=1000)
    tokens = []
    pub.on_acked = tokens.append
    await pub.start()
    for i in range(n):
        body = json.dumps({"i": i}).encode()
        await pub.publish(f"trade.binance.spot.S{i % 7}", body, f"binance:spot:S:{i}", token=i)
    assert len(pub.unacked_tokens()) == len(pub.pending) > 0  # the last publishes still wait for their acks
    await pub.publish("trade.binance.spot.S0", b'{"i": 0}', "binance:spot:S:0")  # a re-send
    assert await pub.flush(30)
    assert sorted(tokens) == list(range(n)) and pub.unacked_tokens() == []  # each token back once, on its ack
    puller = Puller(nc, "MARKET_DATA", "storage-hot")
    await puller.start()
    got = []
    stop = asyncio.Event()
    for _ in range(50):
        batch = await puller.collect(n, 0.5, stop)
        got += batch
        await wire.reply_all(nc, [m[1] for m in batch], wire.ACK)
        if len(got) >= n:
            break
    await asyncio.sleep(0.3)
    left = (await nc.jetstream().stream_info("MARKET_DATA")).state.messages
    await pub.close()
    await puller.close()
    await nc.close()
    return pub.acked, pub.duplicates, got, left


def test_publish_acks_and_pulls_through_a_real_server(tmp_path):
    server = NatsServer(str(tmp_path / "nats"), free_port())
    asyncio.run(server.start())
    try:
        acked, dups, got, left = asyncio.run(_round_trip(server.port, 3000))
    finally:
        server.stop()
    assert (acked, dups) == (3001, 1)
    assert sorted(json.loads(m[2])["i"] for m in got) == list(range(3000))
    assert all(m[1].startswith(b"$JS.ACK.MARKET_DATA.storage-hot.") for m in got)
    assert left == 0  # every ack reached the server: interest retention removed them all
