"""Binance spot and USDⓈ-M futures: pure parsers and the diff-depth book sync (wire structs: binance_wire.py).

Trades use the raw `@trade` stream (one record per exchange trade with Binance's own trade id, so a
missing id is a detectable gap); `@aggTrade` frames are parsed too (trade_id = aggregate id) for
recordings and the benchmark. Books: REST snapshot + buffered `@depth@100ms` diffs with the documented
U/u (spot) and pu (USDⓈ-M) rules.
"""

from __future__ import annotations

from collections import deque

from marketprism.book import Book
from marketprism.exchanges.base import (Feed, Poll, Subscription, Unparseable, multiply, query_params,
                                        source_path, two_decimals)
from marketprism.exchanges.binance_wire import (ANY, COMBINED, DepthDiff, DepthSnapshot, ENVELOPE, EVENT, LEVELS,
                                                OPEN_INTEREST, OpenInterestBody, PLAIN_LEVEL_BYTES, PREMIUM,
                                                PremiumIndex, RATIOS, RatioRow, SNAPSHOT, WsAggTrade, WsDepth,
                                                WsForceOrder, WsMarkPrice, WsTrade)
from marketprism.records import (FundingRate, Liquidation, LsrAllAccount, LsrTopPosition, OpenInterest, Record,
                                 Trade)

# Diffs held while a snapshot is fetched; past it the oldest is dropped (a gap follows only if the snapshot
# is older than every diff held). 300 = 30 s of @depth@100ms, far more than a snapshot's round trip; with
# many symbols queued behind the REST weight limit, this bound is what caps the collector's start-up memory
# (and Python keeps the high-water mark: the buffers' memory is reused, not returned).
BUFFER_LIMIT = 300
RATIO_PERIOD = "5m"


def depth_diff(ev: WsDepth) -> DepthDiff:
    """Decode a diff's levels, and check as raw bytes whether each of them is a plain decimal (when not,
    Book.update checks every string and refuses the message if one is not)."""
    b, a = bytes(ev.b), bytes(ev.a)
    return DepthDiff(ev.s, ev.E, ev.U, ev.u, ev.pu, LEVELS.decode(b), LEVELS.decode(a),
                     not (b.translate(None, PLAIN_LEVEL_BYTES) or a.translate(None, PLAIN_LEVEL_BYTES)))


class DepthSync:
    """One symbol's book: waits for a snapshot, buffers diffs meanwhile, applies them in chain."""
    __slots__ = ("book", "snapshot_id", "last_u", "live", "buffer", "last_time", "requested")

    def __init__(self) -> None:
        self.book = Book()
        self.snapshot_id: int | None = None
        self.last_u = 0
        self.live = False
        self.buffer: deque[DepthDiff] = deque(maxlen=BUFFER_LIMIT)
        self.last_time = 0
        self.requested = False

    def reset(self) -> None:
        self.book.clear()
        self.snapshot_id = None
        self.live = False
        self.requested = False


class BinanceFeed(Feed):
    exchange = "binance"
    market_type = "spot"
    futures = False
    depth_path = "/api/v3/depth"
    max_connection_age_s = 23 * 3600  # "A single connection ... is only valid for 24 hours": leave first
    sends_per_s = 4.0  # spot allows 5 incoming messages/s (PING, PONG, SUBSCRIBE...) per connection, USDⓈ-M 10

    def __init__(self, depth: int = 400, book_interval_ms: int = 0) -> None:
        super().__init__(depth, book_interval_ms)
        self.books: dict[str, DepthSync] = {}
        self.last_trade: dict[str, int] = {}
        self.trade_time: dict[str, int] = {}
        self.mark: dict[str, str] = {}
        self.last_bucket: dict[tuple[str, str, str], int] = {}
        self._unassigned: DepthSnapshot | None = None
        self._name_cache: dict[str, tuple[str, str]] = {}  # instrument -> (symbol, market_type)

    # -- plan --------------------------------------------------------------------------------------
    def instrument(self, symbol: str) -> str:
        return symbol.replace("-", "")

    def subscriptions(self, symbols, data_types):
        names = []
        for symbol in symbols:
            low = self.instrument(symbol).lower()
            if "trade" in data_types:
                names.append(f"{low}@trade")
            if "orderbook" in data_types:
                names.append(f"{low}@depth@100ms")
            names.extend(self._extra_streams(low, data_types))
        # Binance allows 1024 streams per connection; stay well below and shard the rest.
        return [Subscription(f"/stream?streams={'/'.join(names[i:i + 200])}") for i in range(0, len(names), 200)]

    def _extra_streams(self, low: str, data_types) -> list[str]:
        return []

    def snapshot_path(self, instrument: str) -> str:
        return f"{self.depth_path}?symbol={instrument}&limit=1000"

    # -- parse -------------------------------------------------------------------------------------
    def _handle(self, data, source, received_at):
        if data[:10] in COMBINED:  # a combined-stream frame, the hot path (no REST body starts so)
            return self._events(ENVELOPE.decode(data).data, received_at)
        if source and not source.startswith("ws"):
            return self._rest(data, source, received_at)
        obj = ANY.decode(data)
        if isinstance(obj, dict) and "e" in obj:
            return self._events(EVENT.decode(data), received_at)
        if isinstance(obj, dict) and "result" in obj and "id" in obj:
            return []  # subscribe acknowledgement
        return self._bare_rest(obj, data, received_at)

    def _events(self, event, received_at: int) -> list[Record]:
        kind = type(event)
        if kind is WsAggTrade:  # the busiest streams first, without the general loop
            if not two_decimals(event.p, event.q):
                raise Unparseable("not a decimal")
            self.decimals_checked = True
            symbol, market_type = self._name_cache.get(event.s) or self._names(event.s)
            return [Trade(exchange="binance", market_type=market_type, symbol=symbol, instrument=event.s,
                          timestamp=event.T, received_at=received_at, trade_id=str(event.a), price=event.p,
                          quantity=event.q, side="sell" if event.m else "buy")]
        out: list[Record] = []
        if kind is WsDepth:
            self.decimals_checked = True  # book and gap records: no decimal field outside the book's levels
            self._depth(out, depth_diff(event), received_at)
            return out
        for ev in event if kind is list else (event,):
            kind = type(ev)
            if kind is WsTrade:
                self._trade(out, ev.s, str(ev.t), ev.t, ev.p, ev.q, ev.m, ev.T, received_at)
            elif kind is WsMarkPrice:
                out.append(self._funding(ev.s, ev.r, ev.T, ev.p, ev.i, ev.E, received_at))
            else:
                out.append(self._liquidation(ev, received_at))
        return out

    def _names(self, instrument: str) -> tuple[str, str]:
        names = self._name_cache.get(instrument)
        if names is None:
            if "_" in instrument:  # USDⓈ-M delivery contract, e.g. BTCUSDT_250926
                base, expiry = instrument.split("_", 1)
                names = f"{self.pair(base)}-{expiry}", "futures"
            else:
                names = self.pair(instrument), self.market_type
            self._name_cache[instrument] = names
        return names

    def _trade(self, out, instrument, trade_id, seq, price, qty, buyer_maker, ts, received_at) -> None:
        symbol, market_type = self._names(instrument)
        if not self.futures:
            last = self.last_trade.get(instrument)
            if last is not None:
                if seq <= last:
                    return  # already delivered (overlap after a reconnect)
                if seq != last + 1:
                    out.append(self._gap(instrument, symbol, market_type, "trade", "sequence",
                                         self.trade_time.get(instrument, ts), ts, received_at, last + 1, seq - 1))
            self.last_trade[instrument] = seq
            self.trade_time[instrument] = ts
        out.append(Trade(exchange="binance", market_type=market_type, symbol=symbol, instrument=instrument,
                         timestamp=ts, received_at=received_at, trade_id=trade_id, price=price, quantity=qty,
                         side="sell" if buyer_maker else "buy"))

    def _funding(self, instrument, rate, funding_time, mark, index, ts, received_at) -> FundingRate:
        symbol, market_type = self._names(instrument)
        self.mark[instrument] = mark
        return FundingRate(exchange="binance", market_type=market_type, symbol=symbol, instrument=instrument,
                           timestamp=ts, received_at=received_at, funding_rate=rate, funding_time=funding_time,
                           mark_price=mark, index_price=index)

    def _liquidation(self, ev: WsForceOrder, received_at: int) -> Liquidation:
        o = ev.o
        symbol, market_type = self._names(o.s)
        side = o.S.lower()
        if side not in ("buy", "sell"):
            raise Unparseable("unknown side")
        return Liquidation(exchange="binance", market_type=market_type, symbol=symbol, instrument=o.s,
                           timestamp=o.T, received_at=received_at, side=side, price=o.p, quantity=o.q)

    # -- order book ----------------------------------------------------------------------------------
    def _sync(self, instrument: str) -> DepthSync:
        sync = self.books.get(instrument)
        if sync is None:
            sync = self.books[instrument] = DepthSync()
        return sync

    def _depth(self, out: list[Record], ev: DepthDiff, received_at: int) -> None:
        sync = self.books.get(ev.s) or self._sync(ev.s)
        if not sync.live:
            sync.buffer.append(ev)
            if sync.snapshot_id is None:
                self._want_snapshot(ev.s, sync)
                if self._unassigned is not None:
                    self._attach(ev.s, self._unassigned, received_at, out)
                return
            self._drain(out, ev.s, sync, received_at)
            return
        if (ev.pu != sync.last_u) if self.futures else (ev.U != sync.last_u + 1):
            symbol, market_type = self._names(ev.s)
            out.append(self._gap(ev.s, symbol, market_type, "orderbook", "sequence", sync.last_time, ev.E,
                                 received_at, sync.last_u + 1, ev.U - 1))
            sync.reset()
            sync.buffer.clear()
            sync.buffer.append(ev)
            self._want_snapshot(ev.s, sync)
            return
        self._apply(out, ev, sync, received_at)

    def _apply(self, out, ev: DepthDiff, sync: DepthSync, received_at: int) -> bool:
        """Apply a diff that continues the chain. A level the book refuses breaks the book: an `invalid` gap
        over the diff's ids, and a resync (the diffs that follow are buffered for the new snapshot)."""
        try:
            sync.book.update(ev.b, ev.a, ev.plain)
        except ValueError:
            self.errors["invalid level"] += 1
            symbol, market_type = self._names(ev.s)
            out.append(self._gap(ev.s, symbol, market_type, "orderbook", "invalid", sync.last_time, ev.E,
                                 received_at, sync.last_u + 1, ev.u))
            sync.reset()
            sync.buffer.clear()
            self._want_snapshot(ev.s, sync)
            return False
        sync.last_u = ev.u
        sync.last_time = ev.E
        symbol, market_type = self._name_cache.get(ev.s) or self._names(ev.s)
        self._book_changed(out, ev.s, symbol, market_type, sync.book, ev.u, ev.E, received_at)
        return True

    def _want_snapshot(self, instrument: str, sync: DepthSync) -> None:
        if not sync.requested:
            sync.requested = True
            self._requests.append(self.snapshot_path(instrument))

    def _snapshot(self, instrument: str, snap: DepthSnapshot, received_at: int) -> list[Record]:
        sync = self._sync(instrument)
        try:
            sync.book.load(snap.bids, snap.asks)
        except ValueError:  # a level the book refuses: another snapshot, and the diffs stay held for it
            self.errors["invalid level"] += 1
            sync.reset()
            self._want_snapshot(instrument, sync)
            return []
        sync.snapshot_id = snap.lastUpdateId
        sync.live = False
        sync.last_time = snap.E or snap.T or sync.last_time
        out: list[Record] = []
        self._drain(out, instrument, sync, received_at)
        return out

    def _drain(self, out, instrument: str, sync: DepthSync, received_at: int) -> None:
        """Apply buffered diffs after a snapshot: drop the old ones, find the bridge, then chain."""
        lid = sync.snapshot_id
        while sync.buffer:
            ev = sync.buffer[0]
            if not sync.live:
                if ev.u < lid or (ev.u == lid and not self.futures):
                    sync.buffer.popleft()
                    continue
                first = lid + (0 if self.futures else 1)
                if ev.U > first:  # the snapshot is older than every diff we hold: it cannot be bridged
                    symbol, market_type = self._names(instrument)
                    out.append(self._gap(instrument, symbol, market_type, "orderbook", "sequence", sync.last_time,
                                         ev.E, received_at, first, ev.U - 1))
                    sync.reset()
                    self._want_snapshot(instrument, sync)
                    return
                sync.live = True
                sync.last_u = first - 1  # the ids the snapshot covers
                sync.buffer.popleft()
                if not self._apply(out, ev, sync, received_at):
                    return
                continue
            sync.buffer.popleft()
            self._depth(out, ev, received_at)
            if not sync.live:
                return

    def _attach(self, instrument: str, snap: DepthSnapshot, received_at: int, out: list[Record]) -> None:
        self._unassigned = None
        out.extend(self._snapshot(instrument, snap, received_at))

    # -- REST bodies ---------------------------------------------------------------------------------
    def _rest(self, data, source: str, received_at: int) -> list[Record]:
        path, params = source_path(source), query_params(source)
        if path.endswith("/depth"):
            return self._snapshot(params["symbol"], SNAPSHOT.decode(data), received_at)
        if path.endswith("/openInterest"):
            return [self._open_interest(OPEN_INTEREST.decode(data), received_at)]
        if path.endswith("/premiumIndex"):
            return [self._premium(PREMIUM.decode(data), received_at)]
        if path.endswith("/topLongShortPositionRatio"):
            return self._ratio_rows(LsrTopPosition, RATIOS.decode(data), params.get("period", RATIO_PERIOD), received_at)
        if path.endswith("/globalLongShortAccountRatio"):
            return self._ratio_rows(LsrAllAccount, RATIOS.decode(data), params.get("period", RATIO_PERIOD), received_at)
        if path.endswith(("/exchangeInfo", "/time", "/ping")):
            return []
        raise Unparseable("unknown REST path")

    def _bare_rest(self, obj, data, received_at: int) -> list[Record]:
        """A REST body recorded without its request: only bodies whose content says what they are."""
        if isinstance(obj, dict) and "lastUpdateId" in obj:
            snap = SNAPSHOT.decode(data)
            waiting = [i for i, s in self.books.items() if s.snapshot_id is None]
            if len(waiting) == 1:
                return self._snapshot(waiting[0], snap, received_at)
            fits = [i for i in waiting if any(ev.U <= snap.lastUpdateId + 1 <= ev.u for ev in self.books[i].buffer)]
            if len(fits) == 1:
                return self._snapshot(fits[0], snap, received_at)
            self._unassigned = snap  # attached to the next symbol whose diffs arrive without a book
            return []
        if isinstance(obj, dict) and "openInterest" in obj:
            return [self._open_interest(OPEN_INTEREST.decode(data), received_at)]
        if isinstance(obj, dict) and "lastFundingRate" in obj:
            return [self._premium(PREMIUM.decode(data), received_at)]
        if isinstance(obj, list):
            raise Unparseable("ratio body without its source")
        raise Unparseable("unknown message")

    def _open_interest(self, body: OpenInterestBody, received_at: int) -> OpenInterest:
        symbol, market_type = self._names(body.symbol)
        mark = self.mark.get(body.symbol)
        return OpenInterest(exchange="binance", market_type=market_type, symbol=symbol, instrument=body.symbol,
                            timestamp=body.time, received_at=received_at, open_interest=body.openInterest,
                            open_interest_value=multiply(body.openInterest, mark) if mark else None)

    def _premium(self, body: PremiumIndex, received_at: int) -> FundingRate:
        return self._funding(body.symbol, body.lastFundingRate, body.nextFundingTime, body.markPrice,
                             body.indexPrice, body.time, received_at)

    def _ratio_rows(self, cls, rows: list[RatioRow], period: str, received_at: int) -> list[Record]:
        out: list[Record] = []
        for row in sorted(rows, key=lambda r: r.timestamp):
            key = (cls.__name__, row.symbol, period)
            if row.timestamp <= self.last_bucket.get(key, -1):
                continue  # a bucket already emitted by an earlier poll
            self.last_bucket[key] = row.timestamp
            symbol, market_type = self._names(row.symbol)
            out.append(cls(exchange="binance", market_type=market_type, symbol=symbol, instrument=row.symbol,
                           timestamp=row.timestamp, received_at=received_at, period=period,
                           long_short_ratio=row.longShortRatio, long_ratio=row.longAccount,
                           short_ratio=row.shortAccount))
        return out

    # -- connection events ---------------------------------------------------------------------------
    def on_disconnect(self, at_ms: int) -> list[Record]:
        out: list[Record] = []
        for instrument, sync in self.books.items():
            if sync.live:
                symbol, market_type = self._names(instrument)
                out.append(self._gap(instrument, symbol, market_type, "orderbook", "disconnect", sync.last_time,
                                     at_ms, at_ms, sync.last_u + 1, None))
            sync.reset()
            sync.buffer.clear()
        return out


class BinanceSpotFeed(BinanceFeed):
    name = "binance_spot"
    sequenced = ("orderbook", "trade")  # @trade ids are consecutive: a loss is an exact `sequence` gap


class BinanceUsdmFeed(BinanceFeed):
    name = "binance_usdm"
    market_type = "perpetual"
    futures = True
    depth_path = "/fapi/v1/depth"

    def _extra_streams(self, low: str, data_types) -> list[str]:
        names = []
        if "funding_rate" in data_types or "open_interest" in data_types:
            names.append(f"{low}@markPrice@1s")  # mark price also values open interest
        if "liquidation" in data_types:
            names.append(f"{low}@forceOrder")  # Binance samples: at most one liquidation per symbol per second
        return names

    def polls(self, symbols, data_types):
        polls = []
        for symbol in symbols:
            inst = self.instrument(symbol)
            if "open_interest" in data_types:
                polls.append(Poll(f"/fapi/v1/openInterest?symbol={inst}", 10.0))
            if "lsr_top_position" in data_types:
                polls.append(Poll(f"/futures/data/topLongShortPositionRatio?symbol={inst}&period={RATIO_PERIOD}&limit=30", 60.0))
            if "lsr_all_account" in data_types:
                polls.append(Poll(f"/futures/data/globalLongShortAccountRatio?symbol={inst}&period={RATIO_PERIOD}&limit=30", 60.0))
        return polls
