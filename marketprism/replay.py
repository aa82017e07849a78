"""`marketprism replay`: raw recordings -> normalized records, through the collector's own feed code.

Input lines are bare exchange messages or `marketprism record` envelopes (DESIGN.md §4), plain or gzip (a
recording cut short by a crash is read up to its last flush). Output: JSON Lines on stdout, or with
`--publish` the records go to JetStream under their dedup keys, as the collector publishes them.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

import msgspec

from marketprism.exchanges import make_feed
from marketprism.exchanges.base import Feed
from marketprism.records import STREAM_FOR, Record, dedup_key, encode, subject


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
            try:
                yield from f
            except EOFError:
                # A recording still being written, or left by a crash: no gzip trailer. Everything up to
                # its last sync flush has been read; the rest never reached the disk.
                print(f"replay: {path} ends without a gzip trailer (unfinished recording); read up to its last flush",
                      file=sys.stderr)


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
    lists = instrument_list_paths(feed)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        data, source, rec_at = unwrap(line, default_received)
        if source and lists and urlsplit(source).path in lists:
            apply_instrument_list(feed, data)
            continue
        yield from feed.on_message(data, source, rec_at)
        feed.take_requests()  # nothing can be fetched offline; a later snapshot in the input rebuilds


def instrument_list_paths(feed: Feed) -> frozenset[str]:
    """REST paths of the venue's instrument list. The collector hands those bodies to the feed as metadata
    (symbols, contract sizes) rather than as messages; a recording that holds them is replayed the same way."""
    try:
        from marketprism.collector import instruments
    except ImportError:  # a build without instrument metadata: every body is a message
        return frozenset()
    return frozenset(urlsplit(p).path for p in instruments.paths(feed, ("BTC-USDT",)))


def apply_instrument_list(feed: Feed, data: bytes | str) -> None:
    from marketprism.collector import instruments
    try:
        found = instruments.PARSERS[feed.name](data)
    except (msgspec.DecodeError, ValueError):
        feed.errors["unreadable instrument list"] += 1
        return
    feed.set_instruments({**feed.instrument_info, **found})


def main(args, settings) -> int:
    """`marketprism replay`: normalized JSON Lines on stdout, or with --publish into JetStream."""
    if getattr(args, "publish", False):
        return asyncio.run(publish(args.exchange, args.files, args.depth, settings))
    return run(args.exchange, args.files, args.depth)


class _Counted:
    """Lines read and records made, for the one summary line on standard error."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.lines = 0
        self.records: Counter[str] = Counter()

    def __iter__(self) -> Iterator[bytes]:
        for line in read_lines(self.paths):
            self.lines += 1
            yield line

    def summary(self, feed: Feed) -> str:
        bad = sum(feed.errors.values())
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(feed.errors.items()))
        made = ", ".join(f"{k}={v}" for k, v in sorted(self.records.items())) or "none"
        return f"replay: {self.lines} lines, records {made}; {bad} unparseable" + (f" ({errors})" if bad else "")


def run(feed_name: str, paths: list[str], depth: int, out=None) -> int:
    out = out or sys.stdout.buffer
    encoder = msgspec.json.Encoder()
    buf = bytearray()
    counted = _Counted(paths)
    feed = make_feed(feed_name, depth=depth, book_interval_ms=0)
    for record in replay(feed, counted):
        counted.records[record.__struct_config__.tag] += 1
        encoder.encode_into(record, buf, len(buf))
        buf.extend(b"\n")
        if len(buf) > 1 << 20:
            out.write(buf)
            buf.clear()
    out.write(buf)
    out.flush()
    print(counted.summary(feed), file=sys.stderr)
    return 0


async def publish(feed_name: str, paths: list[str], depth: int, settings) -> int:
    """Publish the replayed records to JetStream with their dedup keys as Nats-Msg-Id, exactly as the
    collector does: a recording can be re-ingested, and replaying it again adds nothing (JetStream drops
    repeats within its duplicate window, the tables collapse later ones by the same key)."""
    from marketprism.bus import streams
    from marketprism.settings import redact

    if not settings.nats_url:
        print("marketprism replay: --publish needs MARKETPRISM_NATS_URL", file=sys.stderr)
        return 2
    try:
        nc = await streams.connect(settings.nats_url, name="marketprism-replay", **streams.client_options(settings))
    except Exception as e:  # noqa: BLE001 - nats-py raises several types for "not reachable"
        print(f"marketprism replay: cannot reach NATS at {redact(settings.nats_url)}: {e or type(e).__name__}",
              file=sys.stderr)
        return 1
    try:
        missing = await _missing_streams(nc)
        if missing:
            print(f"marketprism replay: stream {missing[0]} does not exist; run `marketprism init --streams`",
                  file=sys.stderr)
            return 1
        return await _publish_all(nc, feed_name, paths, depth, settings.publish_max_pending)
    finally:
        await nc.drain()


async def _missing_streams(nc) -> list[str]:
    from nats.js.errors import NotFoundError
    missing = []
    for name in sorted(set(STREAM_FOR.values())):
        try:
            await nc.jetstream().stream_info(name)
        except NotFoundError:
            missing.append(name)
    return missing


async def _publish_all(nc, feed_name: str, paths: list[str], depth: int, max_pending: int) -> int:
    from marketprism.bus.publisher import Publisher
    publisher = Publisher(nc, max_pending=max_pending)
    await publisher.start()
    counted = _Counted(paths)
    feed = make_feed(feed_name, depth=depth, book_interval_ms=0)
    try:
        for record in replay(feed, counted):
            counted.records[record.__struct_config__.tag] += 1
            await publisher.publish(subject(record), encode(record), dedup_key(record))
        acked = await publisher.flush(60)
    finally:
        await publisher.close()
    total = sum(counted.records.values())
    print(f"{counted.summary(feed)}; published {total - len(publisher.pending)} of {total} "
          f"({publisher.duplicates} already in JetStream)", file=sys.stderr)
    if not acked:
        print(f"marketprism replay: {len(publisher.pending)} records not acknowledged by JetStream",
              file=sys.stderr)
        return 1
    return 0
