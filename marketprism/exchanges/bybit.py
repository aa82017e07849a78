"""Bybit v5 public market data: spot and linear (USDT/USDC perpetual) feeds, wire structs, pure parsers.

Every push is `{"topic", "type", "ts", "data"[, "cts"]}` (https://bybit-exchange.github.io/docs/v5/ws/connect).
Books: `orderbook.{depth}.{symbol}` sends a snapshot on subscribe, then deltas whose `u` grows by one
per message; any snapshot (also one Bybit resends mid-stream after a service restart, with u=1)
replaces the book. Bybit resends a snapshot only on a new subscription, so a break unsubscribes and
subscribes that topic again. Linear `tickers` deltas carry only the fields that changed and are merged
into per-symbol state.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import msgspec

from marketprism.book import SyncedBook
from marketprism.exchanges.base import (Feed, Poll, Subscription, Unparseable, as_int, query_params, source_path,
                                        split_symbol)
from marketprism.records import FundingRate, Liquidation, LsrAllAccount, OpenInterest, Record, Trade

# Depths documented for both spot and linear (v5/websocket/public/orderbook): 1, 50, 200, 1000. Level 1
# is snapshot-only; the smallest deeper topic covering the configured depth is used, so the default
# depth 400 takes orderbook.1000 (pushed every 200 ms) and depth <= 50 orderbook.50 (every 20 ms).
BOOK_DEPTHS = (50, 200, 1000)
# "Spot can input up to 10 args for each subscription request"; linear has no such cap, 10 suits both.
ARGS_PER_FRAME = 10
RATIO_PERIOD = "5min"
RATIO_POLL_S = 60.0
PERIODS = {"5min": "5m", "15min": "15m", "30min": "30m", "1h": "1h", "4h": "4h", "1d": "1d"}
RATIO_PLACES = Decimal("1E-8")
SIDES = ("buy", "sell")
# allLiquidation "S": "Position side ... When you receive a Buy update, this means that a long position
# has been liquidated" (v5/websocket/public/all-liquidation). A long is closed by a sell order, and our
# liquidation side is that of the liquidation order.
LIQUIDATION_SIDE = {"Buy": "sell", "Sell": "buy"}
TICKER_FIELDS = ("fundingRate", "nextFundingTime", "markPrice", "indexPrice", "openInterest", "openInterestValue")


class Frame(msgspec.Struct):
    """Any WS frame: a push (topic + data), an op response (subscribe, pong) or a REST body (retCode)."""
    topic: str | None = None
    type: str | None = None
    ts: int | None = None
    cts: int | None = None  # matching-engine time of a book update; "can be correlated with T" of trades
    data: msgspec.Raw = msgspec.Raw()  # empty when absent (msgspec takes no `Raw | None`)
    op: str | None = None
    success: bool | None = None
    retCode: int | None = None


class Row(msgspec.Struct):
    """One publicTrade or allLiquidation entry: time, symbol, side, size, price (and trade id)."""
    T: int
    s: str
    S: str  # trades: "Side of taker"; liquidations: "Position side" (of the liquidated position)
    v: str
    p: str
    i: str | None = None


class BookData(msgspec.Struct):
    s: str
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]
    u: int


class TickerData(msgspec.Struct):
    symbol: str
    fundingRate: str | None = None
    nextFundingTime: str | None = None
    markPrice: str | None = None
    indexPrice: str | None = None
    openInterest: str | None = None
    openInterestValue: str | None = None


class RestBody(msgspec.Struct):
    retCode: int
    result: msgspec.Raw = msgspec.Raw()


class InterestRow(msgspec.Struct):
    openInterest: str
    timestamp: str


class InterestResult(msgspec.Struct):
    symbol: str
    rows: list[InterestRow] = msgspec.field(name="list")


class RatioRow(msgspec.Struct):
    symbol: str
    buyRatio: str
    sellRatio: str
    timestamp: str


class RatioResult(msgspec.Struct):
    rows: list[RatioRow] = msgspec.field(name="list")


_frame = msgspec.json.Decoder(Frame)
_rows = msgspec.json.Decoder(list[Row])
_book = msgspec.json.Decoder(BookData)
_ticker = msgspec.json.Decoder(TickerData)
_rest_body = msgspec.json.Decoder(RestBody)
_interest = msgspec.json.Decoder(InterestResult)
_ratios = msgspec.json.Decoder(RatioResult)
_encoder = msgspec.json.Encoder()


def ratio(buy: str, sell: str) -> str:
    """buyRatio / sellRatio ("Long-short account ratio = Long account ratio / Short account ratio").

    0.49/0.51 does not terminate: the quotient is rounded half-even to 8 places, trailing zeros dropped,
    so it is exact whenever it has at most 8 places (1, 1.5); the exact inputs stay in long/short_ratio.
    """
    divisor = Decimal(sell)
    if not divisor:
        raise Unparseable("zero short ratio")
    q = (Decimal(buy) / divisor).quantize(RATIO_PLACES, ROUND_HALF_EVEN).normalize()
    return format(q, "f")


def op_frame(op: str, topics: list[str]) -> str:
    return _encoder.encode({"op": op, "args": topics}).decode()


class BybitFeed(Feed):
    exchange = "bybit"
    market_type = "spot"
    ws_path = "/v5/public/spot"
    ping_frame = '{"op":"ping"}'
    ping_interval_s = 20.0  # the docs recommend a ping every 20 seconds

    def __init__(self, depth: int = 400, book_interval_ms: int = 0) -> None:
        super().__init__(depth, book_interval_ms)
        self.books: dict[str, SyncedBook] = {}
        self.tickers: dict[str, dict[str, str]] = {}
        self.funding_sent: dict[str, tuple[str, str]] = {}
        self.interest_sent: dict[str, str] = {}
        self.last_bucket: dict[tuple[str, str, str], int] = {}
        self._name_cache: dict[str, tuple[str, str]] = {}

    # -- plan --------------------------------------------------------------------------------------
    def instrument(self, symbol: str) -> str:
        return symbol.replace("-", "")

    def book_depth(self) -> int:
        return next((d for d in BOOK_DEPTHS if d >= self.depth), BOOK_DEPTHS[-1])

    def topics(self, symbols, data_types) -> list[str]:
        out = []
        for symbol in symbols:
            inst = self.instrument(symbol)
            if "trade" in data_types:
                out.append(f"publicTrade.{inst}")
            if "orderbook" in data_types:
                out.append(f"orderbook.{self.book_depth()}.{inst}")
            out.extend(self._extra_topics(inst, data_types))
        return out

    def _extra_topics(self, inst: str, data_types) -> list[str]:
        return []

    def subscriptions(self, symbols, data_types):
        topics = self.topics(symbols, data_types)
        frames = tuple(op_frame("subscribe", topics[i:i + ARGS_PER_FRAME])
                       for i in range(0, len(topics), ARGS_PER_FRAME))
        return [Subscription(self.ws_path, frames)]

    # -- parse -------------------------------------------------------------------------------------
    def _handle(self, data, source, received_at):
        if source and not source.startswith("ws"):
            return self._rest(data, source, received_at)
        frame = _frame.decode(data)
        if frame.topic is not None:
            return self._push(frame, received_at)
        if frame.op is not None:
            self.control_frame = True
            if frame.success is False:
                raise Unparseable("request failed")
            return []  # subscribe acknowledgement or pong
        if frame.retCode is not None:
            return self._bare_rest(data, received_at)
        raise Unparseable("unknown message")

    def _push(self, frame: Frame, received_at: int) -> list[Record]:
        kind = frame.topic.split(".", 1)[0]
        out: list[Record] = []
        if kind == "publicTrade":
            out.extend(self._trade(row, received_at) for row in _rows.decode(frame.data))
        elif kind == "orderbook":
            self._book_update(out, frame, received_at)
        elif kind == "tickers":
            self._ticker(out, frame, received_at)
        elif kind == "allLiquidation":
            out.extend(self._liquidation(row, received_at) for row in _rows.decode(frame.data))
        else:
            raise Unparseable("unknown topic")
        return out

    def _name(self, instrument: str) -> tuple[str, str]:
        found = self._name_cache.get(instrument)
        if found is None:
            if instrument in self.instrument_info:
                symbol = self.instrument_info[instrument].symbol  # baseCoin-quoteCoin of instruments-info
            elif instrument.endswith("PERP"):
                symbol = f"{instrument[:-4]}-USDC"  # Bybit names its USDC perpetuals BTCPERP, ETHPERP
            else:
                symbol = split_symbol(instrument)
            found = self._name_cache[instrument] = (symbol, self.market_type)
        return found

    def _trade(self, row: Row, received_at: int) -> Trade:
        side = row.S.lower()
        if side not in SIDES:
            raise Unparseable("unknown side")
        if row.i is None:
            raise Unparseable("no trade id")
        symbol, market_type = self._name(row.s)
        return Trade(exchange="bybit", market_type=market_type, symbol=symbol, instrument=row.s, timestamp=row.T,
                     received_at=received_at, trade_id=row.i, price=row.p, quantity=row.v, side=side)

    def _liquidation(self, row: Row, received_at: int) -> Liquidation:
        side = LIQUIDATION_SIDE.get(row.S)
        if side is None:
            raise Unparseable("unknown side")
        symbol, market_type = self._name(row.s)
        return Liquidation(exchange="bybit", market_type=market_type, symbol=symbol, instrument=row.s,
                           timestamp=row.T, received_at=received_at, side=side, price=row.p, quantity=row.v)

    def _ticker(self, out: list[Record], frame: Frame, received_at: int) -> None:
        """Merge a ticker snapshot or delta; emit funding when its rate or settlement time changes and
        open interest when its size does (mark/index price and value ride along): pushed every 100 ms,
        the ticker would otherwise repeat one funding rate hundreds of thousands of times a day."""
        t = _ticker.decode(frame.data)
        if frame.ts is None:
            raise Unparseable("no timestamp")
        state = self.tickers.setdefault(t.symbol, {})
        if frame.type == "snapshot":
            state.clear()
        for name in TICKER_FIELDS:
            value = getattr(t, name)
            if value:  # "" is how Bybit writes a field that does not apply (funding of a dated future)
                state[name] = value
        symbol, market_type = self._name(t.symbol)
        rate, next_time = state.get("fundingRate"), state.get("nextFundingTime")
        if rate and next_time and self.funding_sent.get(t.symbol) != (rate, next_time):
            self.funding_sent[t.symbol] = (rate, next_time)
            out.append(FundingRate(exchange="bybit", market_type=market_type, symbol=symbol, instrument=t.symbol,
                                   timestamp=frame.ts, received_at=received_at, funding_rate=rate,
                                   funding_time=as_int(next_time), mark_price=state.get("markPrice"),
                                   index_price=state.get("indexPrice")))
        oi = state.get("openInterest")
        if oi and self.interest_sent.get(t.symbol) != oi:
            self.interest_sent[t.symbol] = oi
            out.append(OpenInterest(exchange="bybit", market_type=market_type, symbol=symbol, instrument=t.symbol,
                                    timestamp=frame.ts, received_at=received_at, open_interest=oi,
                                    open_interest_value=state.get("openInterestValue")))

    # -- order book ----------------------------------------------------------------------------------
    def _book_update(self, out: list[Record], frame: Frame, received_at: int) -> None:
        d = _book.decode(frame.data)
        # cts is the matching engine's time of the update (the event); older messages only carry ts.
        ts = frame.cts if frame.cts is not None else frame.ts
        if ts is None:
            raise Unparseable("no timestamp")
        st = self.books.get(d.s) or self.books.setdefault(d.s, SyncedBook())
        symbol, market_type = self._name(d.s)
        snapshot = frame.type == "snapshot"
        # Level-1 books resend an unchanged snapshot (same u) every 3 s without a change: no new record.
        changed = not (snapshot and st.live and d.u == st.sequence)
        if not snapshot:
            if frame.type != "delta":
                raise Unparseable("unknown book type")
            if not st.live or d.u <= st.sequence:
                return  # waiting for the snapshot after a break, or a delta already applied
            if d.u != st.sequence + 1:
                self._break_book(out, st, frame.topic, d.s, symbol, market_type, "sequence", st.sequence + 1,
                                 d.u - 1, ts, received_at)
                return
        try:
            (st.book.load if snapshot else st.book.update)(d.b, d.a)
        except ValueError:  # a level the book refuses (not a plain decimal): it is broken until a new snapshot
            self.errors["invalid level"] += 1
            self._break_book(out, st, frame.topic, d.s, symbol, market_type, "invalid",
                             None if snapshot else st.sequence + 1, d.u, ts, received_at)
            return
        if snapshot:
            st.live, st.resubscribing = True, False
        st.sequence, st.last_time = d.u, ts
        if changed:
            self._book_changed(out, d.s, symbol, market_type, st.book, d.u, ts, received_at)

    def _resubscribe(self, topic: str, st: SyncedBook) -> None:
        if not st.resubscribing:
            st.resubscribing = True
            self._outgoing.append(op_frame("unsubscribe", [topic]))
            self._outgoing.append(op_frame("subscribe", [topic]))

    # -- REST bodies ---------------------------------------------------------------------------------
    def _rest(self, data, source: str, received_at: int) -> list[Record]:
        path, params = source_path(source), query_params(source)
        body = _rest_body.decode(data)
        if body.retCode != 0:
            raise Unparseable("error response")
        if path.endswith("/market/account-ratio"):
            period = PERIODS.get(params.get("period", ""))
            if period is None:
                raise Unparseable("unknown period")
            return self._ratio_rows(_ratios.decode(body.result), period, received_at)
        if path.endswith("/market/open-interest"):
            return self._interest_rows(_interest.decode(body.result), received_at)
        raise Unparseable("unknown REST path")

    def _bare_rest(self, data, received_at: int) -> list[Record]:
        """A REST body recorded without its request: only open interest says what it is."""
        body = _rest_body.decode(data)
        result = bytes(body.result)
        if body.retCode != 0:
            raise Unparseable("error response")
        if b'"openInterest"' in result:
            return self._interest_rows(_interest.decode(result), received_at)
        # a ratio body's period is only in its request
        raise Unparseable("ratio body without its source" if b'"buyRatio"' in result else "unknown message")

    def _interest_rows(self, res: InterestResult, received_at: int) -> list[Record]:
        """Open-interest history; "BTCUSD(inverse) is USD, BTCUSDT(linear) is BTC", no value is given."""
        symbol, market_type = self._name(res.symbol)
        return [OpenInterest(exchange="bybit", market_type=market_type, symbol=symbol, instrument=res.symbol,
                             timestamp=ts, received_at=received_at, open_interest=row.openInterest)
                for ts, row in self._new_buckets("open_interest", res.symbol, "", res.rows)]

    def _ratio_rows(self, res: RatioResult, period: str, received_at: int) -> list[Record]:
        out: list[Record] = []
        inst = res.rows[0].symbol if res.rows else ""  # one request, one symbol
        symbol, market_type = self._name(inst)
        for ts, row in self._new_buckets("lsr_all_account", inst, period, res.rows):
            out.append(LsrAllAccount(exchange="bybit", market_type=market_type, symbol=symbol, instrument=inst,
                                     timestamp=ts, received_at=received_at, period=period,
                                     long_short_ratio=ratio(row.buyRatio, row.sellRatio), long_ratio=row.buyRatio,
                                     short_ratio=row.sellRatio))
        return out

    def _new_buckets(self, kind: str, inst: str, period: str, rows) -> list:
        """(time, row) oldest first, without the buckets an earlier poll already gave (polls overlap)."""
        key = (kind, inst, period)
        last = self.last_bucket.get(key, -1)
        fresh = sorted(((as_int(r.timestamp), r) for r in rows), key=lambda pair: pair[0])
        fresh = [(ts, r) for ts, r in fresh if ts > last]
        if fresh:
            self.last_bucket[key] = fresh[-1][0]
        return fresh

    # -- connection events ---------------------------------------------------------------------------
    def on_disconnect(self, at_ms: int) -> list[Record]:
        out: list[Record] = []
        for inst, st in self.books.items():
            if st.live:
                symbol, market_type = self._name(inst)
                out.append(self._gap(inst, symbol, market_type, "orderbook", "disconnect", st.last_time, at_ms,
                                     at_ms, st.sequence + 1, None))
            st.reset()
            st.resubscribing = False
        self._outgoing.clear()  # frames meant for the lost connection; the new one subscribes afresh
        return out


class BybitSpotFeed(BybitFeed):
    name = "bybit_spot"


class BybitLinearFeed(BybitFeed):
    name = "bybit_linear"
    market_type = "perpetual"
    ws_path = "/v5/public/linear"

    def _extra_topics(self, inst: str, data_types) -> list[str]:
        out = []
        if "funding_rate" in data_types or "open_interest" in data_types:
            out.append(f"tickers.{inst}")
        if "liquidation" in data_types:
            out.append(f"allLiquidation.{inst}")  # every liquidation; liquidation.{symbol} is deprecated
        return out

    def polls(self, symbols, data_types):
        # Bybit publishes an all-account ratio only: there is no top-trader position ratio, so this feed
        # never emits lsr_top_position. Open interest comes with the ticker; /v5/market/open-interest
        # bodies (history) parse too but are not polled.
        if "lsr_all_account" not in data_types:
            return []
        return [Poll(f"/v5/market/account-ratio?category=linear&symbol={self.instrument(s)}"
                     f"&period={RATIO_PERIOD}&limit=50", RATIO_POLL_S) for s in symbols]
