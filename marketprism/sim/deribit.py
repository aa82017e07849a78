"""Deribit v2 JSON-RPC (/deribit): BTC-PERPETUAL, ETH-PERPETUAL and the DVOL indices.

Shapes follow shared/fixtures/exchanges/deribit. Notifications arrive as
{"jsonrpc":"2.0","method":"subscription","params":{"channel":..,"data":..}}; `book` sends a snapshot
then changes whose prev_change_id is the previous change_id. Numbers are JSON numbers, as on Deribit.
public/set_heartbeat works as on Deribit (interval >= 10 s, test_request left unanswered closes the
socket), except that --speed shortens the interval like every other cadence.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from marketprism.sim.feed import Conn, Event, Feed, Options, RestError
from marketprism.sim.market import Instrument, Spec, base_price, base_size, price_decimals
from marketprism.sim.series import Series, now_ms

WIDTH = 400
INTERVALS = ("100ms", "raw", "agg2")
OI_NOTIONAL_USD = 1e9
PERPETUAL_EXPIRY = 32503708800000
NOTIFY = b'{"jsonrpc":"2.0","method":"subscription","params":{"channel":"'


def deribit_spec(base: str) -> Spec:
    """Prices in USD with Deribit's ticks; amounts in USD, in contracts of 10 (BTC) or 1 (others)."""
    usd = base_size(base) * base_price(base)
    if base == "BTC":
        return Spec(1, 5, 0, 10, mean_size=usd)
    if base == "ETH":
        return Spec(2, 5, 0, 1, mean_size=usd)
    return Spec(price_decimals(base_price(base), 5), 1, 0, 1, mean_size=usd)


def envelope(result: object, started_ns: int, rid: object = None) -> dict:
    """A JSON-RPC answer with Deribit's timing fields (microseconds)."""
    us_in = started_ns // 1000
    us_out = max(us_in + 1, now_ms() * 1000)
    out: dict = {"jsonrpc": "2.0"}
    if rid is not None:
        out["id"] = rid
    out.update(result if isinstance(result, dict) and "error" in result else {"result": result})
    out.update({"usIn": us_in, "usOut": us_out, "usDiff": us_out - us_in, "testnet": False})
    return out


def invalid(param: str, reason: str = "must be one of the listed values") -> RestError:
    return RestError(400, {"error": {"message": "Invalid params", "data": {"reason": reason, "param": param},
                                     "code": -32602}})


class DeribitFeed(Feed):
    ws_paths = ("/ws/api/v2",)

    def __init__(self, name: str, opts: Options, series: Series):
        super().__init__(name, opts, series)
        for base in dict.fromkeys(s.split("-")[0] for s in opts.symbols):
            inst = Instrument(f"{base}-PERPETUAL", f"{base}-USD", deribit_spec(base), self.rng, WIDTH, "swap")
            inst.view(WIDTH).seq = self.rng.randrange(10 ** 9, 10 ** 11)
            self.instruments[inst.id] = inst
        self.indices = {f"{inst.base.lower()}_usd": inst for inst in self.instruments.values()}
        self.every(0.1, self.ticker_events)
        self.every(1.0, self.volatility_events)

    # ---- JSON-RPC -------------------------------------------------------------------------------
    def methods(self) -> dict:
        return {"public/get_order_book": self.get_order_book, "public/get_instruments": self.get_instruments,
                "public/get_time": lambda p: now_ms(), "public/ticker": self.ticker_result,
                "public/test": lambda p: {"version": "1.2.26"}, "public/hello": lambda p: {"version": "1.2.26"}}

    def on_text(self, conn: Conn, text: str) -> None:
        started = now_ms() * 1_000_000
        try:
            req = orjson.loads(text)
            method, params, rid = req["method"], req.get("params") or {}, req.get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            conn.send(envelope({"error": {"message": "Parse error", "code": -32700}}, started))
            return
        if method == "public/test":
            conn.state["awaiting_test"] = False
        try:
            result = self.ws_call(conn, method, params)
        except RestError as exc:
            result = exc.body
        conn.send(envelope(result, started, rid))
        if method == "public/subscribe" and isinstance(result, list):
            self.send_snapshots(conn, result)

    def ws_call(self, conn: Conn, method: str, params: dict) -> object:
        if method == "public/subscribe":
            return [ch for ch in params.get("channels", []) if self.add_channel(conn, ch)]
        if method == "public/unsubscribe":
            for ch in params.get("channels", []):
                parsed = self.parse_channel(ch)
                if parsed:
                    conn.unsubscribe(parsed[0], self.wrap(ch))
            return [ch for ch in params.get("channels", [])]
        if method == "public/unsubscribe_all":
            conn.unsubscribe_all()
            return "ok"
        if method == "public/set_heartbeat":
            interval = params.get("interval")
            if not isinstance(interval, (int, float)) or interval < 10:
                raise invalid("interval", "interval must be at least 10 seconds")
            conn.close_tasks()
            conn.state["awaiting_test"] = False
            conn.tasks = [asyncio.ensure_future(self.heartbeat(conn, float(interval)))]
            return "ok"
        if method == "public/disable_heartbeat":
            conn.close_tasks()
            return "ok"
        fn = self.methods().get(method)
        if fn is None:
            raise RestError(400, {"error": {"message": "Method not found", "code": -32601}})
        return fn(params)

    async def heartbeat(self, conn: Conn, interval: float) -> None:
        """Deribit closes a connection whose client left a test_request unanswered."""
        period = max(0.05, interval / self.opts.speed)
        while conn.alive():
            await asyncio.sleep(period)
            if conn.state.get("awaiting_test"):
                await conn.ws.close(code=1000, message=b"heartbeat test_request not answered")
                return
            conn.state["awaiting_test"] = True
            conn.send({"jsonrpc": "2.0", "method": "heartbeat", "params": {"type": "test_request"}})

    @staticmethod
    def wrap(channel: str) -> tuple[bytes, bytes]:
        return NOTIFY + channel.encode() + b'","data":', b"}}"

    def parse_channel(self, channel: str) -> tuple[tuple, str] | None:
        parts = channel.split(".")
        if len(parts) == 2 and parts[0] == "deribit_volatility_index" and parts[1] in self.indices:
            return ("dvol", parts[1]), parts[1]
        if len(parts) == 3 and parts[0] in ("trades", "book", "ticker") and parts[2] in INTERVALS \
                and parts[1] in self.instruments:
            return (parts[0], parts[1]), parts[1]
        return None

    def add_channel(self, conn: Conn, channel: str) -> bool:
        parsed = self.parse_channel(channel)
        if parsed is None:
            return False
        conn.subscribe(parsed[0], self.wrap(channel))
        return True

    def send_snapshots(self, conn: Conn, channels: list[str]) -> None:
        for ch in channels:
            key, name = self.parse_channel(ch)
            if key[0] == "book":
                data = orjson.dumps(self.book_snapshot(self.instruments[name], now_ms()))
                pre, post = self.wrap(ch)
                conn.write([pre + data + post])
                self.count("orderbook")

    # ---- frames ---------------------------------------------------------------------------------
    def book_snapshot(self, inst: Instrument, ms: int) -> dict:
        view, spec = inst.view(WIDTH), inst.spec
        return {"type": "snapshot", "timestamp": ms, "instrument_name": inst.id, "change_id": view.seq,
                "bids": [["new", spec.price_num(t), spec.qty_num(q)] for t, q in view.levels(True)],
                "asks": [["new", spec.price_num(t), spec.qty_num(q)] for t, q in view.levels(False)]}

    def depth_events(self, inst: Instrument, diff, ms: int) -> list[Event]:
        if not diff[0] and not diff[1]:
            return []
        view, spec = inst.view(WIDTH), inst.spec
        prev = view.seq
        view.seq = prev + 1 + self.rng.randrange(40)
        if not self.wanted(("book", inst.id)):
            return []

        def row(t: int, q: int, old: int) -> list:
            action = "new" if old == 0 else ("delete" if q == 0 else "change")
            return [action, spec.price_num(t), spec.qty_num(q)]
        data = {"type": "change", "timestamp": ms, "prev_change_id": prev, "instrument_name": inst.id,
                "change_id": view.seq, "bids": [row(*c) for c in diff[0]], "asks": [row(*c) for c in diff[1]]}
        return [] if self.skipped(inst) else [(("book", inst.id), orjson.dumps(data), "orderbook", 1)]

    def trade_events(self, inst: Instrument, ms: int) -> list[Event]:
        trades = []
        count = 1 + (self.rng.random() < 0.3) + (self.rng.random() < 0.1)
        if not self.wanted(("trades", inst.id)):
            for _ in range(count):
                inst.trade()
            return []
        index, mark = self.index_mark(inst, ms)
        for _ in range(count):
            last_price = inst.last_trade[1]
            buy, tick, lots, tid = inst.trade()
            inst.agg_id += 1
            direction = 0 if tick > last_price else 2 if tick < last_price else 1
            trades.append({"trade_seq": inst.agg_id, "trade_id": str(tid), "timestamp": ms,
                           "tick_direction": direction, "price": inst.spec.price_num(tick), "mark_price": mark,
                           "instrument_name": inst.id, "index_price": index, "direction": "buy" if buy else "sell",
                           "amount": inst.spec.qty_num(lots)})
        return [(("trades", inst.id), orjson.dumps(trades), "trade", len(trades))]

    def index_mark(self, inst: Instrument, ms: int) -> tuple[float, float]:
        mid = inst.mid()
        index = round(mid * (1 + self.series.premium(inst.id + ":i", ms) / 4), 2)
        return index, round(mid * (1 + self.series.premium(inst.id, ms)), 2)

    def ticker(self, inst: Instrument, ms: int) -> dict:
        spec, s = inst.spec, self.series
        index, mark = self.index_mark(inst, ms)
        (bt, bq), (at, aq) = inst.book.best_bid(), inst.book.best_ask()
        funding = round(s.funding_rate(inst.id, ms) * 0.3, 8)
        oi = round(s.open_interest(inst.id, ms, OI_NOTIONAL_USD) / spec.lot) * spec.lot
        last = spec.price_num(inst.last_trade[1])
        return {"timestamp": ms,
                "stats": {"volume_usd": round(oi * 0.8, 1), "volume": round(oi * 0.8 / mark, 8),
                          "price_change": round(s.wave(inst.id + ":chg", ms, 86_400_000) * 3, 4),
                          "low": round(mark * 0.97, 1), "high": round(mark * 1.03, 1)},
                "state": "open", "settlement_price": round(index * 0.999, 2), "open_interest": oi,
                "min_price": round(mark * 0.985, 2), "max_price": round(mark * 1.015, 2), "mark_price": mark,
                "last_price": last, "instrument_name": inst.id, "index_price": index,
                "funding_8h": round(funding * 8, 8), "estimated_delivery_price": index, "current_funding": funding,
                "best_bid_price": spec.price_num(bt), "best_bid_amount": spec.qty_num(bq),
                "best_ask_price": spec.price_num(at), "best_ask_amount": spec.qty_num(aq)}

    def ticker_events(self, ms: int) -> list[Event]:
        return [(("ticker", i.id), orjson.dumps(self.ticker(i, ms)), "funding_rate+open_interest", 1)
                for i in self.instruments.values() if self.wanted(("ticker", i.id))]

    def volatility_events(self, ms: int) -> list[Event]:
        return [(("dvol", name), orjson.dumps({"volatility": round(self.series.volatility(name, ms), 2),
                                               "timestamp": ms, "index_name": name}), "volatility_index", 1)
                for name in self.indices]

    # ---- REST -----------------------------------------------------------------------------------
    def rest_routes(self):
        return [(f"/api/v2/{method}", self.rest_method(fn)) for method, fn in self.methods().items()]

    def rest_method(self, fn):
        def handler(request: web.Request) -> dict:
            started = now_ms() * 1_000_000
            try:
                return envelope(fn(dict(request.query)), started)
            except RestError as exc:
                raise RestError(exc.status, envelope(exc.body, started)) from None
        return handler

    def error_body(self, status: int) -> object:
        if status == 429:
            return envelope({"error": {"message": "too_many_requests", "code": 10028}}, now_ms() * 1_000_000)
        return envelope({"error": {"message": "internal_server_error", "code": 11094}}, now_ms() * 1_000_000)

    def instrument(self, params: dict) -> Instrument:
        inst = self.instruments.get(params.get("instrument_name", ""))
        if inst is None:
            raise invalid("instrument_name", "instrument not found")
        return inst

    def get_order_book(self, params: dict) -> dict:
        inst, ms = self.instrument(params), now_ms()
        try:
            depth = max(1, min(10000, int(params.get("depth", 20))))
        except (TypeError, ValueError):
            raise invalid("depth") from None
        t = self.ticker(inst, ms)
        spec, view = inst.spec, inst.view(WIDTH)
        bids = [[spec.price_num(p), spec.qty_num(q)] for p, q in view.levels(True, depth)]
        asks = [[spec.price_num(p), spec.qty_num(q)] for p, q in view.levels(False, depth)]
        stats = {k: t["stats"][k] for k in ("volume", "price_change", "low", "high")}
        self.count_served("orderbook")
        return {"timestamp": ms, "stats": stats, "state": "open", "settlement_price": t["settlement_price"],
                "open_interest": t["open_interest"], "min_price": t["min_price"], "max_price": t["max_price"],
                "mark_price": t["mark_price"], "last_price": t["last_price"], "instrument_name": inst.id,
                "index_price": t["index_price"], "funding_8h": t["funding_8h"],
                "current_funding": t["current_funding"], "change_id": view.seq, "bids": bids,
                "best_bid_price": bids[0][0] if bids else 0.0, "best_bid_amount": bids[0][1] if bids else 0.0,
                "best_ask_price": asks[0][0] if asks else 0.0, "best_ask_amount": asks[0][1] if asks else 0.0,
                "asks": asks}

    def ticker_result(self, params: dict) -> dict:
        self.count_served("funding_rate")
        return self.ticker(self.instrument(params), now_ms())

    def get_instruments(self, params: dict) -> list:
        currency = params.get("currency", "any").upper()
        kind = params.get("kind", "future")
        if kind not in ("future", "option", "spot", "future_combo", "option_combo"):
            raise invalid("kind")
        return [self.instrument_info(i) for i in self.instruments.values()
                if kind == "future" and currency in ("ANY", i.base)]

    def instrument_info(self, inst: Instrument) -> dict:
        spec = inst.spec
        return {"tick_size": spec.price_num(1), "taker_commission": 0.0005, "settlement_period": "perpetual",
                "settlement_currency": inst.base, "rfq": False, "quote_currency": "USD",
                "price_index": f"{inst.base.lower()}_usd", "min_trade_amount": spec.qty_num(1), "max_leverage": 50,
                "maker_commission": 0.0, "kind": "future", "is_active": True, "instrument_name": inst.id,
                "instrument_id": 210838 + len(inst.base), "instrument_type": "reversed",
                "future_type": "reversed", "expiration_timestamp": PERPETUAL_EXPIRY,
                "creation_timestamp": 1534242287000, "counter_currency": "USD", "contract_size": spec.qty_num(1),
                "block_trade_tick_size": spec.price_num(1), "block_trade_min_trade_amount": 200000,
                "block_trade_commission": 0.00025, "base_currency": inst.base}
