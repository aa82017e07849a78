"""OKX v5: spot, SWAP and FUTURES on the public WebSocket plus the rubik long/short ratios by REST.

One feed serves every instrument type: OKX's instId says what it is (`BTC-USDT`, `BTC-USDT-SWAP`,
`XRP-USD-230929`). Books: the `books` channel (400 levels) sends a snapshot on subscribe and then
updates; continuity is `prevSeqId == previous seqId` and, while OKX still sent it, the CRC32 checksum
of the top 25 levels. OKX resends a snapshot only on a new subscription, so a break unsubscribes and
subscribes that book again.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import msgspec

from marketprism.book import Book, SyncedBook
from marketprism.exchanges.base import (Feed, Poll, Subscription, Unparseable, as_int, multiply, query_params,
                                        source_path)
from marketprism.records import (SIDES, FundingRate, Liquidation, LsrAllAccount, LsrTopPosition, OpenInterest,
                                 Record, Trade)

WS_PATH = "/ws/v5/public"
RATIO_PERIOD = "5m"
RATIO_POLL_S = 60.0
# OKX caps one request's args at 64 KB in total; 50 args is ~3 KB and keeps the number of subscribe
# requests (480 per connection per hour) low.
ARGS_PER_FRAME = 50
# OKX recommends fewer than 30 channels of 50/400-level books per connection.
BOOKS_PER_CONNECTION = 25
CHECKSUM_LEVELS = 25

Level = tuple[str, str, str, str]  # price, size, deprecated "0", number of orders


class Arg(msgspec.Struct):
    channel: str
    instId: str | None = None
    instType: str | None = None


class Message(msgspec.Struct):
    """Every WS frame: a push (arg + data), an event (subscribe/error/notice) or a REST body (code + data)."""
    arg: Arg | None = None
    action: str | None = None
    data: msgspec.Raw = msgspec.Raw()  # empty when absent (msgspec takes no `Raw | None`)
    event: str | None = None
    code: str | None = None
    msg: str | None = None


class TradeRow(msgspec.Struct):
    instId: str
    tradeId: str
    px: str
    sz: str
    side: str
    ts: str


class BookRow(msgspec.Struct):
    asks: list[Level]
    bids: list[Level]
    ts: str
    checksum: int | None = None
    seqId: int | None = None
    prevSeqId: int | None = None


class FundingRow(msgspec.Struct):
    instId: str
    fundingRate: str
    fundingTime: str
    ts: str | None = None


class OiRow(msgspec.Struct):
    instId: str
    oi: str
    ts: str
    oiUsd: str | None = None


class LiqDetail(msgspec.Struct):
    side: str
    bkPx: str
    sz: str
    ts: str


class LiqRow(msgspec.Struct):
    instId: str
    details: list[LiqDetail]


_message = msgspec.json.Decoder(Message)
_trades = msgspec.json.Decoder(list[TradeRow])
_books = msgspec.json.Decoder(list[BookRow])
_funding = msgspec.json.Decoder(list[FundingRow])
_oi_rows = msgspec.json.Decoder(list[OiRow])
_liquidations = msgspec.json.Decoder(list[LiqRow])
_ratio_rows = msgspec.json.Decoder(list[tuple[str, str]])  # [ts, ratio] per bucket: every rubik ratio endpoint
_encode = msgspec.json.Encoder().encode


@lru_cache(maxsize=8192)
def names(inst_id: str) -> tuple[str, str]:
    """(symbol, market_type) of an OKX instId."""
    parts = inst_id.split("-")
    if parts[-1] == "SWAP":
        return inst_id[:-5], "perpetual"
    if len(parts) == 3 and parts[2].isdigit():
        return inst_id, "futures"
    if len(parts) == 5 and parts[4] in ("C", "P"):
        return inst_id, "options"
    return inst_id, "spot"


def instruments(symbol: str) -> list[tuple[str, str]]:
    """The instIds a configured symbol stands for: BTC-USDT -> spot BTC-USDT and swap BTC-USDT-SWAP."""
    _, market_type = names(symbol)
    if market_type == "spot":
        return [(symbol, "spot"), (f"{symbol}-SWAP", "perpetual")]
    return [(symbol, market_type)]


def checksum(book: Book) -> int:
    """OKX's book checksum: CRC32 (signed 32-bit) of the top 25 levels, bid:ask interleaved, as sent."""
    bids, asks = book.top(CHECKSUM_LEVELS)
    parts: list[str] = []
    for i in range(max(len(bids), len(asks))):
        if i < len(bids):
            parts.append(f"{bids[i][0]}:{bids[i][1]}")
        if i < len(asks):
            parts.append(f"{asks[i][0]}:{asks[i][1]}")
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def frame(op: str, args: list[dict]) -> str:
    return _encode({"op": op, "args": args}).decode()


class OkxFeed(Feed):
    name = "okx"
    exchange = "okx"
    ping_frame = "ping"
    ping_interval_s = 20.0  # OKX drops a connection after 30 s without traffic

    def __init__(self, depth: int = 400, book_interval_ms: int = 0) -> None:
        super().__init__(depth, book_interval_ms)
        self.books: dict[str, SyncedBook] = {}
        self.last_bucket: dict[tuple[str, str, str], int] = {}
        self.checksums_verified = 0
        self.verify_checksums = True  # off only for recordings whose snapshots were cut by their authors
        # liquidation-orders pushes every instrument of a type: keep the subscribed ones (None: keep all)
        self.liquidation_ids: set[str] | None = None
        self.last_price: dict[str, str] = {}  # instId -> last trade price, to value open interest in contracts
        self._channels = {"trades": self._on_trades, "books": self._on_books, "funding-rate": self._on_funding,
                          "open-interest": self._on_open_interest, "liquidation-orders": self._on_liquidations}

    # -- plan --------------------------------------------------------------------------------------
    def _args(self, symbols, data_types) -> list[dict]:
        args: list[dict] = []
        types: set[str] = set()
        liquidation_ids: set[str] = set()
        for symbol in symbols:
            for inst, market_type in instruments(symbol):
                if "trade" in data_types:
                    args.append({"channel": "trades", "instId": inst})
                if "orderbook" in data_types:
                    args.append({"channel": "books", "instId": inst})
                if market_type == "perpetual" and "funding_rate" in data_types:
                    args.append({"channel": "funding-rate", "instId": inst})
                if market_type != "spot" and "open_interest" in data_types:
                    args.append({"channel": "open-interest", "instId": inst})
                if market_type != "spot" and "liquidation" in data_types:
                    types.add("SWAP" if market_type == "perpetual" else "FUTURES")
                    liquidation_ids.add(inst)
        if liquidation_ids:
            self.liquidation_ids = liquidation_ids
        args[:0] = [{"channel": "liquidation-orders", "instType": t} for t in sorted(types)]
        return args

    def subscriptions(self, symbols, data_types):
        connections: list[list[dict]] = [[]]
        books = 0
        for arg in self._args(symbols, data_types):
            if arg["channel"] == "books":
                if books == BOOKS_PER_CONNECTION:
                    connections.append([])
                    books = 0
                books += 1
            connections[-1].append(arg)
        return [Subscription(WS_PATH, tuple(frame("subscribe", args[i:i + ARGS_PER_FRAME])
                                            for i in range(0, len(args), ARGS_PER_FRAME)))
                for args in connections if args]

    def polls(self, symbols, data_types):
        polls = []
        for symbol in symbols:
            for inst, market_type in instruments(symbol):
                if market_type == "spot":
                    continue  # the rubik contract ratios exist for FUTURES and SWAP only
                if "lsr_top_position" in data_types:
                    polls.append(Poll("/api/v5/rubik/stat/contracts/long-short-position-ratio-contract-top-trader"
                                      f"?instId={inst}&period={RATIO_PERIOD}", RATIO_POLL_S))
                if "lsr_all_account" in data_types:
                    polls.append(Poll("/api/v5/rubik/stat/contracts/long-short-account-ratio-contract"
                                      f"?instId={inst}&period={RATIO_PERIOD}", RATIO_POLL_S))
        return polls  # open interest comes on the WS open-interest channel: no poll

    # -- parse -------------------------------------------------------------------------------------
    def _handle(self, data, source, received_at):
        if source and not source.startswith("ws"):
            return self._rest(data, source, received_at)
        if data in (b"pong", "pong"):
            self.control_frame = True
            return []  # answer to our "ping" keep-alive
        msg = _message.decode(data)
        if msg.event is not None:
            self.control_frame = True
            if msg.event == "error":
                self.errors[f"error event {msg.code}"] += 1
            return []  # subscribe/unsubscribe acknowledgements, notices
        if msg.arg is None or not msg.data:
            if msg.code is not None and msg.data:
                return self._bare_rest(msg, received_at)
            raise Unparseable("unknown message")
        handler = self._channels.get(msg.arg.channel)
        if handler is None:
            raise Unparseable("unknown channel")
        return handler(msg, received_at)

    def _on_trades(self, msg: Message, received_at: int) -> list[Record]:
        out: list[Record] = []
        for row in _trades.decode(msg.data):
            if row.side not in SIDES:
                raise Unparseable("unknown side")
            symbol, market_type = names(row.instId)
            out.append(Trade(exchange="okx", market_type=market_type, symbol=symbol, instrument=row.instId,
                             timestamp=as_int(row.ts), received_at=received_at, trade_id=row.tradeId,
                             price=row.px, quantity=row.sz, side=row.side))
            self.last_price[row.instId] = row.px
        return out

    def _on_funding(self, msg: Message, received_at: int) -> list[Record]:
        out: list[Record] = []
        for row in _funding.decode(msg.data):
            if not row.fundingRate:
                raise Unparseable("empty funding rate")
            symbol, market_type = names(row.instId)
            funding_time = as_int(row.fundingTime)
            # Pushes since 2023 carry `ts` (when OKX computed the rate); the 2022 format has none, so
            # the settlement time stands in and repeated pushes for one settlement share a key.
            ts = as_int(row.ts) if row.ts else funding_time
            out.append(FundingRate(exchange="okx", market_type=market_type, symbol=symbol, instrument=row.instId,
                                   timestamp=ts, received_at=received_at, funding_rate=row.fundingRate,
                                   funding_time=funding_time))  # the channel gives no mark/index price
        return out

    def _on_open_interest(self, msg: Message, received_at: int) -> list[Record]:
        return [self._open_interest(row, received_at) for row in _oi_rows.decode(msg.data)]

    def _open_interest(self, row: OiRow, received_at: int) -> OpenInterest:
        symbol, market_type = names(row.instId)
        return OpenInterest(exchange="okx", market_type=market_type, symbol=symbol, instrument=row.instId,
                            timestamp=as_int(row.ts), received_at=received_at, open_interest=row.oi,
                            open_interest_value=row.oiUsd or self._interest_value(row.instId, row.oi))

    def _interest_value(self, inst: str, oi: str) -> str | None:
        """Open interest in the quote currency where OKX gives no oiUsd (pushes before 2023).

        `oi` counts contracts; ctVal is one contract's size: in the base coin for linear contracts
        (value = oi x ctVal x price, the last trade price of the instrument) and in USD for inverse ones
        (value = oi x ctVal). Without the instrument list (replay) or a price yet, the value is unknown.
        """
        info = self.instrument_info.get(inst)
        if info is None or not info.contract_value:
            return None
        if info.inverse:
            return multiply(oi, info.contract_value)
        price = self.last_price.get(inst)
        return multiply(multiply(oi, info.contract_value), price) if price else None

    def _on_liquidations(self, msg: Message, received_at: int) -> list[Record]:
        out: list[Record] = []
        for row in _liquidations.decode(msg.data):
            if self.liquidation_ids is not None and row.instId not in self.liquidation_ids:
                continue
            symbol, market_type = names(row.instId)
            for d in row.details:
                if d.side not in SIDES:
                    raise Unparseable("unknown side")
                out.append(Liquidation(exchange="okx", market_type=market_type, symbol=symbol, instrument=row.instId,
                                       timestamp=as_int(d.ts), received_at=received_at, side=d.side, price=d.bkPx,
                                       quantity=d.sz))
        return out

    # -- order book ----------------------------------------------------------------------------------
    def _on_books(self, msg: Message, received_at: int) -> list[Record]:
        inst = msg.arg.instId
        if not inst or msg.action not in ("snapshot", "update"):
            raise Unparseable("book push without instId or action")
        out: list[Record] = []
        for row in _books.decode(msg.data):
            self._book_row(out, inst, msg.action == "snapshot", row, received_at)
        return out

    def _book_row(self, out: list[Record], inst: str, snapshot: bool, row: BookRow, received_at: int) -> None:
        state = self.books.get(inst) or self.books.setdefault(inst, SyncedBook())
        ts = as_int(row.ts)
        # The 2022 format predates seqId: its ts (one push per 100 ms, increasing) is the only value that
        # identifies a book state, so it is the sequence and dedup key there; a per-book counter would
        # restart with every process and collide.
        seq = row.seqId if row.seqId is not None else ts
        if snapshot:
            state.live, state.resubscribing = True, False
        elif not state.live:
            self._resubscribe(inst, state)  # waiting for a snapshot: updates cannot be applied
            return
        elif row.seqId is not None and row.prevSeqId != state.sequence:
            # A reset after maintenance (seqId < prevSeqId) still links by prevSeqId: one rule covers it.
            self._break(out, inst, state, "sequence", state.sequence + 1, row.prevSeqId, ts, received_at)
            return
        from_seq = None if snapshot else state.sequence + 1
        try:
            (state.book.load if snapshot else state.book.update)([(r[0], r[1]) for r in row.bids],
                                                                 [(r[0], r[1]) for r in row.asks])
        except ValueError:  # a level the book refuses (not a plain decimal): it is broken until a new snapshot
            self.errors["invalid level"] += 1
            self._break(out, inst, state, "invalid", from_seq, seq, ts, received_at)
            return
        if row.checksum and self.verify_checksums:  # 0: deprecated by OKX, nothing to check
            if checksum(state.book) != row.checksum:
                self._break(out, inst, state, "checksum", from_seq, seq, ts, received_at)
                return
            self.checksums_verified += 1
        state.sequence, state.last_time = seq, ts  # seq: seqId (ts for recordings without seqId)
        if snapshot or row.bids or row.asks:  # an idle keep-alive (seqId == prevSeqId) changes nothing
            symbol, market_type = names(inst)
            self._book_changed(out, inst, symbol, market_type, state.book, seq, ts, received_at)

    def _break(self, out, inst: str, state: SyncedBook, reason: str, from_seq: int | None, to_seq: int | None,
               ts: int, received_at: int) -> None:
        symbol, market_type = names(inst)
        self._break_book(out, state, inst, inst, symbol, market_type, reason, from_seq, to_seq, ts, received_at)

    def _resubscribe(self, inst: str, state: SyncedBook) -> None:
        if not state.resubscribing:  # once per break: OKX allows 480 (un)subscribe requests per hour
            state.resubscribing = True
            args = [{"channel": "books", "instId": inst}]
            self._outgoing.extend((frame("unsubscribe", args), frame("subscribe", args)))

    # -- REST bodies ---------------------------------------------------------------------------------
    def _rest(self, data, source: str, received_at: int) -> list[Record]:
        path, params = source_path(source), query_params(source)
        body = _message.decode(data)
        if body.code != "0" or not body.data:
            raise Unparseable("REST error body")
        if path.endswith("/public/open-interest"):
            return [self._open_interest(row, received_at) for row in _oi_rows.decode(body.data)]
        if path.endswith("/long-short-position-ratio-contract-top-trader"):
            return self._ratios(LsrTopPosition, _ratio_rows.decode(body.data), params, received_at)
        if path.endswith(("/long-short-account-ratio-contract", "/long-short-account-ratio")):
            return self._ratios(LsrAllAccount, _ratio_rows.decode(body.data), params, received_at)
        raise Unparseable("unknown REST path")

    def _bare_rest(self, msg: Message, received_at: int) -> list[Record]:
        """A REST body recorded without its request: only open interest rows say what they are."""
        if msg.code != "0" or b'"oi"' not in bytes(msg.data):
            raise Unparseable("REST body without its source")
        return [self._open_interest(row, received_at) for row in _oi_rows.decode(msg.data)]

    def _ratios(self, cls, rows: list[tuple[str, str]], params: dict[str, str], received_at: int) -> list[Record]:
        if "instId" in params:
            inst = params["instId"]
            symbol, market_type = names(inst)
        elif "ccy" in params:
            # The older currency-level endpoint (?ccy=BTC) aggregates all of a currency's FUTURES and SWAP
            # accounts: it has no instrument, so instrument and symbol are the currency itself ("BTC").
            inst = symbol = params["ccy"]
            market_type = "perpetual"
        else:
            raise Unparseable("ratio request without instId or ccy")
        period = params.get("period", RATIO_PERIOD)
        key = (cls.__name__, inst, period)
        out: list[Record] = []
        for ts_text, ratio in sorted(rows, key=lambda r: as_int(r[0])):
            ts = as_int(ts_text)
            if ts <= self.last_bucket.get(key, -1):
                continue  # a bucket already emitted by an earlier poll
            self.last_bucket[key] = ts
            # rubik gives the ratio only: long_ratio/short_ratio stay null
            out.append(cls(exchange="okx", market_type=market_type, symbol=symbol, instrument=inst, timestamp=ts,
                           received_at=received_at, period=period, long_short_ratio=ratio))
        return out

    # -- connection events ---------------------------------------------------------------------------
    def on_disconnect(self, at_ms: int) -> list[Record]:
        out: list[Record] = []
        for inst, state in self.books.items():
            if state.live:
                symbol, market_type = names(inst)
                out.append(self._gap(inst, symbol, market_type, "orderbook", "disconnect", state.last_time, at_ms, at_ms,
                                     state.sequence + 1, None))
            state.live = state.resubscribing = False
            state.book.clear()
        self._outgoing.clear()  # re-subscriptions meant for the lost connection; reconnecting resubscribes all
        return out
