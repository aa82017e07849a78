"""One REST rate budget per venue: every REST request of the venue is priced and waits for room.

A venue is the host whose limits a request counts against: Binance spot (api.binance.com) and USDⓈ-M
(fapi.binance.com) publish separate limits in their own exchangeInfo `rateLimits`, so they are two
venues; Bybit counts all traffic to api.bybit.com together ("regardless of if it accesses Spot,
Derivatives or Options"), so bybit_spot and bybit_linear share one. The documented limits, for the
endpoints the collector calls:

  binance_spot  REQUEST_WEIGHT 6000/min per IP; /api/v3/depth weight by limit 1-100: 5, 101-500: 25,
                501-1000: 50, 1001-5000: 250; exchangeInfo 20; others 1 (binance-spot-api-docs rest-api.md)
  binance_usdm  REQUEST_WEIGHT 2400/min per IP; /fapi/v1/depth weight by limit 5-50: 2, 100: 5, 500: 10,
                1000: 20; openInterest 1; premiumIndex 1 (10 without symbol); exchangeInfo 1;
                /futures/data/* weight 0 but "IP rate limit 1000 requests/5min" (developers.binance.com,
                derivatives/usds-margined-futures/market-data/rest-api)
  okx           per endpoint: rubik contract ratios 5 requests/2 s per IP + instId; rubik currency ratio
                5/2 s per IP; public/instruments 20/2 s per IP + instType; public/open-interest 20/2 s per
                IP + instId (okx.com/docs-v5)
  deribit       credits: 500 per non-matching request, pool 50,000, refill 10,000/s: 20 requests/s
                (docs.deribit.com/articles/rate-limits)
  bybit         600 requests per 5 s per IP; a breach answers HTTP 403 "access too frequent": "wait for at
                least 10 minutes" (bybit-exchange.github.io/docs/v5/rate-limit)

Budgets run at SAFETY of the documented figure ("We do not recommend running your application at the
very edge of these limits"). A sliding window over the past `window_s` is never looser than the
venue's fixed windows. A 429/418 Retry-After, or a block (HTTP 403/451), pauses the whole venue: every
task that would call it waits, not only the one that was refused.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

SAFETY = 0.8
BLOCKED_PAUSE_S = 300.0  # a location block does not lift by itself: ask again rarely


@dataclass(frozen=True)
class Limit:
    units: float  # weight or requests allowed per window
    window_s: float


Charge = tuple[str, Limit, float]  # bucket key, its limit, the units this request uses


class Window:
    """Units spent in the last `window_s` seconds of one bucket (a sliding-window log)."""
    __slots__ = ("limit", "spent", "total")

    def __init__(self, limit: Limit) -> None:
        self.limit = limit
        self.spent: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def wait(self, cost: float, now: float) -> float:
        """Seconds until `cost` units fit (0: now)."""
        horizon = now - self.limit.window_s
        while self.spent and self.spent[0][0] <= horizon:
            self.total -= self.spent.popleft()[1]
        excess = self.total + cost - self.limit.units * SAFETY
        if excess <= 0 or not self.spent:  # a request dearer than the whole budget goes alone
            return 0.0
        for at, units in self.spent:
            excess -= units
            if excess <= 0:
                return at - horizon
        return self.limit.window_s

    def take(self, cost: float, now: float) -> None:
        if cost > 0:
            self.spent.append((now, cost))
            self.total += cost


class Venue:
    """The budget of one venue: its priced buckets and a pause that holds back every request."""

    def __init__(self, name: str, price: Callable[[str, dict[str, str]], list[Charge]],
                 blocked_pause_s: float = BLOCKED_PAUSE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.price = price
        self.blocked_pause_s = blocked_pause_s
        self.clock = clock
        self.windows: dict[str, Window] = {}
        self.paused_until = 0.0

    def reserve(self, path: str) -> float:
        """Charge the request and return 0 if it may go now; else the seconds to wait (nothing charged)."""
        now = self.clock()
        if now < self.paused_until:
            return self.paused_until - now
        parts = urlsplit(path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        charges = [(self._window(key, limit), cost) for key, limit, cost in self.price(parts.path, params)]
        wait = max((w.wait(cost, now) for w, cost in charges), default=0.0)
        if wait <= 0:
            for w, cost in charges:
                w.take(cost, now)
        return wait

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + seconds)

    def paused_for(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def _window(self, key: str, limit: Limit) -> Window:
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = Window(limit)
        return w


def _tier(value: int, tiers: tuple[tuple[int, int], ...]) -> int:
    """The weight of the first tier whose upper bound holds `value` (the last tier beyond)."""
    for upper, weight in tiers:
        if value <= upper:
            return weight
    return tiers[-1][1]


def _int(params: dict[str, str], key: str, default: int) -> int:
    try:
        return int(params.get(key, default))
    except ValueError:
        return default


SPOT_WEIGHT = Limit(6000, 60)
SPOT_DEPTH = ((100, 5), (500, 25), (1000, 50), (5000, 250))
USDM_WEIGHT = Limit(2400, 60)
USDM_DEPTH = ((50, 2), (100, 5), (500, 10), (1000, 20))
USDM_DATA = Limit(1000, 300)
OKX_RUBIK = Limit(5, 2)
OKX_PUBLIC = Limit(20, 2)
DERIBIT = Limit(20, 1)
BYBIT = Limit(600, 5)


def binance_spot(path: str, params: dict[str, str]) -> list[Charge]:
    if path.endswith("/depth"):
        weight = _tier(_int(params, "limit", 100), SPOT_DEPTH)
    elif path.endswith("/exchangeInfo"):
        weight = 20
    else:
        weight = 1
    return [("weight", SPOT_WEIGHT, weight)]


def binance_usdm(path: str, params: dict[str, str]) -> list[Charge]:
    if path.startswith("/futures/data/"):
        return [("futures_data", USDM_DATA, 1)]  # weight 0: only the 1000/5 min IP limit applies
    if path.endswith("/depth"):
        weight = _tier(_int(params, "limit", 500), USDM_DEPTH)
    elif path.endswith("/premiumIndex"):
        weight = 1 if "symbol" in params else 10
    else:
        weight = 1  # openInterest, exchangeInfo, time
    return [("weight", USDM_WEIGHT, weight)]


def okx(path: str, params: dict[str, str]) -> list[Charge]:
    if path.endswith("/rubik/stat/contracts/long-short-account-ratio"):
        return [(path, OKX_RUBIK, 1)]  # rule: IP
    if "/rubik/" in path:
        return [(f"{path}|{params.get('instId', '')}", OKX_RUBIK, 1)]  # rule: IP + Instrument ID
    if path.endswith("/public/instruments"):
        return [(f"{path}|{params.get('instType', '')}", OKX_PUBLIC, 1)]  # rule: IP + Instrument Type
    if path.endswith("/public/open-interest"):
        return [(f"{path}|{params.get('instId', '')}", OKX_PUBLIC, 1)]
    return [(path, OKX_RUBIK, 1)]  # an endpoint not listed above gets the smallest limit we know


def deribit(path: str, params: dict[str, str]) -> list[Charge]:
    return [("non_matching", DERIBIT, 1)]


def bybit(path: str, params: dict[str, str]) -> list[Charge]:
    return [("ip", BYBIT, 1)]


# feed -> (venue, pricing, pause after a block)
VENUE_OF: dict[str, tuple[str, Callable[[str, dict[str, str]], list[Charge]], float]] = {
    "binance_spot": ("binance_spot", binance_spot, BLOCKED_PAUSE_S),
    "binance_usdm": ("binance_usdm", binance_usdm, BLOCKED_PAUSE_S),
    "okx": ("okx", okx, BLOCKED_PAUSE_S),
    "deribit": ("deribit", deribit, BLOCKED_PAUSE_S),
    "bybit_spot": ("bybit", bybit, 600.0),
    "bybit_linear": ("bybit", bybit, 600.0),
}


class Budgets:
    """The venues of a collector, created on first use; feeds of one venue get the same Venue."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.venues: dict[str, Venue] = {}

    def venue(self, feed: str) -> Venue:
        name, price, blocked_pause_s = VENUE_OF[feed]
        v = self.venues.get(name)
        if v is None:
            v = self.venues[name] = Venue(name, price, blocked_pause_s, self.clock)
        return v

    def feeds_of(self, venue: str) -> list[str]:
        return [feed for feed, (name, _, _) in VENUE_OF.items() if name == venue]
