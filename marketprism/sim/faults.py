"""Fault scripts: validation and the per-feed state that the feed consults while it runs.

The JSON format is documented in marketprism/sim/__init__.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

FAULT_TYPES = ("drop", "skip_sequence", "malformed", "truncated", "stale", "rest_status", "rest_delay")


def parse_fault(obj: object, feeds: tuple[str, ...]) -> dict:
    """A validated copy of one fault object; raises ValueError with a one-line reason."""
    if not isinstance(obj, dict):
        raise ValueError("a fault must be a JSON object")
    kind = obj.get("type")
    if kind not in FAULT_TYPES:
        raise ValueError(f"fault type must be one of {', '.join(FAULT_TYPES)}, not {kind!r}")
    feed = obj.get("feed", "*")
    if feed != "*" and feed not in feeds:
        raise ValueError(f"unknown feed {feed!r} (running: {', '.join(feeds)})")
    out = dict(obj, feed=feed)
    for key, default in (("count", 1), ("at", 0), ("seconds", 5 if kind in ("stale", "rest_delay") else 0)):
        value = obj.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a non-negative number")
        out[key] = value
    if kind == "rest_status":
        status = obj.get("status", 429)
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        out["status"] = status
    if kind == "drop" and obj.get("mode", "close") not in ("close", "abort"):
        raise ValueError("drop mode must be 'close' or 'abort'")
    return out


def parse_faults(obj: object, feeds: tuple[str, ...]) -> list[dict]:
    items = obj if isinstance(obj, list) else [obj]
    return [parse_fault(item, feeds) for item in items]


@dataclass
class RestRule:
    remaining: int
    path: str | None
    status: int = 0
    retry_after: float | None = None
    delay_s: float = 0.0


@dataclass
class FaultState:
    """What one feed still owes its clients: skipped diffs, truncations, stale time, REST rules."""
    skips: list[list] = field(default_factory=list)      # [instrument or None, remaining]
    truncations: list[list] = field(default_factory=list)  # [data_type or None, remaining]
    stale_until: float = 0.0
    rest_status: list[RestRule] = field(default_factory=list)
    rest_delay: list[RestRule] = field(default_factory=list)
    applied: dict[str, int] = field(default_factory=dict)

    def note(self, kind: str, n: int = 1) -> None:
        self.applied[kind] = self.applied.get(kind, 0) + n

    def stale(self) -> bool:
        return time.monotonic() < self.stale_until

    def take_skip(self, instrument_id: str, symbol: str) -> bool:
        for rule in self.skips:
            if rule[0] is None or rule[0] in (instrument_id, symbol):
                rule[1] -= 1
                if rule[1] <= 0:
                    self.skips.remove(rule)
                self.note("skip_sequence")
                return True
        return False

    def take_truncation(self, data_type: str) -> bool:
        for rule in self.truncations:
            if rule[0] is None or rule[0] == data_type:
                rule[1] -= 1
                if rule[1] <= 0:
                    self.truncations.remove(rule)
                self.note("truncated")
                return True
        return False

    def take_rest(self, path: str) -> tuple[RestRule | None, float]:
        """The status rule that answers this request (if any) and the delay to apply."""
        status = _take(self.rest_status, path)
        delay = _take(self.rest_delay, path)
        if status:
            self.note("rest_status")
        if delay:
            self.note("rest_delay")
        return status, delay.delay_s if delay else 0.0

    def arm(self, fault: dict) -> None:
        """Record a fault that acts later (the immediate ones are carried out by the feed)."""
        kind, count, path = fault["type"], int(fault["count"]), fault.get("path")
        if kind == "skip_sequence":
            self.skips.append([fault.get("symbol"), max(1, count)])
        elif kind == "truncated":
            self.truncations.append([fault.get("data_type"), max(1, count)])
        elif kind == "stale":
            self.stale_until = max(self.stale_until, time.monotonic() + float(fault["seconds"]))
            self.note("stale")
        elif kind == "rest_status":
            self.rest_status.append(RestRule(max(1, count), path, fault["status"], fault.get("retry_after")))
        elif kind == "rest_delay":
            self.rest_delay.append(RestRule(max(1, count), path, delay_s=float(fault["seconds"])))


def _take(rules: list[RestRule], path: str) -> RestRule | None:
    for rule in rules:
        if rule.path is None or path.endswith(rule.path) or rule.path in path:
            rule.remaining -= 1
            if rule.remaining <= 0:
                rules.remove(rule)
            return rule
    return None
