"""The simulated Deribit and Bybit feeds: frame shapes equal the recorded ones, book sequences chain,
depth views agree, books never cross, and REST snapshots line up with the WebSocket messages."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from marketprism.sim import start

try:
    from test_sim_support import LocalBook, assert_shape, collect, first, fixture, get, sim, ws_url  # noqa: F401
except ImportError:  # tests/ imported as a package
    from tests.test_sim_support import LocalBook, assert_shape, collect, first, fixture, get, sim, ws_url  # noqa: F401


# ---- Deribit -------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_deribit_frames_match_recordings(sim):
    channels = ["trades.BTC-PERPETUAL.100ms", "book.BTC-PERPETUAL.100ms", "ticker.BTC-PERPETUAL.100ms",
                "deribit_volatility_index.btc_usd", "deribit_volatility_index.eth_usd"]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/deribit/ws/api/v2")) as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 42, "method": "public/subscribe", "params": {"channels": channels}})
            frames = await collect(ws, lambda fs: {f["params"]["channel"] for f in fs if "params" in f} >= set(channels))
        reply = first(frames, lambda f: f.get("id") == 42)
        assert reply["result"] == channels and reply["jsonrpc"] == "2.0" and reply["testnet"] is False
        notes = [f for f in frames if f.get("method") == "subscription"]
        real_book = fixture("deribit", "book_raw_BTC-24SEP21-8000-P_2021-07-22_cryptofeed.jsonl")
        book = [f for f in notes if f["params"]["channel"].startswith("book.")]
        assert book[0]["params"]["data"]["type"] == "snapshot"
        assert_shape(book[0]["params"]["data"], real_book[0]["params"]["data"])
        assert_shape(first(book, lambda f: f["params"]["data"]["type"] == "change"), real_book[1])
        for prefix, name in (("trades.", "trades_ws_BTC-PERPETUAL_2021-03-21_crypto-msg-parser.json"),
                             ("ticker.", "ticker_ws_BTC-PERPETUAL_2022-06-02_crypto-msg-parser.json")):
            assert_shape(first(notes, lambda f: f["params"]["channel"].startswith(prefix)), fixture("deribit", name)[0])
        vol = first(notes, lambda f: f["params"]["channel"] == "deribit_volatility_index.eth_usd")["params"]["data"]
        assert_shape(vol, fixture("deribit", "volatility_index_ws_docs_example_data.json")[0])
        assert vol["index_name"] == "eth_usd"
        ob = await get(http, sim, "/deribit/api/v2/public/get_order_book?instrument_name=BTC-PERPETUAL&depth=5")
        # The doc example (2019) types open_interest as a float; the live 2022 ticker has an integer.
        assert_shape(ob["result"], fixture("deribit", "order_book_rest_docs_example.json")[0]["result"], any_number=True)
        assert isinstance(ob["result"]["open_interest"], int)
        assert set(ob) == {"jsonrpc", "result", "usIn", "usOut", "usDiff", "testnet"}
        instruments = (await get(http, sim, "/deribit/api/v2/public/get_instruments?currency=BTC&kind=future"))["result"]
        assert [i["instrument_name"] for i in instruments] == ["BTC-PERPETUAL"]
        assert isinstance((await get(http, sim, "/deribit/api/v2/public/get_time"))["result"], int)


@pytest.mark.asyncio
async def test_deribit_book_changes_chain_and_match_rest(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/deribit/ws/api/v2")) as ws:
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "public/subscribe",
                                "params": {"channels": ["book.ETH-PERPETUAL.100ms"]}})
            frames = await collect(ws, lambda fs: len(fs) >= 301)
            rest = (await get(http, sim, "/deribit/api/v2/public/get_order_book?instrument_name=ETH-PERPETUAL&depth=400"))["result"]
            book, change_id = LocalBook(), None

            def apply(data):
                nonlocal change_id
                if data["type"] == "snapshot":
                    assert change_id is None
                else:
                    assert data["prev_change_id"] == change_id
                for side, rows in (("bids", data["bids"]), ("asks", data["asks"])):
                    for action, price, amount in rows:
                        assert (action == "delete") == (amount == 0)
                        existed = price in (book.bids if side == "bids" else book.asks)
                        assert existed == (action != "new"), (action, price)
                book.apply([r[1:] for r in data["bids"]], [r[1:] for r in data["asks"]])
                book.assert_uncrossed()
                change_id = data["change_id"]
            for frame in frames[1:]:
                apply(frame["params"]["data"])
            while change_id < rest["change_id"]:
                apply((await collect(ws, lambda fs: len(fs) >= 1))[0]["params"]["data"])
        assert change_id == rest["change_id"]
        bids, asks = book.top(400)
        assert rest["bids"] == bids and rest["asks"] == asks


@pytest.mark.asyncio
async def test_deribit_heartbeat_test_request_and_close_when_unanswered():
    simulator = await start(port=0, feeds="deribit", speed=100)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(ws_url(simulator, "/deribit/ws/api/v2")) as ws:
                await ws.send_json({"jsonrpc": "2.0", "id": 5, "method": "public/set_heartbeat", "params": {"interval": 10}})
                frames = await collect(ws, lambda fs: any(f.get("method") == "heartbeat" for f in fs))
                assert first(frames, lambda f: f.get("id") == 5)["result"] == "ok"
                assert first(frames, lambda f: f.get("method") == "heartbeat") == \
                    {"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}}
                await ws.send_json({"jsonrpc": "2.0", "id": 6, "method": "public/test", "params": {}})
                frames = await collect(ws, lambda fs: sum(f.get("method") == "heartbeat" for f in fs) >= 1)
                assert first(frames, lambda f: f.get("id") == 6)["result"] == {"version": "1.2.26"}
                msg = await asyncio.wait_for(ws.receive(), 3)   # unanswered: the server closes
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await simulator.stop()


# ---- Bybit ---------------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_bybit_frames_match_recordings(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/bybit_linear/v5/public/linear")) as ws:
            topics = ["publicTrade.BTCUSDT", "orderbook.50.BTCUSDT", "orderbook.1.BTCUSDT", "tickers.BTCUSDT",
                      "allLiquidation.BTCUSDT"]
            await ws.send_json({"op": "subscribe", "args": topics, "req_id": "a1"})
            await ws.send_json({"op": "ping", "req_id": "p1"})
            frames = await collect(ws, lambda fs: {f.get("topic") for f in fs} >= set(topics) and
                                   any(f.get("type") == "delta" and f["topic"].startswith("tickers") for f in fs))
        ack = first(frames, lambda f: f.get("op") == "subscribe")
        assert ack["success"] is True and ack["req_id"] == "a1"
        assert first(frames, lambda f: f.get("op") == "ping")["ret_msg"] == "pong"
        by = lambda topic, kind=None: first(frames, lambda f: f.get("topic") == topic and kind in (None, f["type"]))  # noqa: E731
        assert_shape(by("publicTrade.BTCUSDT"), fixture("bybit", "public_trade_linear_BTCUSDT_2025-09-26_hftbacktest.json")[0])
        assert_shape(by("orderbook.1.BTCUSDT", "snapshot"),
                     fixture("bybit", "orderbook1_snapshot_linear_BTCUSDT_2025-09-26_hftbacktest.json")[0])
        assert_shape(by("orderbook.50.BTCUSDT", "delta"),
                     fixture("bybit", "orderbook50_delta_linear_BTCUSDT_2025-09-26_hftbacktest.json")[0])
        snapshot = by("tickers.BTCUSDT", "snapshot")
        assert_shape(snapshot, fixture("bybit", "tickers_linear_docs_example.json")[0])
        delta = by("tickers.BTCUSDT", "delta")
        assert delta["data"]["symbol"] == "BTCUSDT" and set(delta["data"]) < set(snapshot["data"])
        assert_shape(by("allLiquidation.BTCUSDT"), fixture("bybit", "all_liquidation_linear_PIPPINUSDT_2025-02-25_tardis.json")[0])
        rest = {"/v5/market/orderbook?category=linear&symbol=BTCUSDT&limit=5": "orderbook_rest_docs_example.json",
                "/v5/market/open-interest?category=linear&symbol=BTCUSDT&intervalTime=5min&limit=3":
                    "open_interest_rest_docs_example.json",
                "/v5/market/account-ratio?category=linear&symbol=BTCUSDT&period=1h&limit=3":
                    "long_short_ratio_rest_docs_example.json",
                "/v5/market/funding/history?category=linear&symbol=BTCUSDT&limit=3": "funding_history_rest_docs_example.json"}
        for path, name in rest.items():
            assert_shape(await get(http, sim, "/bybit_linear" + path), fixture("bybit", name)[0])
        async with http.ws_connect(ws_url(sim, "/bybit_spot/v5/public/spot")) as ws:
            await ws.send_json({"op": "subscribe", "args": ["publicTrade.BTCUSDT", "orderbook.50.BTCUSDT"]})
            frames = await collect(ws, lambda fs: any(f.get("type") == "delta" for f in fs) and
                                   any(f.get("topic") == "publicTrade.BTCUSDT" for f in fs))
        real = fixture("bybit", "orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl")
        assert_shape(first(frames, lambda f: f.get("type") == "snapshot"), real[0])
        assert_shape(first(frames, lambda f: f.get("type") == "delta"), real[1])
        assert_shape(first(frames, lambda f: f.get("topic") == "publicTrade.BTCUSDT"),
                     fixture("bybit", "public_trade_spot_BTCUSDT_2023-04-21_roq.json")[0])


@pytest.mark.asyncio
async def test_bybit_depth_views_chain_agree_and_match_rest(sim):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(ws_url(sim, "/bybit_linear/v5/public/linear")) as ws:
            await ws.send_json({"op": "subscribe", "args": ["orderbook.200.ETHUSDT", "orderbook.1.ETHUSDT"]})
            frames = [f for f in await collect(ws, lambda fs: len(fs) >= 400) if "topic" in f]
            rest = (await get(http, sim, "/bybit_linear/v5/market/orderbook?category=linear&symbol=ETHUSDT&limit=200"))["result"]
            books = {"orderbook.200.ETHUSDT": LocalBook(), "orderbook.1.ETHUSDT": LocalBook()}
            last = {topic: None for topic in books}
            top_at_seq: dict[int, tuple] = {}

            def apply(msg):
                topic, data = msg["topic"], msg["data"]
                book = books[topic]
                if msg["type"] == "snapshot":
                    assert last[topic] is None
                else:
                    assert data["u"] == last[topic][0] + 1 and data["seq"] >= last[topic][1]
                book.apply(data["b"], data["a"])
                book.assert_uncrossed()
                last[topic] = (data["u"], data["seq"])
                if topic == "orderbook.200.ETHUSDT":
                    top_at_seq[data["seq"]] = book.top(1)
                elif data["seq"] in top_at_seq:   # the level-1 view is the top of the same book
                    assert book.top(1) == top_at_seq[data["seq"]]
            for msg in frames:
                apply(msg)
            while last["orderbook.200.ETHUSDT"][0] < rest["u"]:
                msg = (await collect(ws, lambda fs: len(fs) >= 1))[0]
                apply(msg)
        assert last["orderbook.200.ETHUSDT"][0] == rest["u"]
        assert books["orderbook.200.ETHUSDT"].top(200) == (rest["b"], rest["a"])
