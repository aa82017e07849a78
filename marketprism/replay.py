"""`marketprism replay`: raw recordings -> normalized records, through the collector's own feed code."""

from __future__ import annotations

import gzip
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator

import msgspec

from marketprism.exchanges import make_feed
from marketprism.exchanges.base import Feed
from marketprism.records import Record


class Recorded(msgspec.Struct):
    """The envelope `marketprism record` writes around each WS frame or REST body."""
    received_at: int
    source: str
    data: str


_recorded = msgspec.json.Decoder(Recorded)


def read_lines(paths: Iterable[str]) -> Iterator[bytes]:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            yield from f


def unwrap(line: bytes, default_received_at: int) -> tuple[bytes | str, str | None, int]:
    """(data, source, received_at) of one recorded line, bare or enveloped."""
    head = line[:48]
    if b'"received_at"' in head and b'"source"' in line and b'"data"' in line:
        try:
            env = _recorded.decode(line)
            return env.data, env.source, env.received_at
        except msgspec.DecodeError:
            pass
    return line, None, default_received_at


def replay(feed: Feed, lines: Iterable[bytes], received_at: int | None = None) -> Iterator[Record]:
    """Every record the feed makes from the lines, in order; bad lines are counted in feed.errors."""
    default_received = received_at if received_at is not None else int(time.time() * 1000)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        data, source, rec_at = unwrap(line, default_received)
        yield from feed.on_message(data, source, rec_at)
        feed.take_requests()  # nothing can be fetched offline; a later snapshot in the input rebuilds


def run(feed_name: str, paths: list[str], depth: int, out=None) -> int:
    out = out or sys.stdout.buffer
    encoder = msgspec.json.Encoder()
    buf = bytearray()
    count = Counter()
    lines = 0

    def counted(it):
        nonlocal lines
        for line in it:
            lines += 1
            yield line

    feed = make_feed(feed_name, depth=depth, book_interval_ms=0)
    for record in replay(feed, counted(read_lines(paths))):
        count[record.__struct_config__.tag] += 1
        encoder.encode_into(record, buf, len(buf))
        buf.extend(b"\n")
        if len(buf) > 1 << 20:
            out.write(buf)
            buf.clear()
    out.write(buf)
    out.flush()
    errors = feed.errors
    bad = sum(errors.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items()))
    made = ", ".join(f"{k}={v}" for k, v in sorted(count.items())) or "none"
    print(f"replay: {lines} lines, records {made}; {bad} unparseable" + (f" ({summary})" if bad else ""),
          file=sys.stderr)
    return 0
