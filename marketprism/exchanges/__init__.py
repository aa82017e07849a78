"""The feeds: one Feed class per (exchange, API) pair, looked up by the names of DESIGN.md §4."""

from __future__ import annotations

from importlib import import_module

from marketprism.exchanges.base import Feed

FEED_CLASSES = {
    "binance_spot": "marketprism.exchanges.binance:BinanceSpotFeed",
    "binance_usdm": "marketprism.exchanges.binance:BinanceUsdmFeed",
    "okx": "marketprism.exchanges.okx:OkxFeed",
    "deribit": "marketprism.exchanges.deribit:DeribitFeed",
    "bybit_spot": "marketprism.exchanges.bybit:BybitSpotFeed",
    "bybit_linear": "marketprism.exchanges.bybit:BybitLinearFeed",
}


def make_feed(name: str, depth: int = 400, book_interval_ms: int = 0) -> Feed:
    if name not in FEED_CLASSES:
        raise ValueError(f"unknown feed {name!r}; expected one of {', '.join(FEED_CLASSES)}")
    module, cls = FEED_CLASSES[name].split(":")
    return getattr(import_module(module), cls)(depth=depth, book_interval_ms=book_interval_ms)
