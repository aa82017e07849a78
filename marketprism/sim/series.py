"""Slow market series (funding, open interest, long/short ratios, volatility index) and the clock.

Every series is a pure function of (seed, name, time): a REST history asked twice returns the same
rows, and a row served by REST agrees with the value pushed on the WebSocket at the same time.
--speed shrinks every period (funding interval, ratio period, push cadence) by the same factor;
timestamps stay on the wall clock so records are never stamped in the future.
"""

from __future__ import annotations

import math
import random
import time

HOUR_MS = 3_600_000
FUNDING_MS = 8 * HOUR_MS
PERIOD_MS = {"5m": 300_000, "15m": 900_000, "30m": 1_800_000, "1h": HOUR_MS, "2h": 2 * HOUR_MS,
             "4h": 4 * HOUR_MS, "6h": 6 * HOUR_MS, "12h": 12 * HOUR_MS, "1d": 24 * HOUR_MS}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Series:
    """Deterministic smooth waves, seeded once per simulator."""

    def __init__(self, seed: int, speed: float):
        self.seed = seed
        self.speed = speed
        self._phases: dict[str, tuple[float, float, float]] = {}

    def span(self, real_ms: float) -> int:
        """A real-world duration as the simulator runs it (at least 1 ms)."""
        return max(1, int(real_ms / self.speed))

    def cadence(self, real_s: float) -> float:
        return max(0.01, real_s / self.speed)

    def wave(self, name: str, t_ms: int, period_ms: float) -> float:
        """A value in [-1, 1] that drifts smoothly over about `period_ms` (real time, sped up)."""
        ph = self._phases.get(name)
        if ph is None:
            r = random.Random(f"{self.seed}:{name}")
            ph = self._phases[name] = (r.uniform(0, 6.283), r.uniform(0, 6.283), r.uniform(0, 6.283))
        x = t_ms * self.speed / period_ms * 6.283185307179586
        v = 0.6 * math.sin(x + ph[0]) + 0.3 * math.sin(2.7 * x + ph[1]) + 0.1 * math.sin(7.3 * x + ph[2])
        return max(-1.0, min(1.0, v))

    def boundary(self, t_ms: int, real_period_ms: int) -> int:
        """Start of the (sped-up) period that holds t_ms."""
        span = self.span(real_period_ms)
        return t_ms - t_ms % span

    def next_funding(self, t_ms: int, real_period_ms: int = FUNDING_MS) -> int:
        return self.boundary(t_ms, real_period_ms) + self.span(real_period_ms)

    def funding_rate(self, key: str, t_ms: int) -> float:
        return 0.0001 + 0.00009 * self.wave(f"fr:{key}", t_ms, 6 * HOUR_MS)

    def open_interest(self, key: str, t_ms: int, base: float) -> float:
        return base * (1.0 + 0.08 * self.wave(f"oi:{key}", t_ms, 2 * HOUR_MS))

    def long_ratio(self, key: str, t_ms: int) -> float:
        """Share of longs in [0.30, 0.70]; the short share is 1 - this."""
        return 0.5 + 0.2 * self.wave(f"ls:{key}", t_ms, 12 * HOUR_MS)

    def premium(self, key: str, t_ms: int) -> float:
        return 0.0002 * self.wave(f"pm:{key}", t_ms, 600_000)

    def volatility(self, key: str, t_ms: int) -> float:
        return 55.0 + 15.0 * self.wave(f"vol:{key}", t_ms, 24 * HOUR_MS)

    def rows(self, real_period_ms: int, limit: int, start: int | None, end: int | None,
             newest_first: bool) -> list[int]:
        """Period starts for a history query: the latest `limit` within [start, end], or the
        earliest `limit` from start when only start is given (as the venues page forward)."""
        span = self.span(real_period_ms)
        last = self.boundary(now_ms(), real_period_ms)
        if end is not None:
            last = min(last, end - end % span)
        if start is not None and end is None:
            first = start + (-start) % span
            out = list(range(first, last + 1, span)[:limit])
            return out[::-1] if newest_first else out
        out = []
        t = last
        while len(out) < limit and t > 0 and (start is None or t >= start):
            out.append(t)
            t -= span
        return out if newest_first else out[::-1]
