"""Bybit v5 spot (/bybit_spot, WS /v5/public/spot) and USDT perpetuals (/bybit_linear, /v5/public/linear).

Shapes follow shared/fixtures/exchanges/bybit (spot keys as in the spot recordings, linear keys as in
the 2025 linear recording). `orderbook.{depth}.{symbol}` sends a snapshot then deltas with u + 1 per
message and an increasing cross sequence `seq`; each depth is a view of one book, so levels that
enter or leave the top N show up as inserts and deletes. `tickers` deltas carry only changed fields.
"""

from __future__ import annotations

import uuid

import orjson

from marketprism.sim import bybit_rest
from marketprism.sim.bybit_rest import OI_NOTIONAL_USD, REST_DEPTH
from marketprism.sim.feed import Conn, Event, Feed, Options
from marketprism.sim.market import Instrument, Spec, base_price, base_size, fmt_float, price_decimals
from marketprism.sim.series import Series, now_ms

WIDTH = 1000
DEPTHS = {"bybit_spot": (1, 50, 200, 1000), "bybit_linear": (1, 50, 200, 500, 1000)}
TICK_DIRECTION = {1: "PlusTick", 0: "ZeroPlusTick", -1: "MinusTick"}


def bybit_spec(base: str, linear: bool) -> Spec:
    if linear:
        if base == "BTC":
            return Spec(2, 10, 3, 1, zero="0", mean_size=base_size(base))
        dp = {"ETH": 2}.get(base) or price_decimals(base_price(base), 5)
        return Spec(dp, 1, 2 if base_price(base) > 100 else 0, 1, zero="0", mean_size=base_size(base))
    dp = {"BTC": 2, "ETH": 2}.get(base) or price_decimals(base_price(base), 5)
    return Spec(dp, 1, {"BTC": 6, "ETH": 5}.get(base, 2), 1, fixed=False, zero="0", mean_size=base_size(base))


class BybitFeed(Feed):
    def __init__(self, name: str, opts: Options, series: Series):
        super().__init__(name, opts, series)
        self.linear = name == "bybit_linear"
        self.category = "linear" if self.linear else "spot"
        self.ws_paths = (f"/v5/public/{self.category}",)
        for symbol in opts.symbols:
            base, quote = symbol.split("-")
            inst = Instrument(base + quote, symbol, bybit_spec(base, self.linear), self.rng, WIDTH,
                              "swap" if self.linear else "spot")
            inst.agg_id = self.rng.randrange(10 ** 9, 10 ** 11)   # cross sequence, shared by the symbol's topics
            self.instruments[inst.id] = inst
            self.new_view(inst, REST_DEPTH[name])
        self.tickers: dict[str, dict] = {}
        if self.linear:
            self.every(0.1, self.ticker_events)
            self.every(0.5, self.liquidation_events)

    def rest_routes(self):
        return bybit_rest.routes(self)

    def error_body(self, status: int) -> object:
        return bybit_rest.error_body(status)

    def new_view(self, inst: Instrument, depth: int):
        if depth not in inst.views:
            inst.view(depth).seq = self.rng.randrange(10 ** 6, 10 ** 8)
        return inst.views[depth]

    # ---- subscriptions ---------------------------------------------------------------------------
    def on_text(self, conn: Conn, text: str) -> None:
        try:
            req = orjson.loads(text)
            op = req["op"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            conn.send({"success": False, "ret_msg": "error:request not json", "conn_id": conn.id, "op": ""})
            return
        rid = str(req.get("req_id", ""))
        if op == "ping":
            conn.send({"success": True, "ret_msg": "pong", "conn_id": conn.id, "req_id": rid, "op": "ping"})
            return
        args = req.get("args") or []
        bad = [topic for topic in args if self.parse_topic(topic) is None]
        if op not in ("subscribe", "unsubscribe") or bad:
            msg = f"error:handler not found,topic:{bad[0]}" if bad else f"error:unknown op {op}"
            conn.send({"success": False, "ret_msg": msg, "conn_id": conn.id, "req_id": rid, "op": op})
            return
        conn.send({"success": True, "ret_msg": "", "conn_id": conn.id, "req_id": rid, "op": op})
        for topic in args:
            if op == "unsubscribe":
                conn.unsubscribe(topic)
            elif conn.subscribe(topic):
                self.on_subscribed(conn, topic)

    def parse_topic(self, topic: object) -> tuple | None:
        if not isinstance(topic, str):
            return None
        parts = topic.split(".")
        inst = self.instruments.get(parts[-1])
        if inst is None:
            return None
        if len(parts) == 3 and parts[0] == "orderbook" and parts[1].isdigit() \
                and int(parts[1]) in DEPTHS[self.name]:
            return "orderbook", inst, int(parts[1])
        if len(parts) == 2 and (parts[0] == "publicTrade" or
                                (self.linear and parts[0] in ("tickers", "allLiquidation"))):
            return parts[0], inst, 0
        return None

    def on_subscribed(self, conn: Conn, topic: str) -> None:
        kind, inst, depth = self.parse_topic(topic)
        ms = now_ms()
        if kind == "orderbook":
            view = self.new_view(inst, depth)
            conn.write([self.book_frame(topic, inst, view, "snapshot", ms, None)])
            self.count("orderbook")
        elif kind == "tickers":
            state = self.tickers.get(inst.id) if self.wanted_by_others(conn, topic) else None
            if state is None:
                state = self.tickers[inst.id] = self.ticker_state(inst, ms)
            inst.agg_id += 1
            conn.write([self.ticker_frame(topic, "snapshot", state, inst.agg_id, ms)])
            self.count("funding_rate+open_interest")

    def wanted_by_others(self, conn: Conn, topic: str) -> bool:
        return any(topic in c.subs for c in self.conns if c is not conn)

    # ---- frames ---------------------------------------------------------------------------------
    def book_frame(self, topic: str, inst: Instrument, view, kind: str, ms: int, diff) -> bytes:
        spec = inst.spec
        if diff is None:
            b = [[spec.price(t), spec.qty(q)] for t, q in view.levels(True)]
            a = [[spec.price(t), spec.qty(q)] for t, q in view.levels(False)]
        else:
            b = [[spec.price(t), spec.qty(q)] for t, q, _ in diff[0]]
            a = [[spec.price(t), spec.qty(q)] for t, q, _ in diff[1]]
        data = {"s": inst.id, "b": b, "a": a, "u": view.seq, "seq": inst.agg_id}
        if self.linear:
            return orjson.dumps({"topic": topic, "type": kind, "ts": ms, "data": data, "cts": ms - 1})
        return orjson.dumps({"topic": topic, "ts": ms, "type": kind, "data": data})

    def depth_events(self, inst: Instrument, diff, ms: int) -> list[Event]:
        out = []
        inst.agg_id += 1 + self.rng.randrange(30)
        for depth, view in inst.views.items():
            vdiff = view.diff(diff)
            if not vdiff[0] and not vdiff[1]:
                continue
            view.seq += 1
            topic = f"orderbook.{depth}.{inst.id}"
            if self.wanted(topic) and not self.skipped(inst):
                out.append((topic, self.book_frame(topic, inst, view, "delta", ms, vdiff), "orderbook", 1))
        return out

    def trade_events(self, inst: Instrument, ms: int) -> list[Event]:
        trades = []
        count = 1 + (self.rng.random() < 0.3) + (self.rng.random() < 0.1)
        topic = f"publicTrade.{inst.id}"
        if not self.wanted(topic):
            for _ in range(count):
                inst.trade()
            inst.agg_id += count
            return []
        for _ in range(count):
            last_tick = inst.last_trade[1]
            buy, tick, lots, tid = inst.trade()
            side, p, v = "Buy" if buy else "Sell", inst.spec.price(tick), inst.spec.qty(lots)
            inst.agg_id += 1
            if self.linear:
                direction = TICK_DIRECTION[(tick > last_tick) - (tick < last_tick)]
                trades.append({"T": ms, "s": inst.id, "S": side, "v": v, "p": p, "L": direction,
                               "i": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)), "BT": False,
                               "RPI": False, "seq": inst.agg_id})
            else:
                trades.append({"i": str(2 * 10 ** 18 + tid), "T": ms, "p": p, "v": v, "S": side, "s": inst.id,
                               "BT": False})
        if self.linear:
            msg = {"topic": topic, "type": "snapshot", "ts": ms, "data": trades}
        else:
            msg = {"topic": topic, "ts": ms, "type": "snapshot", "data": trades}
        return [(topic, orjson.dumps(msg), "trade", len(trades))]

    def ticker_state(self, inst: Instrument, ms: int) -> dict:
        spec, s = inst.spec, self.series
        second = s.boundary(ms, 1000)
        mark = inst.mid() * (1 + s.premium(inst.id, second))
        index = inst.mid() * (1 + s.premium(inst.id + ":i", second) / 4)
        oi = s.open_interest(inst.id, second, OI_NOTIONAL_USD / base_price(inst.base))
        last = spec.price(inst.last_trade[1])
        (bt, bq), (at, aq) = inst.book.best_bid(), inst.book.best_ask()
        prev = base_price(inst.base) * (1 - 0.02 * s.wave(inst.id + ":chg", second, 86_400_000))
        pd = spec.price_dp
        return {"symbol": inst.id, "tickDirection": "PlusTick" if inst.last_trade[0] else "MinusTick",
                "price24hPcnt": fmt_float(mark / prev - 1, 6), "lastPrice": last,
                "prevPrice24h": fmt_float(prev, pd), "highPrice24h": fmt_float(max(prev, mark) * 1.01, pd, True),
                "lowPrice24h": fmt_float(min(prev, mark) * 0.99, pd, True), "prevPrice1h": fmt_float(prev, pd),
                "markPrice": fmt_float(mark, pd), "indexPrice": fmt_float(index, pd),
                "openInterest": fmt_float(oi, spec.qty_dp), "openInterestValue": fmt_float(oi * mark, 2),
                "turnover24h": fmt_float(oi * mark * 0.7, 4), "volume24h": fmt_float(oi * 0.7, 4),
                "fundingIntervalHour": "8", "fundingCap": "0.005", "nextFundingTime": str(s.next_funding(ms)),
                "fundingRate": fmt_float(s.funding_rate(inst.id, s.boundary(ms, 60_000)), 6, False),
                "bid1Price": spec.price(bt), "bid1Size": spec.qty(bq), "ask1Price": spec.price(at),
                "ask1Size": spec.qty(aq), "preOpenPrice": "", "preQty": "", "curPreListingPhase": ""}

    def ticker_frame(self, topic: str, kind: str, data: dict, cs: int, ms: int) -> bytes:
        return orjson.dumps({"topic": topic, "type": kind, "data": data, "cs": cs, "ts": ms})

    def ticker_events(self, ms: int) -> list[Event]:
        out = []
        for inst in self.instruments.values():
            topic = f"tickers.{inst.id}"
            old = self.tickers.get(inst.id)
            if old is None or not self.wanted(topic):
                continue
            new = self.ticker_state(inst, ms)
            delta = {k: v for k, v in new.items() if old.get(k) != v}
            if not delta:
                continue
            self.tickers[inst.id] = new
            types = [t for k, t in (("fundingRate", "funding_rate"), ("openInterest", "open_interest")) if k in delta]
            inst.agg_id += 1
            frame = self.ticker_frame(topic, "delta", {"symbol": inst.id, **delta}, inst.agg_id, ms)
            out.append((topic, frame, "+".join(types) or "ticker", 1))
        return out

    def liquidation_events(self, ms: int) -> list[Event]:
        out = []
        for inst in self.instruments.values():
            if self.rng.random() > 0.3:
                continue
            buy = self.rng.random() < 0.5     # Buy: a long position was liquidated (Bybit's convention)
            t = inst.book.best_bid()[0] - 3 if buy else inst.book.best_ask()[0] + 3
            lots = 1 + int(self.rng.expovariate(1 / inst.spec.mean_lots()))
            topic = f"allLiquidation.{inst.id}"
            row = {"T": ms - 1, "s": inst.id, "S": "Buy" if buy else "Sell", "v": inst.spec.qty(lots),
                   "p": inst.spec.price(t)}
            msg = {"topic": topic, "type": "snapshot", "ts": ms, "data": [row]}
            out.append((topic, orjson.dumps(msg), "liquidation", 1))
        return out
