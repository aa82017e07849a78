"""Shared helpers for the simulator tests (no tests here): real exchange fixtures, shape comparison,
WebSocket collection and a client-side order book."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from marketprism.sim import start

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_DIRS = (ROOT / "tests" / "fixtures", ROOT.parent / "shared" / "fixtures" / "exchanges")


def fixture(venue: str, name: str) -> list:
    """The messages of a real fixture file (one per line)."""
    for base in FIXTURE_DIRS:
        path = base / venue / name
        if path.exists():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pytest.skip(f"fixture {venue}/{name} not found in {', '.join(map(str, FIXTURE_DIRS))}")


def assert_shape(ours: object, real: object, path: str = "$", extra_ok: frozenset = frozenset(),
                 any_number: bool = False) -> None:
    """Same keys and the same JSON value types (str vs int vs float vs bool vs null) as the real one.
    any_number lets int and float stand for each other (for documentation examples whose numbers
    are typed differently from the live recordings)."""
    if isinstance(real, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__} instead of object"
        missing, extra = set(real) - set(ours), set(ours) - set(real) - extra_ok
        assert not missing and not extra, f"{path}: missing {sorted(missing)}, extra {sorted(extra)}"
        for key in real:
            assert_shape(ours[key], real[key], f"{path}.{key}", extra_ok, any_number)
    elif isinstance(real, list):
        assert isinstance(ours, list), f"{path}: {type(ours).__name__} instead of array"
        if not real or not ours:
            return
        scalars = all(not isinstance(x, (dict, list)) for x in real)
        if scalars and len({type(x) for x in real}) > 1:
            # A tuple-like array (Deribit ["new", price, amount]): compare position by position.
            assert len(ours) == len(real), f"{path}: length {len(ours)} != {len(real)}"
            for i, (a, b) in enumerate(zip(ours, real)):
                assert_shape(a, b, f"{path}[{i}]", extra_ok, any_number)
        else:
            for i, item in enumerate(ours):
                assert_shape(item, real[0], f"{path}[{i}]", extra_ok, any_number)
    elif any_number and type(real) in (int, float) and type(ours) in (int, float):
        return
    else:
        assert type(ours) is type(real), f"{path}: {type(ours).__name__} {ours!r} vs {type(real).__name__} {real!r}"


async def collect(ws: aiohttp.ClientWebSocketResponse, want, limit: int = 100000, timeout: float = 8.0) -> list:
    """Read JSON frames until want(frames) is true (or fail after timeout)."""
    frames: list = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not want(frames):
        remaining = deadline - loop.time()
        assert remaining > 0, f"timed out after {len(frames)} frames; last: {frames[-3:]}"
        msg = await asyncio.wait_for(ws.receive(), remaining)
        assert msg.type == aiohttp.WSMsgType.TEXT, f"unexpected {msg.type}: {msg.data!r}"
        frames.append(json.loads(msg.data) if msg.data != "pong" else "pong")
        assert len(frames) <= limit
    return frames


def first(frames: list, pred):
    for frame in frames:
        if pred(frame):
            return frame
    raise AssertionError("no matching frame")


class LocalBook:
    """A client-side book keyed by decimal price strings; sizes compared as exact decimal strings."""

    def __init__(self, bids=(), asks=()):
        self.bids: dict[str, str] = {}
        self.asks: dict[str, str] = {}
        self.apply(bids, asks)

    def apply(self, bids, asks) -> None:
        for side, rows in ((self.bids, bids), (self.asks, asks)):
            for row in rows:
                price, size = row[0], row[1]
                if float(size) == 0:
                    side.pop(price, None)
                else:
                    side[price] = size

    def top(self, n: int):
        bids = sorted(self.bids.items(), key=lambda kv: -float(kv[0]))[:n]
        asks = sorted(self.asks.items(), key=lambda kv: float(kv[0]))[:n]
        return [list(x) for x in bids], [list(x) for x in asks]

    def assert_uncrossed(self) -> None:
        if self.bids and self.asks:
            best_bid, best_ask = max(map(float, self.bids)), min(map(float, self.asks))
            assert best_bid < best_ask, f"crossed book: bid {best_bid} >= ask {best_ask}"


@pytest_asyncio.fixture
async def sim():
    """A simulator on a free port, fast enough for chains of hundreds of messages in a second."""
    simulator = await start(port=0, rate=500, speed=50, seed=7)
    yield simulator
    await simulator.stop()


def ws_url(sim, path: str) -> str:
    return sim.url.replace("http://", "ws://") + path


async def get(http: aiohttp.ClientSession, sim, path: str):
    async with http.get(sim.url + path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()
