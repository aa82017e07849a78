"""Binance wire formats (spot and USDⓈ-M): msgspec structs of every WS event and REST body the feed reads,
and their decoders. gc=False on the hot-path structs: they hold no reference cycles, and skipping the GC
bookkeeping is measurably cheaper per frame."""

from __future__ import annotations

import msgspec

class WsTrade(msgspec.Struct, tag_field="e", tag="trade", gc=False):
    E: int
    s: str
    t: int
    p: str
    q: str
    T: int
    m: bool


class WsAggTrade(msgspec.Struct, tag_field="e", tag="aggTrade", gc=False):
    E: int
    s: str
    a: int
    p: str
    q: str
    T: int
    m: bool


class WsDepth(msgspec.Struct, tag_field="e", tag="depthUpdate", gc=False):
    E: int
    s: str
    U: int
    u: int
    b: msgspec.Raw  # the level arrays as sent: binance.depth_diff checks their bytes, then decodes them
    a: msgspec.Raw
    pu: int | None = None


class DepthDiff(msgspec.Struct, gc=False):
    """A WsDepth with its levels decoded; plain: every level string is known to be a plain decimal."""
    s: str
    E: int
    U: int
    u: int
    pu: int | None
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]
    plain: bool


class WsMarkPrice(msgspec.Struct, tag_field="e", tag="markPriceUpdate", gc=False):
    E: int
    s: str
    p: str
    r: str
    T: int
    i: str | None = None


class ForceOrderBody(msgspec.Struct, gc=False):
    s: str
    S: str
    q: str
    p: str
    T: int


class WsForceOrder(msgspec.Struct, tag_field="e", tag="forceOrder", gc=False):
    E: int
    o: ForceOrderBody


Event = WsTrade | WsAggTrade | WsDepth | WsMarkPrice | WsForceOrder


class Envelope(msgspec.Struct, gc=False):
    """A combined-stream frame, decoded with its event in one pass (the stream name is not needed)."""
    data: Event | list[WsMarkPrice]


class DepthSnapshot(msgspec.Struct):
    lastUpdateId: int
    bids: list[tuple[str, str]]
    asks: list[tuple[str, str]]
    E: int | None = None
    T: int | None = None


class OpenInterestBody(msgspec.Struct):
    symbol: str
    openInterest: str
    time: int


class PremiumIndex(msgspec.Struct):
    symbol: str
    markPrice: str
    indexPrice: str
    lastFundingRate: str
    nextFundingTime: int
    time: int


class RatioRow(msgspec.Struct):
    symbol: str
    longShortRatio: str
    longAccount: str
    shortAccount: str
    timestamp: int


COMBINED = (b'{"stream":', '{"stream":')  # aiohttp hands text frames over as str, replay as bytes
ENVELOPE = msgspec.json.Decoder(Envelope)
EVENT = msgspec.json.Decoder(Event | list[WsMarkPrice])
SNAPSHOT = msgspec.json.Decoder(DepthSnapshot)
OPEN_INTEREST = msgspec.json.Decoder(OpenInterestBody)
PREMIUM = msgspec.json.Decoder(PremiumIndex)
RATIOS = msgspec.json.Decoder(list[RatioRow])
ANY = msgspec.json.Decoder()
LEVELS = msgspec.json.Decoder(list[tuple[str, str]])
# The bytes of a level array made of these alone hold only plain decimal strings: no escape, no space, no
# sign or exponent can be in it. One C-level scan of the raw array instead of a check per string.
PLAIN_LEVEL_BYTES = b'0123456789.[]",'
