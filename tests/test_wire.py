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


def test_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        asyncio.run(wire.FastParser(Recorder()).parse(b"HELLO\r\n"))


async def _round_trip(port: int, n: int) -> tuple[int, int, list]:
    nc = await streams.connect(f"nats://127.0.0.1:{port}")
    assert isinstance(nc._ps, wire.FastParser)
    await streams.ensure(nc)
    pub = Publisher(nc, max_pending=1000)
    await pub.start()
    for i in range(n):
        body = json.dumps({"i": i}).encode()
        await pub.publish(f"trade.binance.spot.S{i % 7}", body, f"binance:spot:S:{i}")
    await pub.publish("trade.binance.spot.S0", b'{"i": 0}', "binance:spot:S:0")  # a re-send
    assert await pub.flush(30)
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


# -- fast ingest (ADR-50 batches) through a real nats-server ------------------------------------------------

async def _fast(port: int, scenario) -> dict:
    nc = await streams.connect(f"nats://127.0.0.1:{port}")
    await streams.ensure(nc)
    pub = Publisher(nc, max_pending=100_000, ack_timeout_s=1.0, fast_ingest=True)
    await pub.start()
    try:
        return await scenario(nc, pub)
    finally:
        await pub.close()
        await nc.close()


async def _publish_trades(pub: Publisher, ids, types=("trade",)) -> None:
    for i in ids:
        dt = types[i % len(types)]
        await pub.publish(f"{dt}.binance.spot.S{i % 7}", json.dumps({"i": i}).encode(), f"{dt}:binance:spot:S:{i}")


async def _stored(nc, stream: str) -> int:
    return (await nc.jetstream().stream_info(stream)).state.messages


def _with_server(tmp_path, scenario) -> dict:
    server = NatsServer(str(tmp_path / "nats"), free_port())
    asyncio.run(server.start())
    try:
        return asyncio.run(_fast(server.port, scenario))
    finally:
        server.stop()


def test_fast_ingest_acks_every_message_through_flow_acks_and_the_idle_commit(tmp_path):
    async def scenario(nc, pub):
        await _publish_trades(pub, range(5000), ("trade", "orderbook", "gap"))
        await _publish_trades(pub, range(100), ("trade", "orderbook", "gap"))  # re-sent: same ids
        flushed = await pub.flush(20)
        batches = {key: (b.id, b.flow) for key, b in pub._batches.items()}
        return {"flushed": flushed, "acked": pub.acked, "pending": len(pub.pending), "batches": batches,
                "market": await _stored(nc, "MARKET_DATA"), "books": await _stored(nc, "ORDERBOOK_SNAP"),
                "per_message": set(pub._per_message), "rejected": pub.rejected}

    got = _with_server(tmp_path, scenario)
    assert got["flushed"] and (got["acked"], got["pending"], got["rejected"]) == (5100, 0, 0)
    assert got["per_message"] == set() and set(got["batches"]) == {"trade", "orderbook", "gap"}
    assert all(flow > 1 for _, flow in got["batches"].values())  # the server's flow, not one ack per message
    # orderbook.> goes to its own stream; the 100 re-sent ids were dropped by the duplicate window
    assert (got["market"], got["books"]) == (3333, 1667)


def test_fast_ingest_falls_back_to_one_ack_per_message_where_the_stream_has_no_batches(tmp_path):
    async def scenario(nc, pub):
        js = nc.jetstream()
        cfg = await js.stream_info("MARKET_DATA")
        cfg.config.allow_batched = False
        await js.update_stream(cfg.config)
        await _publish_trades(pub, range(300))
        flushed = await pub.flush(20)
        return {"flushed": flushed, "acked": pub.acked, "dups": pub.duplicates, "stored": await _stored(nc, "MARKET_DATA"),
                "per_message": set(pub._per_message)}

    got = _with_server(tmp_path, scenario)
    assert got == {"flushed": True, "acked": 300, "dups": 0, "stored": 300, "per_message": {"trade"}}


def test_a_full_stream_holds_the_batch_and_its_rest_is_resent_once_there_is_room(tmp_path):
    async def scenario(nc, pub):
        js = nc.jetstream()
        info = await js.stream_info("MARKET_DATA")
        info.config.max_msgs = 1000
        await js.update_stream(info.config)
        await _publish_trades(pub, range(2500))
        await asyncio.sleep(2.5)  # rejected, held, re-sent (and refused again) at the ack timeout
        held = {"pending": len(pub.pending), "rejected": pub.rejected, "why": pub.last_rejection[1],
                "stored": await _stored(nc, "MARKET_DATA")}
        info.config.max_msgs = -1
        await js.update_stream(info.config)
        flushed = await pub.flush(20)
        return {"held": held, "flushed": flushed, "acked": pub.acked, "pending": len(pub.pending),
                "stored": await _stored(nc, "MARKET_DATA")}

    got = _with_server(tmp_path, scenario)
    assert got["held"]["stored"] == 1000 and got["held"]["pending"] == 1500
    assert got["held"]["why"] == "maximum messages exceeded" and got["held"]["rejected"] >= 1
    assert (got["flushed"], got["acked"], got["pending"], got["stored"]) == (True, 2500, 0, 2500)
