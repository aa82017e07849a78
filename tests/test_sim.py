"""The exchange simulator speaks each venue's real protocol (Binance, OKX; Deribit and Bybit are in
test_sim_deribit_bybit.py): frame shapes equal the recorded ones, book sequences chain, books never
cross, and REST snapshots line up with the WebSocket diffs."""

from __future__ import annotations

import argparse
import asyncio
import zlib

import aiohttp
import pytest

from marketprism.sim import add_arguments, serve, start

try:
    from test_sim_support import LocalBook, assert_shape, collect, first, fixture, get, sim, ws_url  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.test_sim_support import LocalBook, assert_shape, collect, first, fixture, get, sim, ws_url  # noqa: F401


def okx_crc(bids, asks) -> int:
    """Independent re-implementation of OKX's checksum, used to check the simulator's."""
    parts = []
    for i in range(25):
        if i < len(bids):
            parts += bids[i][:2]
        if i < len(asks):
            parts += asks[i][:2]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


# ---- Binance -------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_binance_spot_frames_match_recordings(sim):
    streams = {"btcusdt@trade": "trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl",
               "btcusdt@aggTrade": "aggtrade_ws_2021-10-12_cryptofeed.jsonl",
               "btcusdt@depth@100ms": "depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/binance_spot/stream?streams=" + "/".join(streams))) as ws:
            frames = await collect(ws, lambda fs: {f["stream"] for f in fs} >= set(streams))
            await ws.send_json({"method": "SUBSCRIBE", "params": ["ethusdt@trade"], "id": 7})
            ack = await collect(ws, lambda fs: any("id" in f for f in fs))
            assert first(ack, lambda f: "id" in f) == {"result": None, "id": 7}
        for stream, name in streams.items():
            assert_shape(first(frames, lambda f: f["stream"] == stream), fixture("binance_spot", name)[0])
        trade = first(frames, lambda f: f["stream"] == "btcusdt@trade")["data"]
        assert trade["p"].endswith("0000") and len(trade["p"].split(".")[1]) == 8  # "61837.63000000"
        snap = await get(http, sim, "/binance_spot/api/v3/depth?symbol=BTCUSDT&limit=1000")
        assert_shape(snap, fixture("binance_spot", "depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json")[0])


@pytest.mark.asyncio
async def test_binance_usdm_frames_and_rest_match_recordings(sim):
    streams = {"btcusdt@trade": ("trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl", False),
               "btcusdt@aggTrade": ("aggtrade_ws_BTCUSDT_2026-01-17_roq.json", True),
               "btcusdt@depth@100ms": ("depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl", False),
               "btcusdt@markPrice@1s": ("mark_price_ws_BTCUSDT_2021-04-01_crypto-msg-parser.json", False),
               "!forceOrder@arr": ("force_order_ws_IOTXUSDT_2021-10-19_tiagosiebler.json", False)}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/binance_usdm/stream?streams=" + "/".join(streams))) as ws:
            frames = await collect(ws, lambda fs: {f["stream"] for f in fs} >= set(streams))
        for stream, (name, bare) in streams.items():
            frame = first(frames, lambda f: f["stream"] == stream)
            assert_shape(frame["data"] if bare else frame, fixture("binance_usdm", name)[0])
        rest = {"/fapi/v1/depth?symbol=BTCUSDT&limit=1000": "depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json",
                "/fapi/v1/openInterest?symbol=BTCUSDT": "open_interest_rest_BTCUSDT_2022-06-04_crypto-msg-parser.json",
                "/fapi/v1/premiumIndex?symbol=BTCUSDT": "premium_index_rest_BTCUSDT_sdk_example.json",
                "/futures/data/globalLongShortAccountRatio?symbol=BTCUSDT&period=5m&limit=3":
                    "global_long_short_account_ratio_rest_sdk_example.json",
                "/futures/data/topLongShortPositionRatio?symbol=BTCUSDT&period=5m&limit=3":
                    "top_long_short_position_ratio_rest_sdk_example.json",
                "/futures/data/topLongShortAccountRatio?symbol=BTCUSDT&period=1h&limit=3":
                    "top_long_short_account_ratio_rest_sdk_example.json"}
        for path, name in rest.items():
            assert_shape(await get(http, sim, "/binance_usdm" + path), fixture("binance_usdm", name)[0])
        rows = await get(http, sim, "/binance_usdm/futures/data/globalLongShortAccountRatio?symbol=BTCUSDT&period=5m&limit=30")
        assert len(rows) == 30 and [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows)
        again = await get(http, sim, "/binance_usdm/futures/data/globalLongShortAccountRatio?symbol=BTCUSDT&period=5m"
                                     f"&startTime={rows[0]['timestamp']}&endTime={rows[-1]['timestamp']}&limit=30")
        assert again == rows  # history is a pure function of time: asked twice, same rows


async def chain_binance(http, sim, feed: str, api: str):
    """Subscribe, buffer, fetch the REST snapshot, sync by the venue's rule, check the chain, then
    check a later REST snapshot equals the locally maintained book at its lastUpdateId."""
    async with http.ws_connect(ws_url(sim, f"/{feed}/stream?streams=btcusdt@depth@100ms")) as ws:
        frames = await collect(ws, lambda fs: len(fs) >= 5)
        snap = await get(http, sim, f"/{feed}{api}?symbol=BTCUSDT&limit=1000")
        frames += await collect(ws, lambda fs: len(fs) >= 300)
        lid = snap["lastUpdateId"]
        diffs = [f["data"] for f in frames]
        if feed == "binance_spot":
            diffs = [d for d in diffs if d["u"] > lid]
            assert diffs[0]["U"] <= lid + 1 <= diffs[0]["u"]
        else:
            diffs = [d for d in diffs if d["u"] >= lid]
            assert diffs[0]["U"] <= lid <= diffs[0]["u"]
        book = LocalBook(snap["bids"], snap["asks"])
        for prev, diff in zip([None] + diffs, diffs):
            if prev is not None and feed == "binance_spot":
                assert diff["U"] == prev["u"] + 1
            elif prev is not None:
                assert diff["pu"] == prev["u"]
            book.apply(diff["b"], diff["a"])
            book.assert_uncrossed()
        later = await get(http, sim, f"/{feed}{api}?symbol=BTCUSDT&limit=1000")
        lid, last_u = later["lastUpdateId"], diffs[-1]["u"]
        # Spot: the snapshot is the book after the diff whose u == lastUpdateId. USD-M: the book
        # before the diff that holds lastUpdateId in [U, u].
        while (last_u < lid) if feed == "binance_spot" else not (diffs[-1]["U"] <= lid <= diffs[-1]["u"]):
            diff = (await collect(ws, lambda fs: len(fs) >= 1))[0]["data"]
            assert diff["U"] == last_u + 1 if feed == "binance_spot" else diff["pu"] == last_u
            if feed == "binance_usdm" and diff["U"] <= lid <= diff["u"]:
                diffs.append(diff)
                break
            book.apply(diff["b"], diff["a"])
            diffs.append(diff)
            last_u = diff["u"]
        if feed == "binance_spot":
            assert last_u == lid
        assert book.top(1000) == (later["bids"], later["asks"])


@pytest.mark.asyncio
async def test_binance_spot_and_usdm_books_chain_onto_rest_snapshots(sim):
    async with aiohttp.ClientSession() as http:
        await chain_binance(http, sim, "binance_spot", "/api/v3/depth")
        await chain_binance(http, sim, "binance_usdm", "/fapi/v1/depth")


# ---- OKX -----------------------------------------------------------------------------------------

def test_okx_checksum_implementation_matches_real_2022_books():
    for name in ("books_spot_BTC-USDT_2022-05-13_cryptofeed.jsonl", "books_swap_UNI-USD-SWAP_2022-05-13_cryptofeed.jsonl"):
        book = LocalBook()
        for msg in fixture("okx", name):
            data = msg["data"][0]
            book.apply(data["bids"], data["asks"])
            assert okx_crc(*book.top(25)) == data["checksum"]


@pytest.mark.asyncio
async def test_okx_frames_match_recordings(sim):
    args = [{"channel": "trades", "instId": "BTC-USDT-SWAP"}, {"channel": "books", "instId": "BTC-USDT"},
            {"channel": "funding-rate", "instId": "BTC-USDT-SWAP"}, {"channel": "open-interest", "instId": "BTC-USDT-SWAP"},
            {"channel": "liquidation-orders", "instType": "SWAP"}]
    channels = {a["channel"] for a in args}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/okx/ws/v5/public")) as ws:
            await ws.send_json({"op": "subscribe", "args": args})
            await ws.send_str("ping")
            frames = await collect(ws, lambda fs: "pong" in fs and {f["arg"]["channel"] for f in fs
                                   if isinstance(f, dict) and "data" in f} >= channels)
        acks = [f for f in frames if isinstance(f, dict) and f.get("event") == "subscribe"]
        assert [a["arg"] for a in acks] == args and all(isinstance(a["connId"], str) for a in acks)
        data = [f for f in frames if isinstance(f, dict) and "data" in f]
        books = [f for f in data if f["arg"]["channel"] == "books"]
        real_books = fixture("okx", "books_docs_example_snapshot_update.jsonl")
        assert books[0]["action"] == "snapshot" and books[0]["data"][0]["prevSeqId"] == -1
        assert_shape(books[0], real_books[0])
        assert_shape(first(books, lambda f: f["action"] == "update"), real_books[1])
        for channel, name in (("trades", "trades_swap_BTC-USDT-SWAP_2025-12-08_roq.json"),
                              ("funding-rate", "funding_rate_ws_LTC-USDT-SWAP_2025-12-08_roq.json"),
                              ("open-interest", "open_interest_ws_docs_example.json"),
                              ("liquidation-orders", "liquidation_orders_ws_FUTURES_XRP-USD-230929_2023-03-30_tardis.json")):
            assert_shape(first(data, lambda f: f["arg"]["channel"] == channel), fixture("okx", name)[0])
        rest = {"/api/v5/market/books?instId=BTC-USDT&sz=5": "books_rest_docs_example.json",
                "/api/v5/public/open-interest?instType=SWAP&instId=BTC-USDT-SWAP": "open_interest_rest_docs_example.json",
                "/api/v5/rubik/stat/contracts/long-short-account-ratio?ccy=BTC&period=5m":
                    "long_short_account_ratio_rest_docs_example.json"}
        for path, name in rest.items():
            assert_shape(await get(http, sim, "/okx" + path), fixture("okx", name)[0])
        for path in ("long-short-account-ratio-contract", "long-short-account-ratio-contract-top-trader",
                     "long-short-position-ratio-contract-top-trader"):
            body = await get(http, sim, f"/okx/api/v5/rubik/stat/contracts/{path}?instId=BTC-USDT-SWAP&period=5m")
            assert body["code"] == "0" and len(body["data"]) == 100
            assert all(len(row) == 2 and all(isinstance(x, str) for x in row) for row in body["data"])
            assert int(body["data"][0][0]) > int(body["data"][1][0])  # newest first, as OKX returns
        fr = (await get(http, sim, "/okx/api/v5/public/funding-rate?instId=BTC-USDT-SWAP"))["data"][0]
        assert_shape(fr, fixture("okx", "funding_rate_ws_LTC-USDT-SWAP_2025-12-08_roq.json")[0]["data"][0])


@pytest.mark.asyncio
async def test_okx_books_chain_with_real_checksums_and_match_rest(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/okx/ws/v5/public")) as ws:
            await ws.send_json({"op": "subscribe", "args": [{"channel": "books", "instId": "BTC-USDT-SWAP"}]})
            frames = await collect(ws, lambda fs: len(fs) >= 301)
            rest = (await get(http, sim, "/okx/api/v5/market/books?instId=BTC-USDT-SWAP&sz=400"))["data"][0]
            books = [f for f in frames if "data" in f]
            book, seq = LocalBook(), None
            for msg in books:
                data = msg["data"][0]
                assert data["prevSeqId"] == (-1 if seq is None else seq)
                book.apply(data["bids"], data["asks"])
                book.assert_uncrossed()
                assert okx_crc(*book.top(25)) == data["checksum"]
                seq = data["seqId"]
            while seq < rest["seqId"]:
                data = (await collect(ws, lambda fs: len(fs) >= 1))[0]["data"][0]
                assert data["prevSeqId"] == seq
                book.apply(data["bids"], data["asks"])
                seq = data["seqId"]
        assert seq == rest["seqId"]
        bids, asks = book.top(400)
        assert [r[:2] for r in rest["bids"]] == bids and [r[:2] for r in rest["asks"]] == asks


@pytest.mark.asyncio
async def test_okx_checksum_zero_option():
    simulator = await start(port=0, rate=200, feeds="okx", checksum="zero")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(ws_url(simulator, "/okx/ws/v5/public")) as ws:
                await ws.send_json({"op": "subscribe", "args": [{"channel": "books", "instId": "ETH-USDT"}]})
                frames = await collect(ws, lambda fs: len(fs) >= 6)
        assert {f["data"][0]["checksum"] for f in frames if "data" in f} == {0}
    finally:
        await simulator.stop()


# ---- interface -----------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_cli_arguments_and_serve_run_until_cancelled():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", "0", "--feeds", "okx,deribit", "--rate", "5", "--checksum", "zero"])
    assert (args.host, args.seed, args.speed, args.faults) == ("127.0.0.1", 1, 1.0, None)
    task = asyncio.create_task(serve(args))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ValueError):
        await start(port=0, feeds="kraken")
    with pytest.raises(ValueError):
        await start(port=0, symbols="BTCUSDT")
