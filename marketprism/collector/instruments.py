"""Instrument metadata: each venue's instrument list, loaded at start and refreshed hourly.

Feeds use it for exact symbols (the venue's own base and quote instead of the quote-suffix guess) and
for values that need the contract size (OKX open interest in contracts -> quote value). The lists:

  binance_spot  GET /api/v3/exchangeInfo?symbol=S      symbols[]: symbol, baseAsset, quoteAsset
  binance_usdm  GET /fapi/v1/exchangeInfo              the same fields; USDⓈ-M quantities are in the base
                                                       asset, so no contract size is needed
  okx           GET /api/v5/public/instruments?instType=T&instId=I
                                                       data[]: instId, baseCcy/quoteCcy (spot), instFamily
                                                       (swap), ctVal, ctType (linear: ctVal in the base
                                                       coin, inverse: in USD)
  deribit       GET /api/v2/public/get_instruments?currency=any&kind=future
                                                       result[]: instrument_name, contract_size,
                                                       instrument_type (linear / reversed)
  bybit_*       GET /v5/market/instruments-info?category=C&symbol=S
                                                       result.list[]: symbol, baseCoin, quoteCoin

The parse functions are pure (body -> InstrumentInfo by instrument). Without metadata - `replay`, a
venue that is blocked or down - feeds fall back to their naming rules and leave a value that needs a
contract size null; loading never blocks collection for longer than the connect timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from decimal import Decimal
from urllib.parse import quote

import msgspec
from loguru import logger

from marketprism.exchanges import deribit as deribit_ex
from marketprism.exchanges import okx as okx_ex
from marketprism.exchanges.base import Feed, InstrumentInfo, plain_decimal

REFRESH_S = 3600.0


class BinanceSymbol(msgspec.Struct):
    symbol: str
    baseAsset: str
    quoteAsset: str


class BinanceInfo(msgspec.Struct):
    symbols: list[BinanceSymbol]


class OkxInstrument(msgspec.Struct):
    instId: str
    instType: str
    baseCcy: str = ""
    quoteCcy: str = ""
    instFamily: str = ""
    uly: str = ""
    ctVal: str = ""
    ctType: str = ""


class OkxInstruments(msgspec.Struct):
    code: str
    data: list[OkxInstrument]


class DeribitInstrument(msgspec.Struct):
    instrument_name: str
    contract_size: Decimal | None = None
    instrument_type: str | None = None


class DeribitInstruments(msgspec.Struct):
    result: list[DeribitInstrument]


class BybitInstrument(msgspec.Struct):
    symbol: str
    baseCoin: str
    quoteCoin: str


class BybitResult(msgspec.Struct):
    rows: list[BybitInstrument] = msgspec.field(name="list")


class BybitInstruments(msgspec.Struct):
    retCode: int
    result: BybitResult


_binance = msgspec.json.Decoder(BinanceInfo)
_okx = msgspec.json.Decoder(OkxInstruments)
_deribit = msgspec.json.Decoder(DeribitInstruments)
_bybit = msgspec.json.Decoder(BybitInstruments)


def parse_binance(body: bytes) -> dict[str, InstrumentInfo]:
    return {s.symbol: InstrumentInfo(s.symbol, f"{s.baseAsset}-{s.quoteAsset}") for s in _binance.decode(body).symbols}


def parse_okx(body: bytes) -> dict[str, InstrumentInfo]:
    doc = _okx.decode(body)
    if doc.code != "0":
        raise ValueError(f"OKX error code {doc.code}")
    out = {}
    for row in doc.data:
        # The instId already spells the pair (BTC-USDT, BTC-USDT-SWAP); the list adds the contract size.
        symbol = f"{row.baseCcy}-{row.quoteCcy}" if row.baseCcy and row.quoteCcy else okx_ex.names(row.instId)[0]
        out[row.instId] = InstrumentInfo(row.instId, symbol, row.ctVal or None, row.ctType == "inverse")
    return out


def parse_deribit(body: bytes) -> dict[str, InstrumentInfo]:
    out = {}
    for row in _deribit.decode(body).result:
        size = plain_decimal(row.contract_size) if row.contract_size is not None else None
        out[row.instrument_name] = InstrumentInfo(row.instrument_name, deribit_ex.names(row.instrument_name)[0], size,
                                                  row.instrument_type == "reversed")
    return out


def parse_bybit(body: bytes) -> dict[str, InstrumentInfo]:
    doc = _bybit.decode(body)
    if doc.retCode != 0:
        raise ValueError(f"Bybit retCode {doc.retCode}")
    return {r.symbol: InstrumentInfo(r.symbol, f"{r.baseCoin}-{r.quoteCoin}") for r in doc.result.rows}


PARSERS: dict[str, Callable[[bytes], dict[str, InstrumentInfo]]] = {
    "binance_spot": parse_binance, "binance_usdm": parse_binance, "okx": parse_okx, "deribit": parse_deribit,
    "bybit_spot": parse_bybit, "bybit_linear": parse_bybit,
}


def paths(feed: Feed, symbols: tuple[str, ...]) -> list[str]:
    """The REST requests that list the feed's instruments (one per symbol where the venue filters)."""
    name = feed.name
    if name == "binance_spot":
        return [f"/api/v3/exchangeInfo?symbol={feed.instrument(s)}" for s in symbols]
    if name == "binance_usdm":
        return ["/fapi/v1/exchangeInfo"]  # no symbol filter on USDⓈ-M
    if name == "okx":
        types = {"spot": "SPOT", "perpetual": "SWAP", "futures": "FUTURES"}
        return [f"/api/v5/public/instruments?instType={types[mt]}&instId={quote(inst)}"
                for s in symbols for inst, mt in okx_ex.instruments(s) if mt in types]
    if name == "deribit":
        return ["/api/v2/public/get_instruments?currency=any&kind=future"]
    category = "spot" if name == "bybit_spot" else "linear"
    return [f"/v5/market/instruments-info?category={category}&symbol={feed.instrument(s)}" for s in symbols]


async def load(feed: Feed, symbols: tuple[str, ...], get: Callable[[Feed, str], Awaitable[bytes | None]]) -> bool:
    """Fetch and parse the feed's instrument lists and hand them to the feed; False if none arrived."""
    found: dict[str, InstrumentInfo] = {}
    wanted = paths(feed, symbols)
    for path, body in zip(wanted, await asyncio.gather(*(get(feed, p) for p in wanted))):  # the budget paces them
        if body is None:
            continue
        try:
            found.update(PARSERS[feed.name](body))
        except (msgspec.DecodeError, ValueError) as e:
            logger.warning("{}: instrument list {} unreadable: {}", feed.name, path, e)
    if found:
        feed.set_instruments({**feed.instrument_info, **found})
        logger.info("{}: instrument metadata for {} instruments", feed.name, len(found))
    return bool(found)


async def keep_fresh(feed: Feed, symbols: tuple[str, ...], get, sleep, stopping: asyncio.Event) -> None:
    """Reload the metadata every REFRESH_S until the collector stops (the first load ran at start)."""
    while True:
        await sleep(REFRESH_S)
        if stopping.is_set():
            return
        try:
            await asyncio.wait_for(load(feed, symbols, get), REFRESH_S / 2)
        except asyncio.TimeoutError:
            logger.warning("{}: instrument refresh timed out; keeping the previous list", feed.name)
