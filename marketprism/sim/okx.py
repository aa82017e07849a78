"""OKX v5 (/okx): spot BTC-USDT and perpetual BTC-USDT-SWAP for every symbol.

Shapes follow shared/fixtures/exchanges/okx (2025 formats where the recordings differ by year).
`books` sends a 400-level snapshot (prevSeqId -1) then updates with prevSeqId == previous seqId;
the checksum is OKX's CRC32 over the top 25 levels, or 0 (--checksum zero) as OKX sends since 2026.
"""

from __future__ import annotations

import math
import zlib

import orjson
from aiohttp import web

from marketprism.sim.feed import Conn, Event, Feed, Options, RestError, query_int
from marketprism.sim.market import Instrument, Spec, base_price, base_size, fmt_float, price_decimals
from marketprism.sim.series import FUNDING_MS, HOUR_MS, Series, now_ms

WIDTH = 400
OI_NOTIONAL_USD = 3e9
RUBIK_PERIODS = {"5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1H": HOUR_MS, "2H": 2 * HOUR_MS,
                 "4H": 4 * HOUR_MS, "6H": 6 * HOUR_MS, "12H": 12 * HOUR_MS, "1D": 24 * HOUR_MS}
RUBIK = {"long-short-account-ratio-contract": "all_acc", "long-short-account-ratio-contract-top-trader": "top_acc",
         "long-short-position-ratio-contract-top-trader": "top_pos"}
RUBIK_TYPES = {"all_acc": "lsr_all_account", "top_acc": "lsr_top_account", "top_pos": "lsr_top_position"}


def contract_value(base: str) -> float:
    """Contract size chosen like OKX's (BTC 0.01, ETH 0.1): one contract worth a few hundred USD."""
    return 10.0 ** math.floor(math.log10(600.0 / base_price(base)))


def okx_spec(base: str, swap: bool) -> Spec:
    dp = {"BTC": 1, "ETH": 2}.get(base) or price_decimals(base_price(base), 5)
    if swap:
        return Spec(dp, 1, 2, 1, fixed=False, mean_size=base_size(base) / contract_value(base))
    return Spec(dp, 1, 8, 1, fixed=False, mean_size=base_size(base))


def checksum(bids: list[list[str]], asks: list[list[str]]) -> int:
    """OKX books checksum: CRC32 of bid:size:ask:size... over the top 25 levels, as a signed int."""
    parts: list[str] = []
    for i in range(25):
        if i < len(bids):
            parts += bids[i][:2]
        if i < len(asks):
            parts += asks[i][:2]
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


class OkxFeed(Feed):
    ws_paths = ("/ws/v5/public",)

    def __init__(self, name: str, opts: Options, series: Series):
        super().__init__(name, opts, series)
        for symbol in opts.symbols:
            base = symbol.split("-")[0]
            for swap in (False, True):
                inst = Instrument(symbol + ("-SWAP" if swap else ""), symbol, okx_spec(base, swap), self.rng,
                                  WIDTH, "swap" if swap else "spot")
                inst.view(WIDTH).seq = self.rng.randrange(10 ** 9, 10 ** 10)
                self.instruments[inst.id] = inst
        self.swaps = [i for i in self.instruments.values() if i.kind == "swap"]
        self.every(60.0, self.funding_events)
        self.every(3.0, self.oi_events)
        self.every(1.0, self.liquidation_events)

    # ---- subscriptions ---------------------------------------------------------------------------
    def on_text(self, conn: Conn, text: str) -> None:
        if text == "ping":
            conn.write([b"pong"])
            return
        try:
            req = orjson.loads(text)
            op, args = req["op"], req["args"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            conn.send({"event": "error", "code": "60012", "msg": f"Invalid request: {text[:100]}", "connId": conn.id})
            return
        rid = {"id": req["id"]} if "id" in req else {}
        for arg in args if isinstance(args, list) else []:
            key = self.parse_arg(arg)
            if op not in ("subscribe", "unsubscribe") or key is None:
                msg = f"Wrong URL or channel:{arg.get('channel') if isinstance(arg, dict) else arg}, " \
                      f"instId:{arg.get('instId') if isinstance(arg, dict) else ''} doesn't exist. " \
                      "Please use the correct URL, channel and parameters referring to API document."
                conn.send({**rid, "event": "error", "code": "60018", "msg": msg, "connId": conn.id})
                continue
            conn.send({**rid, "event": op, "arg": arg, "connId": conn.id})
            if op == "unsubscribe":
                conn.unsubscribe(key)
            elif conn.subscribe(key):
                self.on_subscribed(conn, key)

    def parse_arg(self, arg: object) -> tuple | None:
        if not isinstance(arg, dict):
            return None
        channel, inst_id = arg.get("channel"), arg.get("instId")
        if channel == "liquidation-orders":
            return (channel, "SWAP") if arg.get("instType") == "SWAP" else None
        inst = self.instruments.get(inst_id)
        if inst is None or channel not in ("trades", "books", "funding-rate", "open-interest"):
            return None
        if channel in ("funding-rate", "open-interest") and inst.kind != "swap":
            return None
        return channel, inst_id

    def on_subscribed(self, conn: Conn, key: tuple) -> None:
        channel, inst_id = key
        if channel == "books":
            conn.write([self.book_frame(self.instruments[inst_id], "snapshot", -1, now_ms())])
            self.count("orderbook")
        elif channel == "funding-rate":
            conn.write([self.funding_frame(self.instruments[inst_id], now_ms())])
            self.count("funding_rate")
        elif channel == "open-interest":
            conn.write([self.oi_frame(self.instruments[inst_id], now_ms())])
            self.count("open_interest")

    # ---- frames ---------------------------------------------------------------------------------
    def level(self, spec: Spec, t: int, lots: int) -> list[str]:
        return [spec.price(t), spec.qty(lots), "0", str(1 + lots % 9) if lots else "0"]

    def book_frame(self, inst: Instrument, action: str, prev: int, ms: int, diff=None) -> bytes:
        view, spec = inst.view(WIDTH), inst.spec
        if diff is None:
            bids = [self.level(spec, t, q) for t, q in view.levels(True)]
            asks = [self.level(spec, t, q) for t, q in view.levels(False)]
        else:
            bids = [self.level(spec, t, q) for t, q, _ in diff[0]]
            asks = [self.level(spec, t, q) for t, q, _ in diff[1]]
        crc = 0
        if self.opts.checksum == "real":
            top_b = [[spec.price(t), spec.qty(q)] for t, q in view.levels(True, 25)]
            top_a = [[spec.price(t), spec.qty(q)] for t, q in view.levels(False, 25)]
            crc = checksum(top_b, top_a)
        data = {"asks": asks, "bids": bids, "ts": str(ms), "checksum": crc, "prevSeqId": prev, "seqId": view.seq}
        return orjson.dumps({"arg": {"channel": "books", "instId": inst.id}, "action": action, "data": [data]})

    def trade_events(self, inst: Instrument, ms: int) -> list[Event]:
        buy, tick, lots, tid = inst.trade()
        inst.agg_id += 1
        self.tape(inst).append((tid, buy, tick, lots, ms))   # served by /api/v5/market/history-trades
        if not self.wanted(("trades", inst.id)):
            return []
        trade = {"instId": inst.id, "tradeId": str(tid), "px": inst.spec.price(tick), "sz": inst.spec.qty(lots),
                 "side": "buy" if buy else "sell", "ts": str(ms), "count": "1", "source": "0", "seqId": inst.agg_id}
        msg = {"arg": {"channel": "trades", "instId": inst.id}, "data": [trade]}
        return [(("trades", inst.id), orjson.dumps(msg), "trade", 1)]

    def depth_events(self, inst: Instrument, diff, ms: int) -> list[Event]:
        if not diff[0] and not diff[1]:
            return []
        view = inst.view(WIDTH)
        prev = view.seq
        view.seq = prev + 1 + self.rng.randrange(3)
        if not self.wanted(("books", inst.id)):
            return []
        frame = self.book_frame(inst, "update", prev, ms, diff)
        return [] if self.skipped(inst) else [(("books", inst.id), frame, "orderbook", 1)]

    def funding_data(self, inst: Instrument, ms: int) -> dict:
        s = self.series
        funding_time = s.next_funding(ms)
        return {"formulaType": "withRate", "fundingRate": fmt_float(s.funding_rate(inst.id, ms), 16),
                "fundingTime": str(funding_time), "impactValue": "20000.0000000000000000", "instId": inst.id,
                "instType": "SWAP", "interestRate": "0.0001000000000000", "maxFundingRate": "0.0075",
                "method": "current_period", "minFundingRate": "-0.0075", "nextFundingRate": "",
                "nextFundingTime": str(funding_time + s.span(FUNDING_MS)),
                "premium": fmt_float(s.premium(inst.id, ms), 16),
                "settFundingRate": fmt_float(s.funding_rate(inst.id, funding_time - s.span(FUNDING_MS)), 16),
                "settState": "settled", "ts": str(ms)}

    def funding_frame(self, inst: Instrument, ms: int) -> bytes:
        return orjson.dumps({"arg": {"channel": "funding-rate", "instId": inst.id}, "data": [self.funding_data(inst, ms)]})

    def funding_events(self, ms: int) -> list[Event]:
        return [(("funding-rate", i.id), self.funding_frame(i, ms), "funding_rate", 1) for i in self.swaps]

    def oi_data(self, inst: Instrument, ms: int) -> dict:
        ct = contract_value(inst.base)
        oi = round(self.series.open_interest(inst.id, ms, OI_NOTIONAL_USD / base_price(inst.base) / ct), 2)
        ccy = oi * ct
        return {"instId": inst.id, "instType": "SWAP", "oi": fmt_float(oi, 2, False), "oiCcy": fmt_float(ccy, 4, False),
                "oiUsd": fmt_float(ccy * inst.mid(), 2, False), "ts": str(ms)}

    def oi_frame(self, inst: Instrument, ms: int) -> bytes:
        return orjson.dumps({"arg": {"channel": "open-interest", "instId": inst.id}, "data": [self.oi_data(inst, ms)]})

    def oi_events(self, ms: int) -> list[Event]:
        return [(("open-interest", i.id), self.oi_frame(i, ms), "open_interest", 1) for i in self.swaps]

    def liquidation_events(self, ms: int) -> list[Event]:
        out = []
        for inst in self.swaps:
            if self.rng.random() > 0.3:
                continue
            long = self.rng.random() < 0.5     # a long position is closed by a sell
            t = inst.book.best_bid()[0] - 3 if long else inst.book.best_ask()[0] + 3
            lots = 1 + int(self.rng.expovariate(1 / inst.spec.mean_lots()))
            detail = {"bkLoss": "0", "bkPx": inst.spec.price(t), "ccy": "", "posSide": "long" if long else "short",
                      "side": "sell" if long else "buy", "sz": inst.spec.qty(lots), "ts": str(ms)}
            family = inst.symbol
            msg = {"arg": {"channel": "liquidation-orders", "instType": "SWAP"},
                   "data": [{"details": [detail], "instFamily": family, "instId": inst.id, "instType": "SWAP",
                             "uly": family}]}
            out.append((("liquidation-orders", "SWAP"), orjson.dumps(msg), "liquidation", 1))
        return out

    # ---- REST -----------------------------------------------------------------------------------
    def rest_routes(self):
        routes = [("/api/v5/market/books", self.books), ("/api/v5/public/instruments", self.instruments_info),
                  ("/api/v5/public/open-interest", self.open_interest), ("/api/v5/public/funding-rate", self.funding),
                  ("/api/v5/public/time", lambda r: ok([{"ts": str(now_ms())}])),
                  ("/api/v5/market/history-trades", self.history_trades),
                  ("/api/v5/rubik/stat/contracts/long-short-account-ratio", self.ccy_ratio)]
        routes += [(f"/api/v5/rubik/stat/contracts/{path}", self.rubik_handler(wave)) for path, wave in RUBIK.items()]
        return routes

    def error_body(self, status: int) -> object:
        if status == 429:
            return {"msg": "Too Many Requests", "code": "50011"}
        return {"code": "50001", "msg": "Service temporarily unavailable. Please try again later.", "data": []}

    def instrument(self, request: web.Request, swap_only: bool = False) -> Instrument:
        inst_id = request.query.get("instId")
        if not inst_id:
            raise RestError(400, {"code": "50014", "msg": "Parameter instId can not be empty.", "data": []})
        inst = self.instruments.get(inst_id)
        if inst is None or (swap_only and inst.kind != "swap"):
            raise RestError(200, {"code": "51001", "msg": "Instrument ID does not exist.", "data": []})
        return inst

    def books(self, request: web.Request) -> dict:
        inst = self.instrument(request)
        n = query_int(request, "sz", 1, 1, WIDTH)
        view, spec = inst.view(WIDTH), inst.spec
        self.count_served("orderbook")
        return ok([{"asks": [self.level(spec, t, q) for t, q in view.levels(False, n)],
                    "bids": [self.level(spec, t, q) for t, q in view.levels(True, n)],
                    "ts": str(now_ms()), "seqId": view.seq}])

    def history_trades(self, request: web.Request) -> dict:
        """GET /api/v5/market/history-trades?instId=&type=&after=&before=&limit= (OKX v5 docs, "Get trades
        history": type 1 = paginate by tradeId (default), 2 = by timestamp; `after` returns records earlier than
        that tradeId/ts, `before` newer (tradeId only); limit max and default 100; rows {instId, side, sz, px,
        source, tradeId, ts}, newest first). The simulator keeps the last `tape_size` trades of each instrument."""
        inst = self.instrument(request)
        by_time = request.query.get("type", "1") == "2"
        limit = query_int(request, "limit", 100, 1, 100)
        after, before = query_int(request, "after", None, 0), query_int(request, "before", None, 0)
        key = 4 if by_time else 0
        rows = [t for t in reversed(self.tapes.get(inst.id) or ())
                if (after is None or t[key] < after) and (before is None or t[0] > before)]
        if before is not None and after is None:
            rows = rows[-limit:]   # the page of newer records adjacent to `before`
        spec = inst.spec
        data = [{"instId": inst.id, "side": "buy" if buy else "sell", "sz": spec.qty(lots), "px": spec.price(tick),
                 "source": "0", "tradeId": str(tid), "ts": str(ms)} for tid, buy, tick, lots, ms in rows[:limit]]
        self.count_served("trade", len(data))
        return ok(data)

    def open_interest(self, request: web.Request) -> dict:
        inst_id = request.query.get("instId")
        insts = [self.instrument(request, True)] if inst_id else self.swaps
        ms = now_ms()
        # The REST rows list instType first (docs example), the WS push lists instId first.
        order = ("instType", "instId", "oi", "oiCcy", "oiUsd", "ts")
        rows = [{k: row[k] for k in order} for row in (self.oi_data(i, ms) for i in insts)]
        self.count_served("open_interest", len(rows))
        return ok(rows)

    def funding(self, request: web.Request) -> dict:
        inst = self.instrument(request, True)
        self.count_served("funding_rate")
        return ok([self.funding_data(inst, now_ms())])

    def rubik_rows(self, request: web.Request, key: str, data_type: str) -> dict:
        period = request.query.get("period", "5m")
        if period not in RUBIK_PERIODS:
            raise RestError(400, {"code": "51000", "msg": "Parameter period error", "data": []})
        limit = query_int(request, "limit", 100, 1, 100)
        begin, end = query_int(request, "begin", None, 0), query_int(request, "end", None, 0)
        times = self.series.rows(RUBIK_PERIODS[period], limit, begin, end, newest_first=True)
        rows = []
        for t in times:
            long = self.series.long_ratio(key, t)
            rows.append([str(t), fmt_float(long / (1 - long), 4, False)])
        self.count_served(data_type, len(rows))
        return ok(rows)

    def rubik_handler(self, wave: str):
        def handler(request: web.Request) -> dict:
            inst = self.instrument(request, True)
            return self.rubik_rows(request, f"{wave}:{inst.id}", RUBIK_TYPES[wave])
        return handler

    def ccy_ratio(self, request: web.Request) -> dict:
        ccy = request.query.get("ccy", "")
        if not any(i.base == ccy for i in self.swaps):
            raise RestError(400, {"code": "51000", "msg": "Parameter ccy error", "data": []})
        return self.rubik_rows(request, f"ccy:{ccy}", "lsr_all_account")

    def instruments_info(self, request: web.Request) -> dict:
        kind = {"SPOT": "spot", "SWAP": "swap"}.get(request.query.get("instType", ""))
        if kind is None:
            raise RestError(400, {"code": "51000", "msg": "Parameter instType error", "data": []})
        inst_id = request.query.get("instId")
        rows = [self.instrument_row(i) for i in self.instruments.values()
                if i.kind == kind and (not inst_id or i.id == inst_id)]
        return ok(rows)

    def instrument_row(self, inst: Instrument) -> dict:
        spec, swap = inst.spec, inst.kind == "swap"
        base, quote = inst.symbol.split("-")
        tick = fmt_float(spec.price_num(1), spec.price_dp, False)
        lot = fmt_float(spec.qty_num(1), spec.qty_dp, False)
        return {"instType": "SWAP" if swap else "SPOT", "instId": inst.id, "uly": inst.symbol if swap else "",
                "instFamily": inst.symbol if swap else "", "baseCcy": "" if swap else base,
                "quoteCcy": "" if swap else quote, "settleCcy": quote if swap else "",
                "ctVal": fmt_float(contract_value(inst.base), 8, False) if swap else "", "ctMult": "1" if swap else "",
                "ctValCcy": base if swap else "", "ctType": "linear" if swap else "", "optType": "", "stk": "",
                "listTime": "1606468572000", "expTime": "", "lever": "100" if swap else "10", "tickSz": tick,
                "lotSz": lot, "minSz": lot, "maxLmtSz": "100000000", "maxMktSz": "10000", "state": "live",
                "alias": "", "ruleType": "normal"}


def ok(data: list) -> dict:
    return {"code": "0", "msg": "", "data": data}
