"""Per data type x exchange/market_type: when did data last arrive, and is that recent enough."""

from __future__ import annotations

import time

# Seconds without data before a stream counts as stale (DESIGN: trades/books fast, others slow).
STALE_AFTER_S = {"trade": 60, "orderbook": 60, "liquidation": 3600}
SLOW_STALE_AFTER_S = 8 * 3600
GRACE_S = 120


class Coverage:
    def __init__(self, grace_s: float = GRACE_S) -> None:
        self.started = time.time()
        self.grace_s = grace_s
        self.last: dict[tuple[str, str, str], float] = {}

    def seen(self, data_type: str, exchange: str, market_type: str) -> None:
        self.last[(data_type, exchange, market_type)] = time.time()

    def report(self) -> dict:
        now = time.time()
        out = {}
        for (dt, ex, mt), ts in sorted(self.last.items()):
            age = now - ts
            limit = STALE_AFTER_S.get(dt, SLOW_STALE_AFTER_S)
            out[f"{dt}/{ex}/{mt}"] = {"last_success_ts": round(ts, 3), "age_s": round(age, 1),
                                      "status": "healthy" if age <= limit else "stale"}
        return out

    def status(self) -> str:
        if time.time() - self.started < self.grace_s:
            return "starting"
        stale = [v for v in self.report().values() if v["status"] != "healthy"]
        if not self.last:
            return "unhealthy"
        return "degraded" if stale else "healthy"
