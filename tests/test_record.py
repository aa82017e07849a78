"""`marketprism record` and the recorder: the DESIGN.md §4 envelope, file layout, rotation by size and hour,
regular flushes (a crash loses about a second), bytes that are not UTF-8, disk errors that never stop the
collector; the command itself as a user runs it (publishing, or --no-publish); `replay --publish` refusing
what it cannot do and publishing once it can; a recorded instrument list replayed as metadata."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import aiohttp

from conftest import fixture_lines, wait_for
from marketprism import replay
from marketprism.bus import streams
from marketprism.bus.server import free_port
from marketprism.exchanges import make_feed
from marketprism.record import HOUR_MS, Recorder
from marketprism.sim import start

T0 = 1_795_316_400_000  # 2026-11-22T03:00:00Z, an hour boundary
WS = "wss://stream.binance.com:9443/stream?streams=btcusdt@trade"
TRADES = fixture_lines("binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl")


def lines_of(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_each_frame_and_body_is_one_envelope_exactly_as_received(tmp_path):
    rec = Recorder(tmp_path)
    rec.write("binance_spot", T0 + 5, WS, TRADES[0].decode())                  # a WS text frame (str)
    rec.write("binance_spot", T0 + 6, "/api/v3/depth?symbol=BTCUSDT&limit=1000", b'{"lastUpdateId":1}')  # REST body
    rec.write("binance_spot", T0 + 7, WS, b'{"e":"trade","s":"caf\xe9"}')   # not UTF-8 (latin-1 byte)
    rec.close()
    (path,) = (tmp_path / "binance_spot").iterdir()
    assert path.name == "20261122T03-000.jsonl.gz"
    assert lines_of(path) == [
        {"received_at": T0 + 5, "source": WS, "data": TRADES[0].decode()},
        {"received_at": T0 + 6, "source": "/api/v3/depth?symbol=BTCUSDT&limit=1000", "data": '{"lastUpdateId":1}'},
        {"received_at": T0 + 7, "source": WS, "data": '{"e":"trade","s":"caf\ufffd"}'},
    ]
    assert (rec.not_utf8, rec.frames, rec.errors) == (1, {"binance_spot": 3}, 0)


def test_files_rotate_by_size_and_by_hour_and_a_restart_never_overwrites(tmp_path):
    rec = Recorder(tmp_path, rotate_mb=1)
    noise = [base64.b64encode(os.urandom(30_000)).decode() for _ in range(100)]  # ~4 MB, incompressible
    for i, text in enumerate(noise):
        rec.write("okx", T0 + i, "wss://ws.okx.com:8443/ws/v5/public", text)
    rec.write("okx", T0 + HOUR_MS, "wss://ws.okx.com:8443/ws/v5/public", "next hour")
    rec.close()
    again = Recorder(tmp_path)  # restarted within the same hour
    again.write("okx", T0 + HOUR_MS + 1, "/api/v5/public/time", "after a restart")
    again.close()
    names = sorted(p.name for p in (tmp_path / "okx").iterdir())
    hour3 = [n for n in names if n.startswith("20261122T03-")]
    assert len(hour3) >= 3 and names[len(hour3):] == ["20261122T04-000.jsonl.gz", "20261122T04-001.jsonl.gz"]
    assert hour3 == [f"20261122T03-{i:03d}.jsonl.gz" for i in range(len(hour3))]
    sizes = [(tmp_path / "okx" / n).stat().st_size for n in hour3]
    assert all(1 << 20 <= s < (1 << 20) + 200_000 for s in sizes[:-1]), sizes
    # in order, nothing lost or repeated across the rotations
    data = [line["data"] for n in names for line in lines_of(tmp_path / "okx" / n)]
    assert data == noise + ["next hour", "after a restart"]


def test_only_the_chosen_feeds_are_recorded_and_a_disk_error_pauses_without_raising(tmp_path):
    rec = Recorder(tmp_path, feeds=("okx", "deribit"))
    (tmp_path / "okx").write_text("a file where the feed's directory should be")
    rec.write("binance_spot", T0, WS, "not recorded")
    rec.write("okx", T0, "wss://ws.okx.com:8443/ws/v5/public", "cannot be written")  # must not raise
    rec.write("okx", T0 + 1, "wss://ws.okx.com:8443/ws/v5/public", "paused, not retried at once")
    rec.write("deribit", T0, "wss://www.deribit.com/ws/api/v2", "recorded")
    rec.close()
    assert not (tmp_path / "binance_spot").exists()
    assert rec.errors == 1 and rec.frames == {"deribit": 1}
    assert [line["data"] for p in (tmp_path / "deribit").iterdir() for line in lines_of(p)] == ["recorded"]


async def test_the_stream_is_flushed_every_second_so_a_crash_loses_little(tmp_path, capsys):
    rec = Recorder(tmp_path)
    for i, line in enumerate(TRADES):
        rec.write("binance_spot", T0 + i, WS, line.decode())
    (path,) = (tmp_path / "binance_spot").iterdir()
    await asyncio.sleep(1.3)
    crashed = tmp_path / "crashed.jsonl.gz"
    shutil.copy(path, crashed)  # the file as a crash leaves it: flushed, without the gzip trailer
    rec.close()
    out = io.BytesIO()
    assert replay.run("binance_spot", [str(crashed)], 400, out=out) == 0
    got = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["trade_id"] for r in got] == [str(json.loads(t)["data"]["t"]) for t in TRADES]
    assert [r["received_at"] for r in got] == [T0 + i for i in range(len(TRADES))]  # receipt times kept
    err = capsys.readouterr().err
    assert "ends without a gzip trailer" in err and "records trade=100; 0 unparseable" in err


# -- the commands --------------------------------------------------------------------------------------------

async def cli(*args: str, env: dict | None = None, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "marketprism", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def env_for(sim_url: str = "", **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    env.update({"MARKETPRISM_LOG_LEVEL": "WARNING", "MARKETPRISM_HEALTH_PORT": str(free_port()), **extra})
    if sim_url:
        for feed in ("binance_spot", "okx", "bybit_linear"):
            env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = sim_url.replace("http://", "ws://") + f"/{feed}"
            env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"{sim_url}/{feed}"
    return env


async def test_record_publishes_and_records_or_with_no_publish_only_records(tmp_path, nats_server):
    nc = await streams.connect(nats_server.url)
    await streams.ensure(nc)
    sim = await start(port=0, rate=20, speed=20)
    both = tmp_path / "both"
    only = tmp_path / "only"
    try:
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "marketprism", "record", *args, stderr=asyncio.subprocess.PIPE,
            env=env_for(sim.url, MARKETPRISM_NATS_URL=url, MARKETPRISM_DATA_TYPES="trade,orderbook"))
            for args, url in ((("--dir", str(both), "--feeds", "binance_spot,okx"), nats_server.url),
                              (("--dir", str(only), "--feeds", "bybit_linear", "--no-publish"), ""))]
        assert await wait_for(lambda: len(list(both.glob("*/*.gz"))) == 2 and list(only.glob("*/*.gz")), 20)
        await asyncio.sleep(1.5)  # some traffic, flushed
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        results = [(await asyncio.wait_for(p.wait(), 20), (await p.stderr.read()).decode()) for p in procs]
        info = await nc.jetstream().stream_info("MARKET_DATA")
    finally:
        await sim.stop()
        await nc.drain()
    assert [code for code, _ in results] == [0, 0], results
    assert sorted(p.parent.name for p in both.glob("*/*.gz")) == ["binance_spot", "okx"]
    assert [p.parent.name for p in only.glob("*/*.gz")] == ["bybit_linear"]
    assert info.state.messages > 0  # the publishing recorder published (nobody consumes here)
    for feed, path in [("okx", next(both.glob("okx/*.gz"))), ("bybit_linear", next(only.glob("*/*.gz")))]:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().splitlines()  # complete: the gzip trailer was written at the stop
        assert lines and all(set(json.loads(x)) == {"received_at", "source", "data"} for x in lines)
        kinds = {r.__struct_config__.tag for r in replay.replay(make_feed(feed), lines)}
        assert {"trade", "orderbook"} <= kinds, (feed, kinds)


async def test_record_and_replay_publish_refuse_what_they_cannot_do_and_publish_once_they_can(tmp_path, nats_server):
    recording = tmp_path / "r.jsonl"
    recording.write_bytes(b"\n".join(TRADES))
    nats = env_for(MARKETPRISM_NATS_URL=nats_server.url)
    runs = await asyncio.gather(
        cli("record", env=env_for()),
        cli("record", "--feeds", "binance_spot,kraken", env=env_for()),
        cli("replay", "--exchange", "binance_spot", "--publish", str(recording), env=env_for()),
        cli("replay", "--exchange", "binance_spot", "--publish", str(recording), env=nats))
    assert [code for code, _, _ in runs] == [2, 2, 2, 1]
    assert [err.strip().count("\n") for _, _, err in runs] == [0, 0, 0, 0], runs  # one line each
    assert "MARKETPRISM_NATS_URL is not set" in runs[0][2] and "--no-publish" in runs[0][2]
    assert re.search(r"unknown feed 'kraken'", runs[1][2])
    assert "--publish needs MARKETPRISM_NATS_URL" in runs[2][2]
    assert "stream MARKET_DATA does not exist; run `marketprism init --streams`" in runs[3][2]
    # once the streams exist it publishes, and a second replay adds nothing
    nc = await streams.connect(nats_server.url)
    await streams.ensure(nc)
    await nc.drain()
    for already in (0, 100):
        code, out, err = await cli("replay", "--exchange", "binance_spot", "--publish", str(recording), env=nats)
        assert (code, out) == (0, "") and err.strip().endswith(f"published 100 of 100 ({already} already in JetStream)")


async def test_replay_applies_a_recorded_instrument_list_as_the_collector_does():
    """The collector loads instrument lists (symbols, contract sizes) before collecting; a recording that
    holds one is replayed the same way: as metadata for the feed, not as an unparseable message."""
    sim = await start(port=0, feeds="okx")
    path = "/api/v5/public/instruments?instType=SWAP&instId=BTC-USDT-SWAP"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{sim.url}/okx{path}") as resp:
                body = await resp.text()
    finally:
        await sim.stop()
    feed = make_feed("okx")
    line = json.dumps({"received_at": T0, "source": path, "data": body}).encode()
    assert list(replay.replay(feed, [line])) == [] and not feed.errors
    info = feed.instrument_info["BTC-USDT-SWAP"]
    assert (info.symbol, info.contract_value) == ("BTC-USDT", json.loads(body)["data"][0]["ctVal"])
