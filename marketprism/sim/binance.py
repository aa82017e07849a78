"""Binance spot (/binance_spot) and USD-M futures (/binance_usdm).

Shapes follow the recordings in shared/fixtures/exchanges/binance_spot and binance_usdm: combined
streams wrap each payload as {"stream":..,"data":..}; /ws/<stream> sends it bare. Spot diffs chain
by U == previous u + 1 and a REST snapshot's lastUpdateId is the last u sent. USD-M diffs carry
pu == previous u while U jumps (its update ids are shared across symbols), so a client that checks U
instead of pu breaks exactly as it would live; a REST snapshot's lastUpdateId is the next event's U.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from marketprism.sim.feed import Conn, Event, Feed, Options, RestError, query_int
from marketprism.sim.market import Instrument, Spec, base_price, base_size, fmt, fmt_float, price_decimals
from marketprism.sim.series import FUNDING_MS, PERIOD_MS, Series, now_ms

WIDTH = 1000
OI_NOTIONAL_USD = 5e9
LSR_KEYS = {"topLongShortPositionRatio": ("top_pos", "lsr_top_position"),
            "topLongShortAccountRatio": ("top_acc", "lsr_top_account"),
            "globalLongShortAccountRatio": ("global", "lsr_all_account")}


def spot_spec(base: str) -> Spec:
    tick_dp = {"BTC": 2, "ETH": 2}.get(base) or min(8, price_decimals(base_price(base)))
    lot_dp = {"BTC": 5, "ETH": 4}.get(base, 2)
    return Spec(8, 10 ** (8 - tick_dp), 8, 10 ** (8 - lot_dp), mean_size=base_size(base))


def usdm_spec(base: str) -> Spec:
    if base == "BTC":
        return Spec(2, 10, 3, 1, mean_size=base_size(base))
    dp = min(7, price_decimals(base_price(base), 6))
    return Spec(dp, 1, 3 if base_price(base) > 100 else 0, 1, mean_size=base_size(base))


class BinanceFeed(Feed):
    ws_paths = ("/stream", "/ws", "/ws/{streams:.*}")

    def __init__(self, name: str, opts: Options, series: Series):
        super().__init__(name, opts, series)
        self.usdm = name == "binance_usdm"
        spec = usdm_spec if self.usdm else spot_spec
        for symbol in opts.symbols:
            base, quote = symbol.split("-")
            inst = Instrument(base + quote, symbol, spec(base), self.rng, WIDTH, "swap" if self.usdm else "spot")
            view = inst.view(WIDTH)
            view.seq = self.rng.randrange(10 ** 9, 5 * 10 ** 10)
            view.cross = view.seq + 1 + (self.rng.randrange(50) if self.usdm else 0)   # the next diff's U
            self.instruments[inst.id] = inst
        if self.usdm:
            self.every(1.0, lambda ms: self.mark_events(ms, "markPrice1s"))
            self.every(3.0, lambda ms: self.mark_events(ms, "markPrice"))
            # Binance pushes at most one liquidation per symbol per second, whatever the speed.
            self._timers.append([1.0, 0.0, self.liquidation_events])

    # ---- streams --------------------------------------------------------------------------------
    def parse_stream(self, name: str) -> object | None:
        if name == "!forceOrder@arr" and self.usdm:
            return ("forceOrder", "*")
        sym, _, kind = name.partition("@")
        sym = sym.upper()
        if sym not in self.instruments:
            return None
        kinds = {"trade": "trade", "aggTrade": "aggTrade", "depth": "depth", "depth@100ms": "depth"}
        if self.usdm:
            kinds.update({"depth@0ms": "depth", "depth@250ms": "depth", "depth@500ms": "depth",
                          "markPrice": "markPrice", "markPrice@1s": "markPrice1s", "forceOrder": "forceOrder"})
        return (kinds[kind], sym) if kind in kinds else None

    def add_stream(self, conn: Conn, name: str) -> bool:
        key = self.parse_stream(name)
        if key is None:
            return False
        wrap = (b'{"stream":"' + name.encode() + b'","data":', b"}") if conn.state["combined"] else None
        if conn.subscribe(key, wrap):
            conn.state["streams"].append(name)
        return True

    def on_open(self, conn: Conn, request: web.Request) -> None:
        tail = request.match_info.get("streams", "")
        conn.state["combined"] = request.path.endswith("/stream")
        conn.state["streams"] = []
        names = request.query.get("streams", "") if conn.state["combined"] else tail
        for name in filter(None, names.split("/")):
            self.add_stream(conn, name)

    def on_text(self, conn: Conn, text: str) -> None:
        try:
            req = orjson.loads(text)
            method, params, rid = req["method"], req.get("params", []), req.get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            conn.send({"error": {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}})
            return
        if method == "SUBSCRIBE":
            bad = [name for name in params if not self.add_stream(conn, name)]
            if bad:
                conn.send({"error": {"code": 2, "msg": f"Invalid request: unknown stream {bad[0]}"}, "id": rid})
                return
            conn.send({"result": None, "id": rid})
        elif method == "UNSUBSCRIBE":
            for name in params:
                key = self.parse_stream(name)
                wrap = (b'{"stream":"' + name.encode() + b'","data":', b"}") if conn.state["combined"] else None
                if key is not None:
                    conn.unsubscribe(key, wrap)
                if name in conn.state["streams"]:
                    conn.state["streams"].remove(name)
            conn.send({"result": None, "id": rid})
        elif method == "LIST_SUBSCRIPTIONS":
            conn.send({"result": list(conn.state["streams"]), "id": rid})
        else:
            conn.send({"error": {"code": 2, "msg": f"Invalid request: unknown method {method}"}, "id": rid})

    # ---- frames ---------------------------------------------------------------------------------
    def trade_events(self, inst: Instrument, ms: int) -> list[Event]:
        buy, tick, lots, tid = inst.trade()
        inst.agg_id += 1
        self.tape(inst).append((tid, buy, tick, lots, ms))   # served by /api/v3/historicalTrades
        s, out = inst.id, []
        want_trade, want_agg = self.wanted(("trade", s)), self.wanted(("aggTrade", s))
        if not (want_trade or want_agg):
            return out
        p, q = inst.spec.price(tick), inst.spec.qty(lots)
        if want_trade:
            if self.usdm:
                trade = {"e": "trade", "E": ms, "T": ms, "s": s, "t": tid, "p": p, "q": q, "X": "MARKET", "m": not buy}
            else:
                trade = {"e": "trade", "E": ms, "s": s, "t": tid, "p": p, "q": q, "T": ms, "m": not buy, "M": True}
            out.append((("trade", s), orjson.dumps(trade), "trade", 1))
        if want_agg:
            if self.usdm:
                agg = {"e": "aggTrade", "E": ms, "a": inst.agg_id, "s": s, "p": p, "q": q, "nq": q,
                       "f": tid, "l": tid, "T": ms, "m": not buy}
            else:
                agg = {"e": "aggTrade", "E": ms, "s": s, "a": inst.agg_id, "p": p, "q": q,
                       "f": tid, "l": tid, "T": ms, "m": not buy, "M": True}
            out.append((("aggTrade", s), orjson.dumps(agg), "trade", 1))
        return out

    def depth_events(self, inst: Instrument, diff, ms: int) -> list[Event]:
        b, a = diff
        if not b and not a:
            return []
        view, spec = inst.view(WIDTH), inst.spec
        prev_u, first = view.seq, view.cross
        view.seq = first + len(b) + len(a) - 1 + self.rng.randrange(3)
        view.cross = view.seq + 1 + (self.rng.randrange(50) if self.usdm else 0)
        if not self.wanted(("depth", inst.id)):
            return []
        bids = [[spec.price(t), spec.qty(lots)] for t, lots, _ in b]
        asks = [[spec.price(t), spec.qty(lots)] for t, lots, _ in a]
        if self.usdm:
            msg = {"e": "depthUpdate", "E": ms, "T": ms, "s": inst.id, "U": first, "u": view.seq,
                   "pu": prev_u, "b": bids, "a": asks}
        else:
            msg = {"e": "depthUpdate", "E": ms, "s": inst.id, "U": first, "u": view.seq, "b": bids, "a": asks}
        if self.skipped(inst):
            return []
        return [(("depth", inst.id), orjson.dumps(msg), "orderbook", 1)]

    def mark(self, inst: Instrument, ms: int) -> dict:
        mid = inst.mid()
        index = mid * (1 + self.series.premium(inst.id + ":i", ms) / 4)
        rate = self.series.funding_rate(inst.id, ms)
        return {"p": fmt_float(mid * (1 + self.series.premium(inst.id, ms)), 8), "i": fmt_float(index, 8),
                "P": fmt_float(index * 1.0001, 8), "r": fmt_float(rate, 8), "T": self.series.next_funding(ms)}

    def mark_events(self, ms: int, kind: str) -> list[Event]:
        out = []
        for inst in self.instruments.values():
            m = self.mark(inst, ms)
            msg = {"e": "markPriceUpdate", "E": ms, "s": inst.id, "p": m["p"], "P": m["P"], "i": m["i"],
                   "r": m["r"], "T": m["T"]}
            out.append(((kind, inst.id), orjson.dumps(msg), "funding_rate", 1))
        return out

    def liquidation_events(self, ms: int) -> list[Event]:
        out = []
        for inst in self.instruments.values():
            if self.rng.random() > 0.4:
                continue
            sell = self.rng.random() < 0.5   # SELL: a long was liquidated
            t = inst.book.best_bid()[0] - 2 if sell else inst.book.best_ask()[0] + 2
            spec, lots = inst.spec, 1 + int(self.rng.expovariate(1 / inst.spec.mean_lots()))
            avg = t - 1 if sell else t + 1
            order = {"s": inst.id, "S": "SELL" if sell else "BUY", "o": "LIMIT", "f": "IOC", "q": spec.qty(lots),
                     "p": spec.price(t), "ap": spec.price(avg), "X": "FILLED", "l": spec.qty(lots),
                     "z": spec.qty(lots), "T": ms}
            data = orjson.dumps({"e": "forceOrder", "E": ms, "o": order})
            out.append((("forceOrder", inst.id), data, "liquidation", 1))
            out.append((("forceOrder", "*"), data, "liquidation", 1))
        return out

    # ---- REST -----------------------------------------------------------------------------------
    def rest_routes(self):
        if not self.usdm:
            return [("/api/v3/depth", self.depth), ("/api/v3/exchangeInfo", self.exchange_info),
                    ("/api/v3/time", self.time), ("/api/v3/ping", lambda r: {}),
                    ("/api/v3/historicalTrades", self.historical_trades)]
        routes = [("/fapi/v1/depth", self.depth), ("/fapi/v1/exchangeInfo", self.exchange_info),
                  ("/fapi/v1/time", self.time), ("/fapi/v1/ping", lambda r: {}),
                  ("/fapi/v1/openInterest", self.open_interest), ("/fapi/v1/premiumIndex", self.premium_index),
                  ("/fapi/v1/fundingRate", self.funding_history)]
        routes += [(f"/futures/data/{name}", self.ratio_handler(name)) for name in LSR_KEYS]
        return routes

    def error_body(self, status: int) -> object:
        if status in (418, 429):
            return {"code": -1003, "msg": "Too many requests; current limit of IP(127.0.0.1) is 6000 requests "
                                          "per minute. Please use the websocket for live updates to avoid polling the API."}
        if status == 451:
            return {"code": 0, "msg": "Service unavailable from a restricted location according to 'b. Eligibility' "
                                      "in https://www.binance.com/en/terms. Please contact customer service if you "
                                      "believe you received this message in error."}
        return {"code": -1000, "msg": "An unknown error occurred while processing the request."}

    def symbol(self, request: web.Request, required: bool = True) -> Instrument | None:
        sym = request.query.get("symbol")
        if not sym:
            if required:
                raise RestError(400, {"code": -1102, "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed."})
            return None
        inst = self.instruments.get(sym.upper())
        if inst is None:
            raise RestError(400, {"code": -1121, "msg": "Invalid symbol."})
        return inst

    def depth(self, request: web.Request) -> dict:
        inst = self.symbol(request)
        limit = query_int(request, "limit", 500 if self.usdm else 100, 1, 5000)
        view, spec = inst.view(WIDTH), inst.spec
        bids = [[spec.price(t), spec.qty(lots)] for t, lots in view.levels(True, limit)]
        asks = [[spec.price(t), spec.qty(lots)] for t, lots in view.levels(False, limit)]
        self.count_served("orderbook")
        if self.usdm:
            # As on USD-M, the snapshot's id falls inside the next event (U <= lastUpdateId <= u), so
            # a client that fetched it before any event arrived still finds the event to start from.
            ms = now_ms()
            return {"lastUpdateId": view.cross, "E": ms, "T": ms, "bids": bids, "asks": asks}
        return {"lastUpdateId": view.seq, "bids": bids, "asks": asks}

    def historical_trades(self, request: web.Request) -> list:
        """GET /api/v3/historicalTrades?symbol=&fromId=&limit= (Binance spot REST docs, market data endpoints,
        "Old trade lookup": limit default 500, max 1000; fromId "TradeId to fetch from. Default gets most recent
        trades"; rows {id, price, qty, quoteQty, time, isBuyerMaker, isBestMatch}, oldest first). The simulator
        keeps the last `tape_size` trades of each symbol: older ids are beyond its history."""
        inst = self.symbol(request)
        limit = query_int(request, "limit", 500, 1, 1000)
        from_id = query_int(request, "fromId", None, 0)
        tape = self.tapes.get(inst.id) or ()
        if from_id is None:
            rows = list(tape)[-limit:]
        else:
            first = tape[0][0] if tape else from_id
            skip = max(0, from_id - first)   # ids in the tape are consecutive
            rows = [tape[i] for i in range(skip, min(len(tape), skip + limit))]
        spec, out = inst.spec, []
        for tid, buy, tick, lots, ms in rows:
            p, q = spec.price(tick), spec.qty(lots)
            out.append({"id": tid, "price": p, "qty": q, "quoteQty": fmt_float(float(p) * float(q), 8),
                        "time": ms, "isBuyerMaker": not buy, "isBestMatch": True})
        self.count_served("trade", len(out))
        return out

    def time(self, request: web.Request) -> dict:
        return {"serverTime": now_ms()}

    def oi(self, inst: Instrument, ms: int) -> str:
        return fmt_float(self.series.open_interest(inst.id, ms, OI_NOTIONAL_USD / base_price(inst.base)), 3)

    def open_interest(self, request: web.Request) -> dict:
        inst, ms = self.symbol(request), now_ms()
        self.count_served("open_interest")
        return {"symbol": inst.id, "openInterest": self.oi(inst, ms), "time": ms}

    def premium_index(self, request: web.Request) -> object:
        inst, ms = self.symbol(request, required=False), now_ms()
        rows = []
        for i in ([inst] if inst else self.instruments.values()):
            m = self.mark(i, ms)
            rows.append({"symbol": i.id, "markPrice": m["p"], "indexPrice": m["i"], "estimatedSettlePrice": m["P"],
                         "lastFundingRate": m["r"], "interestRate": "0.00010000", "nextFundingTime": m["T"],
                         "time": ms})
        self.count_served("funding_rate", len(rows))
        return rows[0] if inst else rows

    def funding_history(self, request: web.Request) -> list:
        inst = self.symbol(request)
        limit = query_int(request, "limit", 100, 1, 1000)
        start, end = query_int(request, "startTime", None, 0), query_int(request, "endTime", None, 0)
        times = self.series.rows(FUNDING_MS, limit, start, end, newest_first=False)
        return [{"symbol": inst.id, "fundingTime": t, "fundingRate": fmt_float(self.series.funding_rate(inst.id, t), 8),
                 "markPrice": self.mark(inst, t)["p"]} for t in times]

    def ratio_handler(self, name: str):
        wave, data_type = LSR_KEYS[name]

        def handler(request: web.Request) -> list:
            inst = self.symbol(request)
            period = request.query.get("period", "")
            if period not in PERIOD_MS:
                raise RestError(400, {"code": -1130, "msg": "Data sent for parameter 'period' is not valid."})
            limit = query_int(request, "limit", 30, 1, 500)
            start, end = query_int(request, "startTime", None, 0), query_int(request, "endTime", None, 0)
            rows = [self.ratio_row(inst, wave, t) for t in
                    self.series.rows(PERIOD_MS[period], limit, start, end, newest_first=False)]
            self.count_served(data_type, len(rows))
            return rows
        return handler

    def ratio_row(self, inst: Instrument, wave: str, t: int) -> dict:
        long_units = round(self.series.long_ratio(f"{wave}:{inst.id}", t) * 10000)
        short_units = 10000 - long_units
        return {"symbol": inst.id, "longShortRatio": fmt(round(long_units * 10000 / short_units), 4),
                "longAccount": fmt(long_units, 4), "shortAccount": fmt(short_units, 4), "timestamp": t}

    def exchange_info(self, request: web.Request) -> dict:
        symbols = [self.symbol_info(inst) for inst in self.instruments.values()]
        limits = [{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}]
        return {"timezone": "UTC", "serverTime": now_ms(), "rateLimits": limits,
                "exchangeFilters": [], "symbols": symbols}

    def symbol_info(self, inst: Instrument) -> dict:
        spec = inst.spec
        tick, step = fmt(spec.tick, spec.price_dp), fmt(spec.lot, spec.qty_dp)
        filters = [{"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": fmt(10 ** 6 * 10 ** spec.price_dp, spec.price_dp),
                    "tickSize": tick},
                   {"filterType": "LOT_SIZE", "minQty": step, "maxQty": fmt(9000 * 10 ** spec.qty_dp, spec.qty_dp),
                    "stepSize": step}]
        quote = inst.symbol.split("-")[1]
        if not self.usdm:
            return {"symbol": inst.id, "status": "TRADING", "baseAsset": inst.base, "baseAssetPrecision": 8,
                    "quoteAsset": quote, "quotePrecision": 8, "quoteAssetPrecision": 8,
                    "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
                    "isSpotTradingAllowed": True, "isMarginTradingAllowed": True, "filters": filters,
                    "permissions": [], "permissionSets": [["SPOT", "MARGIN"]]}
        return {"symbol": inst.id, "pair": inst.id, "contractType": "PERPETUAL", "deliveryDate": 4133404800000,
                "onboardDate": 1569398400000, "status": "TRADING", "baseAsset": inst.base, "quoteAsset": quote,
                "marginAsset": quote, "pricePrecision": spec.price_dp, "quantityPrecision": spec.qty_dp,
                "baseAssetPrecision": 8, "quotePrecision": 8, "underlyingType": "COIN", "filters": filters,
                "orderTypes": ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"],
                "timeInForce": ["GTC", "IOC", "FOK", "GTX"]}
