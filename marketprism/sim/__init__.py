"""Local exchange simulator: one aiohttp server speaking each venue's real public protocol.

Every feed lives under a path prefix equal to its name, with the venue's real paths below it, so a
collector pointed at ``ws://HOST:PORT/binance_spot`` / ``http://HOST:PORT/binance_spot`` cannot tell
it from the exchange:

  binance_spot   WS /stream?streams=..., /ws/<stream>        REST /api/v3/depth, exchangeInfo, time
  binance_usdm   WS /stream?streams=..., /ws/<stream>        REST /fapi/v1/depth, openInterest, premiumIndex,
                                                             fundingRate, exchangeInfo, time,
                                                             /futures/data/{topLongShortPositionRatio,
                                                             topLongShortAccountRatio, globalLongShortAccountRatio}
  okx            WS /ws/v5/public                            REST /api/v5/market/books, public/{instruments,
                                                             open-interest, funding-rate, time}, rubik/stat/...
  deribit        WS /ws/api/v2 (JSON-RPC)                    REST /api/v2/public/{get_order_book, get_instruments,
                                                             get_time, ticker, test, hello} (also over WS)
  bybit_spot     WS /v5/public/spot                          REST /v5/market/{orderbook, instruments-info, time}
  bybit_linear   WS /v5/public/linear                        REST /v5/market/{orderbook, instruments-info, tickers,
                                                             open-interest, account-ratio, funding/history, time}

Control: ``GET /_sim/stats`` returns ``{"uptime_s", "sent": {feed: {data_type: n}}, "feeds": {feed:
{"sent", "served", "frames", "connections", "rest_requests", "faults"}}}``. ``sent`` counts records
delivered to at least one socket (trades per trade, book messages per message, a Deribit ticker or a
Bybit tickers message once per data type it carries); ``served`` counts what REST answered.

Faults, per feed, from ``--faults FILE`` (a JSON list) or ``POST /_sim/faults`` (an object or a list)
or ``Simulator.inject()``. Every fault has ``type``, optional ``feed`` (a feed name, default ``"*"`` =
every feed) and optional ``at`` (seconds from now, or from start for --faults; default 0)::

  {"type": "drop", "feed": "okx", "mode": "close"}          close every WS of the feed (code 1001);
                                                            mode "abort" resets the TCP connections
  {"type": "skip_sequence", "feed": "binance_spot", "symbol": "BTCUSDT", "count": 1}
                                                            the next `count` book messages of that
                                                            instrument (venue id or BASE-QUOTE; any
                                                            if absent) are generated but not sent,
                                                            so the next one breaks the chain
  {"type": "malformed", "feed": "bybit_spot", "count": 1}    send `count` non-JSON text frames now
  {"type": "truncated", "feed": "deribit", "data_type": "orderbook", "count": 1}
                                                            the next matching frame (any data type if
                                                            absent) is sent cut in half, its data lost
  {"type": "stale", "feed": "okx", "seconds": 5}            send no market data for N seconds; sockets
                                                            stay open and still answer ping/subscribe
  {"type": "rest_status", "feed": "binance_usdm", "status": 429, "count": 3, "retry_after": 2,
   "path": "/fapi/v1/depth"}                                answer the next N REST requests (matching
                                                            `path` if given) with that status, the
                                                            venue's error body and Retry-After
  {"type": "rest_delay", "feed": "okx", "seconds": 2, "count": 1, "path": "/api/v5/market/books"}
                                                            answer the next N REST requests late
"""

from __future__ import annotations

import argparse
import asyncio
import json

from loguru import logger as log

from marketprism.sim.feed import Options
from marketprism.sim.server import FEEDS, Simulator

__all__ = ["FEEDS", "Options", "Simulator", "add_arguments", "serve", "start"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind, 0 = any free port (default 8090)")
    parser.add_argument("--feeds", default=",".join(FEEDS), help="comma list of feeds (default: all six)")
    parser.add_argument("--symbols", default="BTC-USDT,ETH-USDT", help="comma list of BASE-QUOTE symbols")
    parser.add_argument("--rate", type=float, default=10.0, help="trade+depth messages per second per symbol")
    parser.add_argument("--speed", type=float, default=1.0, help="speed-up of slow cadences (funding, ratios...)")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--faults", default=None, help="JSON file with a list of faults to apply")
    parser.add_argument("--checksum", choices=("real", "zero"), default="real",
                        help="OKX books checksum: real CRC32, or 0 as OKX sends since 2026")


def make_options(**options) -> Options:
    """Options from keyword arguments (comma strings or sequences), validated; ValueError if bad."""
    feeds = _split(options.pop("feeds", None)) or tuple(FEEDS)
    symbols = _split(options.pop("symbols", None)) or Options.symbols
    unknown = [f for f in feeds if f not in FEEDS]
    if unknown:
        raise ValueError(f"unknown feed {unknown[0]!r}; feeds are {', '.join(FEEDS)}")
    bad = [s for s in symbols if len(s.split("-")) != 2 or not all(s.split("-"))]
    if bad:
        raise ValueError(f"symbol {bad[0]!r} is not BASE-QUOTE (e.g. BTC-USDT)")
    opts = Options(feeds=feeds, symbols=tuple(s.upper() for s in symbols), **options)
    if opts.rate <= 0 or opts.speed <= 0:
        raise ValueError("--rate and --speed must be positive")
    if opts.checksum not in ("real", "zero"):
        raise ValueError("--checksum must be 'real' or 'zero'")
    return opts


def _split(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() for v in value if v.strip())


async def start(**options) -> Simulator:
    """Start a simulator in this event loop. Options: host, port (0 = free port), feeds, symbols,
    rate, speed, seed, checksum, faults (a list of fault objects or a path to a JSON file)."""
    faults = options.pop("faults", None)
    if isinstance(faults, str):
        with open(faults, encoding="utf-8") as fh:
            faults = json.load(fh)
    options.setdefault("port", 0)
    return await Simulator(make_options(**options), faults).start()


async def serve(args: argparse.Namespace) -> None:
    """Run the simulator from parsed CLI arguments until cancelled. Bad options, an unreadable fault
    file or a port in use end it with a one-line message and exit status 1."""
    try:
        sim = await start(host=args.host, port=args.port, feeds=args.feeds, symbols=args.symbols, rate=args.rate,
                          speed=args.speed, seed=args.seed, checksum=args.checksum, faults=args.faults)
    except (ValueError, OSError) as exc:   # JSON errors are ValueErrors; a busy port is an OSError
        raise SystemExit(f"marketprism simulate: {exc}") from None
    log.info("simulator listening on {} (feeds: {})", sim.url, ", ".join(sim.feeds))
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
