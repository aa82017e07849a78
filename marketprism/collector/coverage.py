"""Per data type x exchange/market_type: when did data last arrive, and is that recent enough."""

from __future__ import annotations

import time
from collections.abc import Callable

from marketprism.ops import metrics

GRACE_S = 120.0
STALE_FAST_S = 60.0  # trades and books arrive many times a second on a live venue
STALE_LIQUIDATION_S = 3600.0  # liquidations are bursty: a quiet hour is normal
STALE_SLOW_S = 8 * 3600.0  # funding, open interest, ratios, volatility index: polled or pushed slowly
FAST_TYPES = ("trade", "orderbook")


class Coverage:
    """Freshness of every stream seen so far. `seen` is on the hot path: one dict store, nothing else.

    Overall status: `starting` during the grace period after start-up, then `unhealthy` when no stream is
    fresh (nothing arrived, or everything went quiet), `degraded` when some stream is stale, else `healthy`.
    """

    def __init__(self, grace_s: float = GRACE_S, stale_fast_s: float = STALE_FAST_S,
                 stale_liquidation_s: float = STALE_LIQUIDATION_S, stale_slow_s: float = STALE_SLOW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.started = clock()
        self.grace_s = grace_s
        self.stale_fast_s = stale_fast_s
        self.stale_liquidation_s = stale_liquidation_s
        self.stale_slow_s = stale_slow_s
        self.last: dict[tuple[str, str, str], float] = {}
        metrics.COVERAGE.watch(self)

    @classmethod
    def from_settings(cls, settings) -> Coverage:
        return cls(settings.grace_s, settings.stale_fast_s, settings.stale_liquidation_s, settings.stale_slow_s)

    def seen(self, data_type: str, exchange: str, market_type: str) -> None:
        self.last[(data_type, exchange, market_type)] = self.clock()

    def stale_after(self, data_type: str) -> float:
        if data_type in FAST_TYPES:
            return self.stale_fast_s
        return self.stale_liquidation_s if data_type == "liquidation" else self.stale_slow_s

    def grace_remaining(self) -> float:
        return max(0.0, self.grace_s - (self.clock() - self.started))

    def report(self) -> dict:
        now = self.clock()
        out = {}
        for (dt, ex, mt), ts in sorted(self.last.items()):
            age, limit = now - ts, self.stale_after(dt)
            out[f"{dt}/{ex}/{mt}"] = {"last_success_ts": round(ts, 3), "age_s": round(age, 1),
                                      "stale_after_s": limit, "status": "healthy" if age <= limit else "stale"}
        return out

    def status(self) -> str:
        if self.grace_remaining() > 0:
            return "starting"
        states = [v["status"] for v in self.report().values()]
        if "healthy" not in states:
            return "unhealthy"
        return "degraded" if "stale" in states else "healthy"
