"""The vocabulary: one record struct per data type, its subject, table, stream and dedup key.

Decimal values are strings holding exactly what the exchange sent; times are integer milliseconds (UTC).
"""

from __future__ import annotations

from operator import attrgetter

import msgspec

DATA_TYPES = ("trade", "orderbook", "funding_rate", "open_interest", "liquidation",
             "lsr_top_position", "lsr_all_account", "volatility_index", "gap")
EXCHANGES = ("binance", "okx", "deribit", "bybit")
MARKET_TYPES = ("spot", "perpetual", "futures", "options")
SIDES = ("buy", "sell")

Level = tuple[str, str]


# gc=False: records hold only strings, numbers and lists of string pairs, so they can never be part of a
# reference cycle; untracked, the millions made per minute do not drive the cyclic collector.
class Record(msgspec.Struct, tag_field="data_type", kw_only=True, frozen=True, gc=False):
    exchange: str
    market_type: str
    symbol: str
    instrument: str
    timestamp: int
    received_at: int


class Trade(Record, tag="trade", frozen=True):
    trade_id: str
    price: str
    quantity: str
    side: str


class OrderBook(Record, tag="orderbook", frozen=True):
    sequence: int
    bids: list[Level]
    asks: list[Level]


class FundingRate(Record, tag="funding_rate", frozen=True):
    funding_rate: str
    funding_time: int
    mark_price: str | None = None
    index_price: str | None = None


class OpenInterest(Record, tag="open_interest", frozen=True):
    open_interest: str
    open_interest_value: str | None = None


class Liquidation(Record, tag="liquidation", frozen=True):
    side: str
    price: str
    quantity: str


class LsrTopPosition(Record, tag="lsr_top_position", frozen=True):
    period: str
    long_short_ratio: str
    long_ratio: str | None = None
    short_ratio: str | None = None


class LsrAllAccount(Record, tag="lsr_all_account", frozen=True):
    period: str
    long_short_ratio: str
    long_ratio: str | None = None
    short_ratio: str | None = None


class VolatilityIndex(Record, tag="volatility_index", frozen=True):
    value: str


class Gap(Record, tag="gap", frozen=True, kw_only=True):
    stream_type: str
    reason: str
    from_sequence: int | None = None
    to_sequence: int | None = None
    started_at: int
    ended_at: int


AnyRecord = (Trade | OrderBook | FundingRate | OpenInterest | Liquidation | LsrTopPosition
             | LsrAllAccount | VolatilityIndex | Gap)

RECORD_FOR: dict[str, type[Record]] = {
    "trade": Trade, "orderbook": OrderBook, "funding_rate": FundingRate, "open_interest": OpenInterest,
    "liquidation": Liquidation, "lsr_top_position": LsrTopPosition, "lsr_all_account": LsrAllAccount,
    "volatility_index": VolatilityIndex, "gap": Gap,
}
TABLE_FOR: dict[str, str] = {
    "trade": "trades", "orderbook": "orderbooks", "funding_rate": "funding_rates",
    "open_interest": "open_interests", "liquidation": "liquidations", "lsr_top_position": "lsr_top_positions",
    "lsr_all_account": "lsr_all_accounts", "volatility_index": "volatility_indices", "gap": "gaps",
}
STREAM_FOR: dict[str, str] = {dt: ("ORDERBOOK_SNAP" if dt == "orderbook" else "MARKET_DATA") for dt in TABLE_FOR}
# The field that, with exchange/market_type/symbol, identifies a record; gaps add stream_type so that
# two streams losing continuity in the same millisecond stay two rows.
KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "trade": ("trade_id",), "orderbook": ("sequence",), "funding_rate": ("timestamp",),
    "open_interest": ("timestamp",), "liquidation": ("timestamp",),
    "lsr_top_position": ("timestamp", "period"), "lsr_all_account": ("timestamp", "period"),
    "volatility_index": ("timestamp",), "gap": ("timestamp", "stream_type"),
}
TIME_FIELDS = ("timestamp", "received_at", "funding_time", "started_at", "ended_at")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyRecord)


def data_type(record: Record) -> str:
    return record.__struct_config__.tag  # type: ignore[return-value]


def subject(record: Record) -> str:
    return f"{data_type(record)}.{record.exchange}.{record.market_type}.{record.symbol}"


def _key_function(dt: str):
    getters = [attrgetter(f) for f in KEY_FIELDS[dt]]

    def key(record: Record) -> str:
        return ":".join([dt, record.exchange, record.market_type, record.symbol, *[str(g(record)) for g in getters]])
    return key


# Trades are most of the traffic: their key is built without the generic field loop.
_KEY_FOR = {RECORD_FOR[dt]: _key_function(dt) for dt in KEY_FIELDS}
_KEY_FOR[Trade] = lambda r: f"trade:{r.exchange}:{r.market_type}:{r.symbol}:{r.trade_id}"


def dedup_key(record: Record) -> str:
    """The JetStream Nats-Msg-Id; the same fields form the ClickHouse sorting key."""
    return _KEY_FOR[type(record)](record)


def encode(record: Record) -> bytes:
    return _encoder.encode(record)


def decode(payload: bytes) -> Record:
    """Validate one payload against the vocabulary; raises msgspec.ValidationError/DecodeError."""
    return _decoder.decode(payload)


def to_dict(record: Record) -> dict:
    return msgspec.to_builtins(record)


def record_fields(dt: str) -> list[str]:
    """Field names of a data type as they appear in the JSON record (data_type first)."""
    return ["data_type", *RECORD_FOR[dt].__struct_fields__]
