"""Continuity the collector owes beyond one connection: across its own restarts and when the bus cannot
take records. Both turn into gap records, never into silent holes.

- `StreamState` remembers, per stream, where delivery stands (time, sequence) in a small JSON file under
  the data dir, written at most once a second: after the last record JetStream acknowledged, or, while
  records of the stream wait for their ack, just before the oldest of them (a kill loses what is still
  unacknowledged, so the hole starts there). On start, each remembered stream gets a `restart` gap from
  that point to now: a killed or stopped collector leaves a visible, bounded hole.
- `Overflow` takes the records dropped while JetStream's unacknowledged backlog is at its bound (NATS down
  for long): per stream it keeps only the first/last time and sequence, so memory stays bounded, and it
  yields one `backpressure` gap per stream once there is room again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from loguru import logger

from marketprism.records import Gap, Record

StreamKey = tuple[str, str, str, str, str]  # data_type, exchange, market_type, symbol, instrument


def key_of(rec: Record, dt: str) -> StreamKey:
    return dt, rec.exchange, rec.market_type, rec.symbol, rec.instrument


def sequence_of(rec: Record, dt: str) -> int | None:
    """The stream's own sequence where it has one: book sequence, numeric trade id."""
    if dt == "orderbook":
        return rec.sequence
    if dt == "trade" and rec.trade_id.isdigit():
        return int(rec.trade_id)
    return None


def _gap(key: StreamKey, reason: str, started_at: int, ended_at: int, from_seq: int | None,
         to_seq: int | None) -> Gap:
    dt, exchange, market_type, symbol, instrument = key
    return Gap(exchange=exchange, market_type=market_type, symbol=symbol, instrument=instrument,
               timestamp=ended_at, received_at=ended_at, stream_type=dt, reason=reason,
               from_sequence=from_seq, to_sequence=to_seq, started_at=started_at, ended_at=ended_at)


# What the publisher carries with a message and hands back on its ack: (stream, timestamp, sequence, is
# a record). For a record, its own time and sequence; for a gap, the point the gap starts after.
Token = tuple[StreamKey, int, "int | None", bool]


class StreamState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: dict[StreamKey, tuple[int, int | None]] = {}  # the last acknowledged record per stream
        self.unacked = lambda: ()  # () -> iterable of the tokens still waiting for an ack (set by the owner)
        self.dirty = False

    @staticmethod
    def token(rec: Record, dt: str) -> Token:
        return key_of(rec, dt), rec.timestamp, sequence_of(rec, dt), True

    @staticmethod
    def gap_token(gap: Gap) -> Token:
        key = gap.stream_type, gap.exchange, gap.market_type, gap.symbol, gap.instrument
        return key, gap.started_at, None if gap.from_sequence is None else gap.from_sequence - 1, False

    def acked(self, token: Token) -> None:
        key, ts, seq, is_record = token
        if is_record:
            last = self.last.get(key)
            if last is None or ts >= last[0]:
                self.last[key] = (ts, seq)
        self.dirty = True

    def positions(self) -> dict[StreamKey, tuple[int, int | None]]:
        """Per stream, the point everything up to which is delivered."""
        holes: dict[StreamKey, tuple[int, int | None]] = {}
        for key, ts, seq, is_record in self.unacked():
            point = (ts, seq - 1 if is_record and seq is not None else seq)
            if key not in holes or point[0] < holes[key][0]:
                holes[key] = point
        return {**self.last, **holes}

    def restart_gaps(self, now_ms: int) -> list[Gap]:
        """Gaps for every stream the previous run delivered, from its last record to now."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            logger.warning("collector state {} unreadable ({}): no restart gaps recorded", self.path, e)
            return []
        gaps = []
        for entry in saved.get("streams", []):
            key, ts, seq = tuple(entry["key"]), entry["timestamp"], entry["sequence"]
            gaps.append(_gap(key, "restart", ts, max(now_ms, ts), None if seq is None else seq + 1, None))
        return gaps

    def save(self) -> None:
        positions = self.positions()
        if not self.dirty and positions == self.last:
            return  # nothing acknowledged since the last save, nothing waiting
        self.dirty = False
        body = {"streams": [{"key": list(k), "timestamp": ts, "sequence": seq} for k, (ts, seq) in positions.items()]}
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.path)  # atomic: a kill never leaves half a file
        except OSError as e:
            logger.warning("cannot save collector state {}: {}", self.path, e)


class Overflow:
    def __init__(self) -> None:
        self.dropped: dict[StreamKey, list] = {}  # key -> [first_ts, last_ts, first_seq, last_seq, count]
        self.total = 0

    def drop(self, rec: Record, dt: str) -> None:
        key, seq = key_of(rec, dt), sequence_of(rec, dt)
        entry = self.dropped.get(key)
        if entry is None:
            self.dropped[key] = [rec.timestamp, rec.timestamp, seq, seq, 1]
        else:
            entry[1], entry[3], entry[4] = rec.timestamp, seq if seq is not None else entry[3], entry[4] + 1
        self.total += 1

    def gaps(self) -> list[Gap]:
        out = [_gap(key, "backpressure", first, last, first_seq, last_seq)
               for key, (first, last, first_seq, last_seq, _) in self.dropped.items()]
        self.dropped.clear()
        return out


