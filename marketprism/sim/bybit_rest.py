"""Bybit v5 market REST endpoints, served from the same books and series as the WebSocket.

The REST order book is the 200-level (linear) / 50-level (spot) view whose `u` is the `u` of the
WebSocket topic of that depth, as Bybit documents for GET /v5/market/orderbook.
"""

from __future__ import annotations

import orjson
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web

from marketprism.sim.feed import RestError, query_int
from marketprism.sim.market import Instrument, base_price, fmt, fmt_float
from marketprism.sim.series import FUNDING_MS, HOUR_MS, now_ms

if TYPE_CHECKING:
    from marketprism.sim.bybit import BybitFeed

REST_DEPTH = {"bybit_spot": 50, "bybit_linear": 200}
OI_NOTIONAL_USD = 4e9
PERIODS = {"5min": 300_000, "15min": 900_000, "30min": 1_800_000, "1h": HOUR_MS, "4h": 4 * HOUR_MS,
           "1d": 24 * HOUR_MS}


def ok(result: object) -> dict:
    return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": now_ms()}


def params_error(text: str) -> RestError:
    return RestError(200, {"retCode": 10001, "retMsg": f"params error: {text}", "result": {}, "retExtInfo": {},
                           "time": now_ms()})


def routes(feed: "BybitFeed") -> list:
    out = [("/v5/market/orderbook", partial(orderbook, feed)),
           ("/v5/market/instruments-info", partial(instruments_info, feed)),
           ("/v5/market/time", server_time),
           ("/v5/market/recent-trade", partial(recent_trade, feed))]
    feed.frame_tape = TRADE_TAPE   # recent-trade answers from the trade frames the feed streamed
    if feed.linear:
        out += [("/v5/market/tickers", partial(tickers, feed)),
                ("/v5/market/open-interest", partial(open_interest, feed)),
                ("/v5/market/account-ratio", partial(account_ratio, feed)),
                ("/v5/market/funding/history", partial(funding_history, feed))]
    return out


TRADE_TAPE = 1000   # frames per symbol: at least the 1000 trades recent-trade can return


def recent_trade(feed: "BybitFeed", request: web.Request) -> dict:
    """GET /v5/market/recent-trade?category=&symbol=&limit= (Bybit v5 docs, "Get Public Recent Trading History":
    limit spot [1, 60] default 60, others [1, 1000] default 500; result {category, list: [{execId, symbol, price,
    size, side, time, isBlockTrade, ...}]}, newest first). Served from the trades streamed on publicTrade.{symbol}
    (the same execIds as the stream's `i`); trades generated while no client subscribed have no id and are absent."""
    inst = instrument(feed, request)
    limit = query_int(request, "limit", 500 if feed.linear else 60, 1, 1000 if feed.linear else 60)
    rows: list[dict] = []
    for _ms, frame in reversed(feed.trade_frames.get(f"publicTrade.{inst.id}") or ()):
        for t in reversed(orjson.loads(frame)["data"]):
            rows.append({"execId": t["i"], "symbol": t["s"], "price": t["p"], "size": t["v"], "side": t["S"],
                         "time": str(t["T"]), "isBlockTrade": t["BT"], "isRPITrade": t.get("RPI", False)})
        if len(rows) >= limit:
            break
    feed.count_served("trade", len(rows[:limit]))
    return ok({"category": feed.category, "list": rows[:limit]})


def error_body(status: int) -> dict:
    if status == 429:
        return {"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "retExtInfo": {}, "time": now_ms()}
    return {"retCode": 10016, "retMsg": "Internal server error.", "result": {}, "retExtInfo": {}, "time": now_ms()}


def instrument(feed: "BybitFeed", request: web.Request) -> Instrument:
    category = request.query.get("category")
    if category != feed.category:
        raise params_error(f"category {category} not supported here")
    inst = feed.instruments.get(request.query.get("symbol", ""))
    if inst is None:
        raise params_error("symbol invalid")
    return inst


def server_time(request: web.Request) -> dict:
    ns = now_ms() * 1_000_000
    return ok({"timeSecond": str(ns // 10 ** 9), "timeNano": str(ns)})


def orderbook(feed: "BybitFeed", request: web.Request) -> dict:
    inst = instrument(feed, request)
    depth = REST_DEPTH[feed.name]
    limit = query_int(request, "limit", 25 if feed.linear else 1, 1, depth)
    view, spec, ms = feed.new_view(inst, depth), inst.spec, now_ms()
    feed.count_served("orderbook")
    return ok({"s": inst.id, "a": [[spec.price(t), spec.qty(q)] for t, q in view.levels(False, limit)],
               "b": [[spec.price(t), spec.qty(q)] for t, q in view.levels(True, limit)],
               "ts": ms, "u": view.seq, "seq": inst.agg_id, "cts": ms - 1})


def tickers(feed: "BybitFeed", request: web.Request) -> dict:
    insts = [instrument(feed, request)] if request.query.get("symbol") else list(feed.instruments.values())
    ms = now_ms()
    rows = []
    for inst in insts:
        row = feed.ticker_state(inst, ms)
        for key in ("fundingIntervalHour", "fundingCap", "preOpenPrice", "preQty", "curPreListingPhase"):
            row.pop(key)
        rows.append(row)
    feed.count_served("funding_rate", len(rows))
    return ok({"category": feed.category, "list": rows})


def history_window(request: web.Request, default_limit: int, max_limit: int):
    limit = query_int(request, "limit", default_limit, 1, max_limit)
    return limit, query_int(request, "startTime", None, 0), query_int(request, "endTime", None, 0)


def open_interest(feed: "BybitFeed", request: web.Request) -> dict:
    inst = instrument(feed, request)
    period = request.query.get("intervalTime", "")
    if period not in PERIODS:
        raise params_error("intervalTime invalid")
    limit, start, end = history_window(request, 50, 200)
    times = feed.series.rows(PERIODS[period], limit, start, end, newest_first=True)
    base = OI_NOTIONAL_USD / base_price(inst.base)
    rows = []
    for t in times:
        # Bybit's current docs: openInterest sums both sides, singleOpenInterest is one side.
        one_side = round(feed.series.open_interest(inst.id, t, base) * 10 ** inst.spec.qty_dp)
        rows.append({"openInterest": fmt(2 * one_side * 10 ** (8 - inst.spec.qty_dp), 8),
                     "singleOpenInterest": fmt(one_side, inst.spec.qty_dp), "timestamp": str(t)})
    feed.count_served("open_interest", len(rows))
    return ok({"symbol": inst.id, "category": feed.category, "list": rows, "nextPageCursor": ""})


def account_ratio(feed: "BybitFeed", request: web.Request) -> dict:
    inst = instrument(feed, request)
    period = request.query.get("period", "")
    if period not in PERIODS:
        raise params_error("period invalid")
    limit, start, end = history_window(request, 50, 500)
    rows = []
    for t in feed.series.rows(PERIODS[period], limit, start, end, newest_first=True):
        buy = round(feed.series.long_ratio(f"acc:{inst.id}", t) * 10000)
        rows.append({"symbol": inst.id, "buyRatio": fmt(buy, 4, False), "sellRatio": fmt(10000 - buy, 4, False),
                     "timestamp": str(t)})
    feed.count_served("lsr_all_account", len(rows))
    return ok({"list": rows, "nextPageCursor": ""})


def funding_history(feed: "BybitFeed", request: web.Request) -> dict:
    inst = instrument(feed, request)
    limit, start, end = history_window(request, 200, 200)
    times = feed.series.rows(FUNDING_MS, limit, start, end, newest_first=True)
    rows = [{"symbol": inst.id, "fundingRate": fmt_float(feed.series.funding_rate(inst.id, t), 6, False),
             "fundingRateTimestamp": str(t)} for t in times]
    feed.count_served("funding_rate", len(rows))
    return ok({"category": feed.category, "list": rows})


def instruments_info(feed: "BybitFeed", request: web.Request) -> dict:
    if request.query.get("category") != feed.category:
        raise params_error("category invalid")
    symbol = request.query.get("symbol")
    rows = [instrument_row(feed, i) for i in feed.instruments.values() if not symbol or i.id == symbol]
    return ok({"category": feed.category, "list": rows, "nextPageCursor": ""})


def instrument_row(feed: "BybitFeed", inst: Instrument) -> dict:
    spec = inst.spec
    base, quote = inst.symbol.split("-")
    tick, step = fmt(spec.tick, spec.price_dp), fmt(spec.lot, spec.qty_dp)
    if not feed.linear:
        return {"symbol": inst.id, "baseCoin": base, "quoteCoin": quote, "innovation": "0", "status": "Trading",
                "marginTrading": "utaOnly",
                "lotSizeFilter": {"basePrecision": step, "quotePrecision": "0.00000001", "minOrderQty": step,
                                  "maxOrderQty": "1000", "minOrderAmt": "1", "maxOrderAmt": "2000000"},
                "priceFilter": {"tickSize": tick}}
    return {"symbol": inst.id, "contractType": "LinearPerpetual", "status": "Trading", "baseCoin": base,
            "quoteCoin": quote, "launchTime": "1585526400000", "deliveryTime": "0", "deliveryFeeRate": "",
            "priceScale": str(spec.price_dp),
            "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
            "priceFilter": {"minPrice": tick, "maxPrice": fmt(10 ** 6 * 10 ** spec.price_dp, spec.price_dp),
                            "tickSize": tick},
            "lotSizeFilter": {"maxOrderQty": "1000", "minOrderQty": step, "qtyStep": step,
                              "postOnlyMaxOrderQty": "1000", "maxMktOrderQty": "100", "minNotionalValue": "5"},
            "unifiedMarginTrade": True, "fundingInterval": 480, "settleCoin": quote, "copyTrading": "both",
            "upperFundingRate": "0.005", "lowerFundingRate": "-0.005"}
