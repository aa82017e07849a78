"""Deribit API v2: JSON-RPC over one WebSocket, wire structs, pure parsers and the change_id book chain.

Every push is a JSON-RPC notification `{"method": "subscription", "params": {"channel", "data"}}`
(https://docs.deribit.com/articles/notifications). Deribit sends numbers as JSON numbers: the wire
structs decode them into `Decimal` (msgspec keeps the literal's exact value) and records carry them as
plain strings, so 1.2e-05 becomes "0.000012" and never passes through a binary float.

Public clients get the 100 ms channels (the raw ones need authentication); recordings made with `.raw`
parse the same way. Books: a snapshot, then changes linked by `prev_change_id == previous change_id`
(channel book.(instrument_name).(interval) in the docs); Deribit resends a snapshot only on a new
subscription, so a break unsubscribes and subscribes that book again.
"""

from __future__ import annotations

import re
from decimal import Decimal

import msgspec

from marketprism.book import SyncedBook
from marketprism.exchanges.base import Feed, Subscription, Unparseable, multiply, plain_decimal
from marketprism.records import FundingRate, OpenInterest, Record, Trade, VolatilityIndex

WS_PATH = "/ws/api/v2"
INTERVAL = "100ms"
HEARTBEAT_S = 30  # public/set_heartbeat: "not less than 10"
FUNDING_WINDOW_MS = 8 * 3600 * 1000
DVOL_CURRENCIES = ("BTC", "ETH")  # the currencies Deribit publishes a volatility index (DVOL) for
INVERSE_COINS = ("BTC", "ETH")  # coins with inverse (USD, coin-settled) contracts; others are USDC-margined
MONTHS = {m: i for i, m in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                                       "NOV", "DEC"), start=1)}
_EXPIRY = re.compile(r"(\d{1,2})([A-Z]{3})(\d{2})")
SIDES = ("buy", "sell")

Level = tuple[str, Decimal, Decimal]  # action (new/change/delete), price, amount


class Message(msgspec.Struct):
    """Any frame: a notification (method + params) or a response to our request (id + result/error)."""
    method: str | None = None
    params: msgspec.Raw = msgspec.Raw()  # empty when absent (msgspec takes no `Raw | None`)
    id: int | str | None = None
    result: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()


class Notification(msgspec.Struct):
    channel: str
    data: msgspec.Raw


class Heartbeat(msgspec.Struct):
    type: str


class TradeRow(msgspec.Struct):
    trade_id: str
    instrument_name: str
    timestamp: int
    price: Decimal
    amount: Decimal
    direction: str  # "Trade direction of the taker"


class BookData(msgspec.Struct):
    type: str
    instrument_name: str
    timestamp: int
    change_id: int
    bids: list[Level]
    asks: list[Level]
    prev_change_id: int | None = None


class TickerData(msgspec.Struct):
    instrument_name: str
    timestamp: int
    mark_price: Decimal | None = None
    index_price: Decimal | None = None
    open_interest: Decimal | None = None
    current_funding: Decimal | None = None


class VolatilityData(msgspec.Struct):
    index_name: str
    timestamp: int
    volatility: Decimal


_message = msgspec.json.Decoder(Message)
_notification = msgspec.json.Decoder(Notification)
_heartbeat = msgspec.json.Decoder(Heartbeat)
_trades = msgspec.json.Decoder(list[TradeRow])
_book = msgspec.json.Decoder(BookData)
_ticker = msgspec.json.Decoder(TickerData)
_volatility = msgspec.json.Decoder(VolatilityData)
_encoder = msgspec.json.Encoder()


def expiry(code: str) -> str:
    """26MAR21 -> 210326 (DESIGN.md §2 writes dated expiries as YYMMDD)."""
    m = _EXPIRY.fullmatch(code)
    if not m or m.group(2) not in MONTHS:
        raise Unparseable("unknown instrument")
    return f"{m.group(3)}{MONTHS[m.group(2)]:02d}{int(m.group(1)):02d}"


def names(instrument: str) -> tuple[str, str]:
    """(symbol, market_type) of a Deribit instrument name.

    BTC-PERPETUAL is inverse: quoted and counted in USD, margined and settled in BTC, so its symbol is
    BTC-USD. Linear instruments name their quote after an underscore (BTC_USDC-PERPETUAL -> BTC-USDC).
    Futures keep their expiry (BTC-26MAR21 -> BTC-USD-210326); options keep expiry, strike and type
    (BTC-24SEP21-8000-P -> BTC-USD-210924-8000-P).
    """
    parts = instrument.split("-")
    base, _, quote = parts[0].partition("_")
    if not base:
        raise Unparseable("unknown instrument")
    pair = f"{base}-{quote or 'USD'}"
    if len(parts) == 1 and quote:
        return pair, "spot"
    if len(parts) == 2 and parts[1] == "PERPETUAL":
        return pair, "perpetual"
    if len(parts) == 2:
        return f"{pair}-{expiry(parts[1])}", "futures"
    if len(parts) == 4 and parts[3] in ("C", "P"):
        return f"{pair}-{expiry(parts[1])}-{parts[2]}-{parts[3]}", "options"
    raise Unparseable("unknown instrument")


def levels(rows: list[Level]) -> list[tuple[str, str]]:
    """Deribit [action, price, amount] rows as absolute (price, quantity) levels; delete -> quantity 0."""
    out = []
    for action, price, amount in rows:
        if action == "delete":
            out.append((plain_decimal(price), "0"))
        elif action in ("new", "change"):
            out.append((plain_decimal(price), plain_decimal(amount)))
        else:
            raise Unparseable("unknown book action")
    return out


def funding_time(timestamp: int) -> int:
    """The end of the 8-hour window (00:00, 08:00, 16:00 UTC) that holds `timestamp`.

    Deribit charges funding continuously and quotes the rate as an 8-hour rate ("To aid readability the
    funding rate is expressed as an 8-hour interest rate", support.deribit.com, Funding Specifications);
    there is no discrete settlement. Naming the next 8-hour boundary gives the record the same meaning as
    other venues' (the period the quoted rate covers) and keeps it stable within a window.
    """
    return (timestamp // FUNDING_WINDOW_MS + 1) * FUNDING_WINDOW_MS


class DeribitFeed(Feed):
    name = "deribit"
    exchange = "deribit"

    def __init__(self, depth: int = 400, book_interval_ms: int = 0) -> None:
        super().__init__(depth, book_interval_ms)
        self.books: dict[str, SyncedBook] = {}
        self.funding_sent: dict[str, tuple[str, int]] = {}
        self.interest_sent: dict[str, str] = {}
        self._names: dict[str, tuple[str, str]] = {}
        self._next_id = 0

    # -- plan --------------------------------------------------------------------------------------
    def instrument(self, symbol: str) -> str:
        """BTC-USDT / BTC-USD -> BTC-PERPETUAL, BTC-USDC -> BTC_USDC-PERPETUAL, BTC-USD-260327 -> BTC-27MAR26.

        Configs name markets in USDT (BTC-USDT); Deribit's main perpetual for BTC and ETH is the inverse
        USD one and for other coins the USDC one, so a USDT symbol maps to that (its records then say
        BTC-USD or SOL-USDC, what the contract is).
        """
        base, quote, *rest = symbol.split("-")
        if quote == "USDT":
            quote = "USD" if base in INVERSE_COINS else "USDC"
        root = base if quote == "USD" else f"{base}_{quote}"
        if not rest:
            return f"{root}-PERPETUAL"
        yymmdd = rest[0]
        month = list(MONTHS)[int(yymmdd[2:4]) - 1]
        return "-".join([root, f"{int(yymmdd[4:6])}{month}{yymmdd[:2]}", *rest[1:]])

    def subscriptions(self, symbols, data_types):
        channels = []
        for symbol in symbols:
            inst = self.instrument(symbol)
            if "trade" in data_types:
                channels.append(f"trades.{inst}.{INTERVAL}")
            if "orderbook" in data_types:
                channels.append(f"book.{inst}.{INTERVAL}")
            if "funding_rate" in data_types or "open_interest" in data_types:
                channels.append(f"ticker.{inst}.{INTERVAL}")
        if "volatility_index" in data_types:
            bases = {s.split("-")[0] for s in symbols}
            channels.extend(f"deribit_volatility_index.{c.lower()}_usd" for c in DVOL_CURRENCIES if c in bases)
        # Heartbeats let Deribit (and our idle watchdog) notice a dead connection; see _heartbeat_frame.
        frames = (self._request("public/set_heartbeat", {"interval": HEARTBEAT_S}),
                  self._request("public/subscribe", {"channels": channels}))
        return [Subscription(WS_PATH, frames)]

    def _request(self, method: str, params: dict) -> str:
        self._next_id += 1
        return _encoder.encode({"jsonrpc": "2.0", "id": self._next_id, "method": method,
                                "params": params}).decode()

    # -- parse -------------------------------------------------------------------------------------
    def _handle(self, data, source, received_at):
        msg = _message.decode(data)
        if msg.method == "subscription":
            note = _notification.decode(msg.params)
            return self._notification(note.channel, note.data, received_at)
        if msg.method == "heartbeat":
            self.control_frame = True
            if _heartbeat.decode(msg.params).type == "test_request":
                # Deribit closes the connection unless a test_request is answered with public/test.
                self._outgoing.append(self._request("public/test", {}))
            return []
        if msg.id is not None:
            self.control_frame = True
            if msg.error:
                raise Unparseable("error response")
            return []  # the answer to one of our requests (subscribe, set_heartbeat, test)
        raise Unparseable("unknown message")

    def _notification(self, channel: str, data: msgspec.Raw, received_at: int) -> list[Record]:
        kind = channel.split(".", 1)[0]
        out: list[Record] = []
        if kind == "trades":
            for row in _trades.decode(data):
                out.append(self._trade(row, received_at))
        elif kind == "book":
            self._book_update(out, channel, _book.decode(data), received_at)
        elif kind == "ticker":
            self._ticker(out, _ticker.decode(data), received_at)
        elif kind == "deribit_volatility_index":
            out.append(self._volatility(_volatility.decode(data), received_at))
        else:
            raise Unparseable("unknown channel")
        return out

    def _name(self, instrument: str) -> tuple[str, str]:
        found = self._names.get(instrument)
        if found is None:
            found = self._names[instrument] = names(instrument)
        return found

    def _trade(self, row: TradeRow, received_at: int) -> Trade:
        if row.direction not in SIDES:
            raise Unparseable("unknown side")
        symbol, market_type = self._name(row.instrument_name)
        # amount: USD for perpetuals and inverse futures, the coin for options and linear instruments.
        return Trade(exchange="deribit", market_type=market_type, symbol=symbol, instrument=row.instrument_name,
                     timestamp=row.timestamp, received_at=received_at, trade_id=row.trade_id,
                     price=plain_decimal(row.price), quantity=plain_decimal(row.amount), side=row.direction)

    def _ticker(self, out: list[Record], t: TickerData, received_at: int) -> None:
        """Funding and open interest, each only when it differs from the last one sent for the instrument.

        The ticker arrives every 100 ms with mostly unchanged values; one row per change keeps the tables
        to what actually happened (the 100 ms repeats would be 864k rows a day per instrument).
        """
        inst = t.instrument_name
        symbol, market_type = self._name(inst)
        mark = plain_decimal(t.mark_price) if t.mark_price is not None else None
        index = plain_decimal(t.index_price) if t.index_price is not None else None
        if t.current_funding is not None:
            # current_funding is the rate in force now, quoted per 8 hours like other venues' rates;
            # funding_8h is what was paid over the past 8 hours (a trailing average).
            # funding_time is part of the key: every 8-hour window gets a record even at an unchanged rate
            funding = (plain_decimal(t.current_funding), funding_time(t.timestamp))
            if self.funding_sent.get(inst) != funding:
                self.funding_sent[inst] = funding
                out.append(FundingRate(exchange="deribit", market_type=market_type, symbol=symbol, instrument=inst,
                                       timestamp=t.timestamp, received_at=received_at, funding_rate=funding[0],
                                       funding_time=funding[1], mark_price=mark, index_price=index))
        if t.open_interest is not None:
            oi = plain_decimal(t.open_interest)
            if self.interest_sent.get(inst) != oi:
                self.interest_sent[inst] = oi
                out.append(OpenInterest(exchange="deribit", market_type=market_type, symbol=symbol, instrument=inst,
                                        timestamp=t.timestamp, received_at=received_at, open_interest=oi,
                                        open_interest_value=self._interest_value(inst, market_type, oi, mark,
                                                                                 self._inverse(inst))))

    @staticmethod
    def _interest_value(instrument: str, market_type: str, oi: str, mark: str | None,
                        inverse: bool | None = None) -> str | None:
        """Open interest in the quote currency.

        Deribit counts open interest of perpetuals and inverse futures in USD (already the quote), and of
        linear instruments in the coin (times the mark price gives the quote). Option marks are premiums,
        not prices of the coin, so options have no value here. The instrument list says which contracts
        are inverse (`inverse`, from "instrument_type": "reversed"); without it, the naming rule does
        (linear instruments name their quote after an underscore, BTC_USDC-PERPETUAL).
        """
        if market_type == "options":
            return None
        if inverse is None:
            inverse = "_" not in instrument.split("-")[0]
        if inverse:
            return oi
        return multiply(oi, mark) if mark is not None else None

    def _inverse(self, instrument: str) -> bool | None:
        info = self.instrument_info.get(instrument)
        return info.inverse if info is not None else None

    @staticmethod
    def _volatility(v: VolatilityData, received_at: int) -> VolatilityIndex:
        # DVOL is the currency's 30-day implied volatility from its options: the symbol is the currency
        # (DESIGN.md §2) and the market type "options", the market it is computed from.
        return VolatilityIndex(exchange="deribit", market_type="options", symbol=v.index_name.split("_")[0].upper(),
                               instrument=v.index_name, timestamp=v.timestamp, received_at=received_at,
                               value=plain_decimal(v.volatility))

    # -- order book ----------------------------------------------------------------------------------
    def _book_update(self, out: list[Record], channel: str, d: BookData, received_at: int) -> None:
        inst = d.instrument_name
        chain = self.books.get(inst)
        if chain is None:
            chain = self.books[inst] = SyncedBook()
        symbol, market_type = self._name(inst)
        snapshot = d.type == "snapshot"
        if not snapshot:
            if d.type != "change":
                raise Unparseable("unknown book type")
            if not chain.live or d.change_id <= chain.sequence:
                return  # waiting for the snapshot after a break, or a change already applied
            if d.prev_change_id != chain.sequence:
                lost_to = d.prev_change_id if d.prev_change_id and d.prev_change_id > chain.sequence else None
                self._break_book(out, chain, channel, inst, symbol, market_type, "sequence", chain.sequence + 1,
                                 lost_to, d.timestamp, received_at)
                return
        bids, asks = levels(d.bids), levels(d.asks)
        try:
            (chain.book.load if snapshot else chain.book.update)(bids, asks)
        except ValueError:  # a level the book refuses (not a plain decimal): it is broken until a new snapshot
            self.errors["invalid level"] += 1
            self._break_book(out, chain, channel, inst, symbol, market_type, "invalid",
                             None if snapshot else chain.sequence + 1, d.change_id, d.timestamp, received_at)
            return
        if snapshot:
            chain.live, chain.resubscribing = True, False
        chain.sequence = d.change_id
        chain.last_time = d.timestamp
        self._book_changed(out, inst, symbol, market_type, chain.book, d.change_id, d.timestamp, received_at)

    def _resubscribe(self, channel: str, chain: SyncedBook) -> None:
        """A new subscription is the only way to get a fresh snapshot from Deribit."""
        if not chain.resubscribing:
            chain.resubscribing = True
            self._outgoing.append(self._request("public/unsubscribe", {"channels": [channel]}))
            self._outgoing.append(self._request("public/subscribe", {"channels": [channel]}))

    # -- connection events ---------------------------------------------------------------------------
    def on_disconnect(self, at_ms: int) -> list[Record]:
        out: list[Record] = []
        for inst, chain in self.books.items():
            if chain.live:
                symbol, market_type = self._name(inst)
                out.append(self._gap(inst, symbol, market_type, "orderbook", "disconnect", chain.last_time, at_ms,
                                     at_ms, chain.sequence + 1, None))
            chain.reset()
            chain.resubscribing = False
        self._outgoing.clear()  # frames meant for the lost connection; the new one subscribes afresh
        return out
