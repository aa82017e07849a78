"""Simulator fault injection and counters: each fault type has its described effect, and
/_sim/stats counts exactly what was delivered."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import pytest_asyncio

from marketprism.sim import start

try:
    from test_sim_support import collect
except ImportError:  # tests/ imported as a package
    from tests.test_sim_support import collect


@pytest_asyncio.fixture
async def sim():
    simulator = await start(port=0, rate=300, speed=50, seed=11)
    yield simulator
    await simulator.stop()


def ws_url(sim, path: str) -> str:
    return sim.url.replace("http://", "ws://") + path


async def raw_frames(ws, n: int, timeout: float = 5.0) -> list[str]:
    out = []
    while len(out) < n:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        out.append(msg.data)
    return out


async def drain(ws, quiet: float = 0.3) -> list[str]:
    """Everything the socket still delivers until it has been quiet for `quiet` seconds."""
    out = []
    while True:
        try:
            msg = await asyncio.wait_for(ws.receive(), quiet)
        except asyncio.TimeoutError:
            return out
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        out.append(msg.data)


@pytest.mark.asyncio
async def test_drop_closes_every_socket_of_the_feed_only(sim):
    async with aiohttp.ClientSession() as http:
        a = await http.ws_connect(ws_url(sim, "/binance_spot/stream?streams=btcusdt@trade"))
        b = await http.ws_connect(ws_url(sim, "/binance_spot/ws/ethusdt@trade"))
        other = await http.ws_connect(ws_url(sim, "/okx/ws/v5/public"))
        await raw_frames(a, 2)
        sim.inject({"type": "drop", "feed": "binance_spot"})
        for ws in (a, b):
            while True:
                msg = await asyncio.wait_for(ws.receive(), 3)
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        await other.send_str("ping")
        assert await raw_frames(other, 1) == ["pong"]
        c = await http.ws_connect(ws_url(sim, "/bybit_spot/v5/public/spot"))
        sim.inject({"type": "drop", "feed": "bybit_spot", "mode": "abort"})
        msg = await asyncio.wait_for(c.receive(), 3)
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE)
        await other.close()
    assert sim.stats()["feeds"]["binance_spot"]["faults"] == {"drop": 1}


@pytest.mark.asyncio
async def test_skip_sequence_breaks_the_chain_exactly_once(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/binance_spot/stream?streams=btcusdt@depth@100ms")) as ws:
            before = [json.loads(f)["data"] for f in await raw_frames(ws, 10)]
            sim.inject({"type": "skip_sequence", "feed": "binance_spot", "symbol": "BTCUSDT"})
            after = [json.loads(f)["data"] for f in await raw_frames(ws, 30)]
        diffs = before + after
        gaps = [(p["u"], d["U"]) for p, d in zip(diffs, diffs[1:]) if d["U"] != p["u"] + 1]
        assert len(gaps) == 1 and gaps[0][1] > gaps[0][0] + 1
        async with http.ws_connect(ws_url(sim, "/okx/ws/v5/public")) as ws:
            await ws.send_json({"op": "subscribe", "args": [{"channel": "books", "instId": "ETH-USDT-SWAP"}]})
            frames = await collect(ws, lambda fs: len(fs) >= 8)
            await sim_post(http, sim, {"type": "skip_sequence", "feed": "okx", "count": 2})
            frames += await collect(ws, lambda fs: len(fs) >= 30)
        books = [f["data"][0] for f in frames if "data" in f]
        breaks = [d for p, d in zip(books, books[1:]) if d["prevSeqId"] != p["seqId"]]
        assert len(breaks) == 1   # two messages skipped in a row: one break in the chain
    assert sim.stats()["feeds"]["okx"]["faults"]["skip_sequence"] == 2


async def sim_post(http, sim, body, status: int = 200) -> dict:
    async with http.post(sim.url + "/_sim/faults", data=json.dumps(body)) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


@pytest.mark.asyncio
async def test_malformed_and_truncated_frames(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/deribit/ws/api/v2")) as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "public/subscribe",
                                "params": {"channels": ["book.BTC-PERPETUAL.100ms", "trades.BTC-PERPETUAL.raw"]}})
            frames = await raw_frames(ws, 5)
            sim.inject({"type": "malformed", "feed": "deribit"})
            sim.inject({"type": "truncated", "feed": "deribit", "data_type": "orderbook"})
            frames += await raw_frames(ws, 60)
        bad = []
        for text in frames:
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)
        assert len(bad) == 2
        assert not bad[0].startswith("{")                       # the non-JSON frame
        assert bad[1].startswith('{"jsonrpc":"2.0","method":"subscription","params":{"channel":"book.')
        notes = [json.loads(t)["params"]["data"] for t in frames if t not in bad and '"params"' in t]
        changes = [d for d in notes if isinstance(d, dict) and d.get("type") == "change"]
        breaks = [d for p, d in zip(changes, changes[1:]) if d["prev_change_id"] != p["change_id"]]
        assert len(breaks) == 1   # the truncated change is lost, so the chain breaks once
    faults = sim.stats()["feeds"]["deribit"]["faults"]
    assert faults == {"malformed": 1, "truncated": 1}


@pytest.mark.asyncio
async def test_stale_stops_data_but_keeps_the_socket_answering(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/bybit_linear/v5/public/linear")) as ws:
            await ws.send_json({"op": "subscribe", "args": ["publicTrade.BTCUSDT"]})
            await raw_frames(ws, 4)
            await sim_post(http, sim, {"type": "stale", "feed": "bybit_linear", "seconds": 1.0})
            await drain(ws, 0.1)   # frames already written before the fault
            started = time.monotonic()
            await ws.send_json({"op": "ping", "req_id": "x"})
            reply = json.loads((await raw_frames(ws, 1))[0])
            assert reply["op"] == "ping" and reply["ret_msg"] == "pong"
            data = json.loads((await raw_frames(ws, 1, timeout=3))[0])
            assert data["topic"] == "publicTrade.BTCUSDT"
            assert time.monotonic() - started >= 0.8


@pytest.mark.asyncio
async def test_rest_status_and_delay(sim):
    async with aiohttp.ClientSession() as http:
        sim.inject({"type": "rest_status", "feed": "binance_usdm", "status": 429, "count": 2, "retry_after": 3,
                    "path": "/fapi/v1/depth"})
        url = sim.url + "/binance_usdm/fapi/v1/depth?symbol=BTCUSDT&limit=5"
        async with http.get(sim.url + "/binance_usdm/fapi/v1/time") as resp:
            assert resp.status == 200                           # other paths are not affected
        for _ in range(2):
            async with http.get(url) as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "3"
                assert (await resp.json())["code"] == -1003
        async with http.get(url) as resp:
            assert resp.status == 200
        await sim_post(http, sim, [{"type": "rest_status", "feed": "okx", "status": 451},
                                   {"type": "rest_status", "feed": "bybit_linear", "status": 500}])
        async with http.get(sim.url + "/okx/api/v5/public/time") as resp:
            assert resp.status == 451 and "code" in await resp.json()
        async with http.get(sim.url + "/bybit_linear/v5/market/time") as resp:
            assert resp.status == 500 and "retCode" in await resp.json()
        sim.inject({"type": "rest_delay", "feed": "deribit", "seconds": 0.4})
        started = time.monotonic()
        async with http.get(sim.url + "/deribit/api/v2/public/get_time") as resp:
            assert resp.status == 200
        assert time.monotonic() - started >= 0.4
        started = time.monotonic()
        async with http.get(sim.url + "/deribit/api/v2/public/get_time") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 0.3


@pytest.mark.asyncio
async def test_fault_validation_and_scheduled_faults_from_start():
    simulator = await start(port=0, feeds="binance_spot,okx", rate=100,
                            faults=[{"type": "rest_status", "feed": "okx", "status": 503, "at": 0.3}])
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(simulator.url + "/okx/api/v5/public/time") as resp:
                assert resp.status == 200                        # not yet: "at" is 0.3 s after start
            await asyncio.sleep(0.4)
            async with http.get(simulator.url + "/okx/api/v5/public/time") as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            for body in ({"type": "nope"}, {"type": "drop", "feed": "kraken"}, {"type": "stale", "seconds": -1},
                         {"type": "rest_status", "status": 200}):
                assert "error" in await sim_post(http, simulator, body, status=400)
            async with http.get(simulator.url + "/_sim/faults") as resp:
                applied = await resp.json()
            assert [f["type"] for f in applied] == ["rest_status"] and applied[0]["feed"] == "okx"
    finally:
        await simulator.stop()
    with pytest.raises(ValueError):
        await start(port=0, faults=[{"type": "drop", "feed": "nowhere"}])


@pytest.mark.asyncio
async def test_stats_count_what_was_delivered(sim):
    async with aiohttp.ClientSession() as http:
        spot = await http.ws_connect(ws_url(sim, "/binance_spot/stream?streams=btcusdt@trade/ethusdt@depth@100ms"))
        linear = await http.ws_connect(ws_url(sim, "/bybit_linear/v5/public/linear"))
        await linear.send_json({"op": "subscribe", "args": ["publicTrade.BTCUSDT", "orderbook.50.BTCUSDT"]})
        await asyncio.sleep(0.6)
        sim.inject({"type": "stale", "seconds": 2})   # every feed: counts stop moving
        frames = {"spot": await drain(spot), "linear": await drain(linear)}
        stats = (await (await http.get(sim.url + "/_sim/stats")).json())
        await spot.close()
        await linear.close()
    got = [json.loads(f) for f in frames["spot"]]
    assert stats["sent"]["binance_spot"] == {"trade": sum(f["stream"] == "btcusdt@trade" for f in got),
                                             "orderbook": sum(f["stream"] == "ethusdt@depth@100ms" for f in got)}
    got = [json.loads(f) for f in frames["linear"] if f.startswith('{"topic"')]
    trades = sum(len(f["data"]) for f in got if f["topic"] == "publicTrade.BTCUSDT")
    assert trades > sum(f["topic"] == "publicTrade.BTCUSDT" for f in got)   # several trades per frame happen
    assert stats["sent"]["bybit_linear"] == {"trade": trades,
                                             "orderbook": sum(f["topic"].startswith("orderbook") for f in got)}
    assert stats["feeds"]["binance_spot"]["connections"] == 1 and stats["feeds"]["okx"]["sent"] == {}


@pytest.mark.asyncio
async def test_high_rate_load_source():
    simulator = await start(port=0, feeds="binance_spot", rate=20000)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(ws_url(simulator, "/binance_spot/stream?streams=btcusdt@trade/btcusdt@depth@100ms"
                                                         "/ethusdt@trade/ethusdt@depth@100ms")) as ws:
                await raw_frames(ws, 100)
                started, n = time.monotonic(), 0
                while time.monotonic() - started < 1.0:
                    msg = await ws.receive()
                    assert msg.type == aiohttp.WSMsgType.TEXT
                    n += 1
        # 40k/s asked; a 2-core CI machine running client and server in one process gets less.
        assert n >= 5000, n
    finally:
        await simulator.stop()
