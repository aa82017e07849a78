"""What every exchange feed shares: the Feed interface the collector and `replay` drive, and small
pure helpers (symbol normalization, gap records, top-N book records).

A Feed turns raw exchange text into records. It holds only the state continuity needs (books, last
sequence, ticker state) and does no I/O: the collector (or replay) hands it every WS frame and REST
body, asks it which REST requests it needs (book snapshots) and which frames to send back. Instrument
metadata (`set_instruments`) is optional: without it (replay, or a venue that cannot be reached) the
feed names symbols by the quote-suffix heuristic and leaves contract-size-dependent values null.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qs, urlsplit

import msgspec

from marketprism.book import Book, SyncedBook
from marketprism.records import (FundingRate, Gap, Liquidation, LsrAllAccount, LsrTopPosition, OpenInterest,
                                 OrderBook, Record, Trade, VolatilityIndex)

QUOTES = ("USDT", "USDC", "FDUSD", "TUSD", "BUSD", "USD", "DAI", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "JPY")


class Unparseable(ValueError):
    """A frame that cannot be turned into records; the argument is a short reason for the counter."""


@dataclass(frozen=True)
class Subscription:
    """One WebSocket connection: a path appended to the feed's WS base URL and frames sent after connect."""
    path: str
    messages: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstrumentInfo:
    """What a venue's instrument list says about one instrument (see collector/instruments.py)."""
    instrument: str
    symbol: str  # normalized BASE-QUOTE from the venue's own base/quote fields
    contract_value: str | None = None  # size of one contract (OKX ctVal, Deribit contract_size)
    inverse: bool = False  # contract counted in the quote currency (OKX ctType inverse, Deribit reversed)


@dataclass(frozen=True)
class Poll:
    """A REST request (path with query, appended to the feed's REST base URL) repeated every interval_s."""
    path: str
    interval_s: float


def split_symbol(instrument: str) -> str:
    """BTCUSDT -> BTC-USDT by the longest known quote suffix (used where no instrument list is loaded)."""
    for quote in sorted(QUOTES, key=len, reverse=True):
        if instrument.endswith(quote) and len(instrument) > len(quote):
            return f"{instrument[:-len(quote)]}-{quote}"
    return instrument


def query_params(source: str | None) -> dict[str, str]:
    if not source:
        return {}
    return {k: v[0] for k, v in parse_qs(urlsplit(source).query).items()}


def source_path(source: str | None) -> str:
    return urlsplit(source).path if source else ""


def plain_decimal(value) -> str:
    """A JSON number or string as an exact plain decimal string (no exponent)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise Unparseable("not a number")
    try:
        d = value if isinstance(value, Decimal) else Decimal(str(value))
    except InvalidOperation:
        raise Unparseable("not a number") from None
    text = format(d, "f")
    return text


def multiply(a: str, b: str) -> str:
    """Exact product of two decimal strings."""
    return format(Decimal(a) * Decimal(b), "f")


def as_int(value) -> int:
    if isinstance(value, bool):
        raise Unparseable("not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Unparseable("not an integer") from None


_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# Decimal-string fields per record type. Book levels are not listed: Book.update refuses a message with a
# level that is not a plain decimal, and every feed turns that into an `invalid` gap and a resync.
_DECIMAL_FIELDS = {cls: tuple(f for f in ("price", "quantity", "funding_rate", "mark_price", "index_price",
                                          "open_interest", "open_interest_value", "long_short_ratio",
                                          "long_ratio", "short_ratio", "value") if f in cls.__struct_fields__)
                   for cls in (Trade, FundingRate, OpenInterest, Liquidation, LsrTopPosition, LsrAllAccount,
                               VolatilityIndex, OrderBook, Gap)}


_TWO_DECIMALS = re.compile(r"-?[0-9]+(\.[0-9]+)? -?[0-9]+(\.[0-9]+)?")


def two_decimals(a: str, b: str) -> bool:
    """Both plain decimals: one match over the pair (a space is in neither), the check of most traffic."""
    return _TWO_DECIMALS.fullmatch(f"{a} {b}") is not None


def _decimals_ok(rec: Record) -> bool:
    """The venue's decimal strings are copied as sent; one that is not a plain decimal is a bad frame."""
    if type(rec) is Trade:
        return two_decimals(rec.price, rec.quantity)
    for field in _DECIMAL_FIELDS[type(rec)]:
        value = getattr(rec, field)
        if value is not None and not _DECIMAL.fullmatch(value):
            return False
    return True


class ErrorCounts(Counter):
    """A feed's bad frames per reason. `changes` moves with every update, so that the collector can tell in
    one comparison per frame whether there is anything new to report (summing the counts per frame cost it
    a quarter of a microsecond once any error had ever been counted)."""

    changes = 0

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(key, value)
        self.changes += 1


class Feed:
    """Base of one exchange feed (binance_spot, okx, ...). Subclasses implement `_handle`."""

    name = ""
    exchange = ""
    ping_frame: str | None = None
    ping_interval_s = 0.0
    # Data types whose continuity the feed checks itself and reports as gaps (books by sequence and
    # on_disconnect); the collector records disconnect/stale gaps for every other stream type.
    sequenced: tuple[str, ...] = ("orderbook",)
    max_connection_age_s: float | None = None  # reconnect before the venue's forced disconnect
    sends_per_s: float | None = None  # pace frames sent on one connection (venue limit on incoming messages)
    idle_timeout_s: float | None = None  # seconds without data before a connection is stale (None: settings)

    def __init__(self, depth: int = 400, book_interval_ms: int = 0) -> None:
        self.depth = depth
        self.book_interval_ms = book_interval_ms
        self.errors = ErrorCounts()
        self._requests: list[str] = []
        self._outgoing: list[str] = []
        self._dirty: dict[str, tuple] = {}  # instrument -> (symbol, market_type, book, sequence, ts, received_at)
        self.instrument_info: dict[str, InstrumentInfo] = {}
        # Set by _handle for frames that carry no market data (pongs, acknowledgements, heartbeats): the
        # collector resets it before each frame, and only data frames keep a connection from going stale.
        self.control_frame = False
        # Set by _handle when it has checked the decimal strings of its records itself (the hot paths).
        self.decimals_checked = False

    # -- the interface the collector and replay use ---------------------------------------------------
    def subscriptions(self, symbols: tuple[str, ...], data_types: tuple[str, ...]) -> list[Subscription]:
        return []

    def polls(self, symbols: tuple[str, ...], data_types: tuple[str, ...]) -> list[Poll]:
        return []

    def on_message(self, data: bytes | str, source: str | None, received_at: int) -> list[Record]:
        """Records from one frame or REST body; a bad frame is counted in `errors` and gives []."""
        try:
            self.decimals_checked = False
            recs = self._handle(data, source, received_at)
            if not self.decimals_checked:
                for rec in recs:
                    if not _decimals_ok(rec):
                        raise Unparseable("not a decimal")
            return recs
        except RecursionError:  # msgspec on JSON nested ~1000 deep
            self.errors["nested too deep"] += 1
        except Unparseable as e:
            self.errors[str(e) or "unparseable"] += 1
        except (msgspec.ValidationError, KeyError, TypeError, IndexError, AttributeError, InvalidOperation,
                ArithmeticError):  # ValidationError first: it is a subclass of DecodeError
            self.errors["unexpected shape"] += 1
        except (msgspec.DecodeError, UnicodeDecodeError):
            self.errors["invalid json"] += 1
        except ValueError:
            self.errors["unexpected shape"] += 1
        return []

    def on_disconnect(self, at_ms: int) -> list[Record]:
        """Gap records for every stream that loses continuity when the connection drops."""
        return []

    def set_instruments(self, infos: dict[str, InstrumentInfo]) -> None:
        """Replace the instrument metadata (the collector loads and refreshes it)."""
        self.instrument_info = dict(infos)
        cache = getattr(self, "_name_cache", None)
        if cache is not None:
            cache.clear()  # a feed's cached (symbol, market_type) names may have been guessed without the list

    def pair(self, instrument: str) -> str:
        """BASE-QUOTE of an exchange symbol: from the instrument list when loaded, else by its suffix."""
        info = self.instrument_info.get(instrument)
        return info.symbol if info is not None else split_symbol(instrument)

    def take_requests(self) -> list[str]:
        """REST paths (with query) the feed needs fetched now, e.g. book snapshots for a resync."""
        out, self._requests = self._requests, []
        return out

    def take_outgoing(self) -> list[str]:
        """Frames to send on the connection that delivered the last message (heartbeat answers)."""
        out, self._outgoing = self._outgoing, []
        return out

    def flush_books(self) -> list[Record]:
        """Books changed since the last flush (the collector calls this every book_interval_ms)."""
        out = [self._book_record(*entry) for entry in self._dirty.values()]
        self._dirty.clear()
        return out

    # -- for subclasses -------------------------------------------------------------------------------
    def _handle(self, data: bytes | str, source: str | None, received_at: int) -> list[Record]:
        raise NotImplementedError

    def _book_changed(self, out: list[Record], instrument: str, symbol: str, market_type: str, book: Book,
                      sequence: int, timestamp: int, received_at: int) -> None:
        """Emit the top-N book now (replay, interval 0) or mark it for the next flush."""
        if self.book_interval_ms <= 0:
            out.append(self._book_record(instrument, symbol, market_type, book, sequence, timestamp, received_at))
        else:
            self._dirty[instrument] = (instrument, symbol, market_type, book, sequence, timestamp, received_at)

    def _book_record(self, instrument, symbol, market_type, book, sequence, timestamp, received_at) -> OrderBook:
        bids, asks = book.top(self.depth)
        return OrderBook(exchange=self.exchange, market_type=market_type, symbol=symbol, instrument=instrument,
                         timestamp=timestamp, received_at=received_at, sequence=sequence, bids=bids, asks=asks)

    def _break_book(self, out: list[Record], state: SyncedBook, key: str, instrument: str, symbol: str,
                    market_type: str, reason: str, from_sequence: int | None, to_sequence: int | None, ts: int,
                    received_at: int) -> None:
        """A SyncedBook lost continuity (a sequence break, a refused level, a bad checksum): a gap from its
        last data, silence until a new snapshot, and one resubscription for it (`key`: what the feed's
        `_resubscribe` takes). A refused snapshot gets its resubscription too."""
        out.append(self._gap(instrument, symbol, market_type, "orderbook", reason, state.last_time or ts, ts,
                             received_at, from_sequence, to_sequence))
        state.reset()
        state.resubscribing = False
        self._resubscribe(key, state)

    def _resubscribe(self, key: str, state: SyncedBook) -> None:
        raise NotImplementedError  # feeds that keep SyncedBooks: ask the venue for a new snapshot

    def _gap(self, instrument: str, symbol: str, market_type: str, stream_type: str, reason: str,
             started_at: int, ended_at: int, received_at: int, from_sequence: int | None = None,
             to_sequence: int | None = None) -> Gap:
        if stream_type == "orderbook":
            self._dirty.pop(instrument, None)  # a broken book must not be flushed after its gap
        return Gap(exchange=self.exchange, market_type=market_type, symbol=symbol, instrument=instrument,
                   timestamp=ended_at, received_at=received_at, stream_type=stream_type, reason=reason,
                   from_sequence=from_sequence, to_sequence=to_sequence, started_at=started_at, ended_at=ended_at)
