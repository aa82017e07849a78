"""Raw traffic recording: every WS frame and REST body the collector receives, exactly as received.

Files: `<record_dir>/<feed>/<YYYYMMDDTHH>-<nnn>.jsonl.gz` (UTC hour of receipt; nnn counts up within the
hour and is zero-padded so that a shell glob lists the files in recording order). Each line is the
envelope of DESIGN.md §4: `{"received_at": MS, "source": "<ws url or REST path with query>", "data": "<raw
text>"}`, which `marketprism replay` reads back through the collector's own parsers.

- A file is rotated when it reaches `record_rotate_mb` (compressed bytes on disk) or the hour changes.
- The gzip stream is sync-flushed every second, so a crash loses about a second of traffic; the file it
  leaves has no gzip trailer, and `replay` reads it up to the last flush.
- Binary WS frames and REST bodies are decoded as UTF-8. Every venue speaks JSON, which is UTF-8, so a
  body that is not valid UTF-8 is unparseable anyway; it is recorded with U+FFFD in place of the bad bytes
  (counted in `not_utf8`) rather than dropped, so the recording still shows that it arrived.
- A failing disk never stops collection: the error is logged, counted, and that feed retries later.
- Cost: about 15 us per 1 KB frame, most of it gzip (level 1); recording is opt-in for that reason.

Two ways to record: the settings `record_dir` (+ `record_feeds`, empty = every feed) in any `collector` or
`run`, alongside normal operation; or `marketprism record`, a collector that records and, by default, also
publishes (MARKETPRISM_NATS_URL required, so nothing is silently left out of the store); `--no-publish`
only records and needs no NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import re
import signal
import sys
import time
import zlib
from pathlib import Path

import msgspec
from loguru import logger

from marketprism.replay import Recorded
from marketprism.settings import FEEDS, Settings

HOUR_MS = 3_600_000
FLUSH_INTERVAL_S = 1.0
BUFFER_BYTES = 64 * 1024  # lines are compressed in chunks: one gzip write per line costs more than the line
COMPRESS_LEVEL = 1  # 6x faster than level 6 (137 vs 21 MB/s here) for 35% larger files: never slow the collector
RETRY_AFTER_ERROR_S = 60.0

_encoder = msgspec.json.Encoder()


class FeedFile:
    """The open recording file of one feed: buffered lines, a gzip stream, its size and hour."""

    def __init__(self, directory: Path, hour: int) -> None:
        self.hour = hour
        stamp = time.strftime("%Y%m%dT%H", time.gmtime(hour * HOUR_MS / 1000))
        directory.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in directory.glob(f"{stamp}-*.jsonl.gz")
                 if (m := re.fullmatch(rf"{stamp}-(\d+)\.jsonl\.gz", p.name))]
        number = max(taken, default=-1) + 1  # a restart within the hour never overwrites a file
        self.path = directory / f"{stamp}-{number:03d}.jsonl.gz"
        self._raw = open(self.path, "xb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=COMPRESS_LEVEL, mtime=0)
        self.buffer = bytearray()

    @property
    def size(self) -> int:
        return self._raw.tell()

    def write(self, line: bytes) -> None:
        self.buffer += line
        if len(self.buffer) >= BUFFER_BYTES:
            self._compress()

    def _compress(self) -> None:
        self._gz.write(self.buffer)
        self.buffer.clear()

    def flush(self) -> None:
        """Everything written so far becomes readable from the file (a gzip sync point, not an fsync)."""
        self._compress()
        self._gz.flush(zlib.Z_SYNC_FLUSH)
        self._raw.flush()

    def close(self) -> None:
        try:
            self._compress()
            self._gz.close()
        finally:
            self._raw.close()


class Recorder:
    """The collector's `recorder` hook: `write(feed, received_ms, source, data)` for every frame and body."""

    def __init__(self, directory: str | Path, feeds: tuple[str, ...] | None = None, rotate_mb: int = 256,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        self.directory = Path(directory)
        self.feeds = frozenset(feeds) if feeds else None  # None: every feed the collector runs
        self.rotate_bytes = rotate_mb * 1024 * 1024
        self.flush_interval_s = flush_interval_s
        self.frames: dict[str, int] = {}
        self.files_opened = 0
        self.not_utf8 = 0
        self.errors = 0
        self._open: dict[str, FeedFile] = {}
        self._failed_until: dict[str, float] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_flush = time.monotonic()

    def write(self, feed: str, received_ms: int, source: str, data: bytes | str) -> None:
        if self.feeds is not None and feed not in self.feeds:
            return
        paused = self._failed_until.get(feed)
        if paused is not None:
            if time.monotonic() < paused:
                return
            del self._failed_until[feed]
        if not isinstance(data, str):
            data = self._text(data)
        line = _encoder.encode(Recorded(received_at=received_ms, source=source, data=data)) + b"\n"
        try:
            self._file_for(feed, received_ms // HOUR_MS).write(line)
        except OSError as e:
            self._fail(feed, e)
            return
        self.frames[feed] = self.frames.get(feed, 0) + 1
        self._schedule_flush()

    def _text(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.not_utf8 += 1
            return data.decode("utf-8", errors="replace")

    def _file_for(self, feed: str, hour: int) -> FeedFile:
        current = self._open.get(feed)
        if current is not None and current.hour == hour and current.size < self.rotate_bytes:
            return current
        if current is not None:
            del self._open[feed]
            current.close()
        current = self._open[feed] = FeedFile(self.directory / feed, hour)
        self.files_opened += 1
        logger.info("recording {} to {}", feed, current.path)
        return current

    def _fail(self, feed: str, error: OSError) -> None:
        """Drop the feed's file and pause its recording; collection itself goes on."""
        self.errors += 1
        broken = self._open.pop(feed, None)
        if broken is not None:
            try:
                broken.close()
            except OSError:
                pass
        self._failed_until[feed] = time.monotonic() + RETRY_AFTER_ERROR_S
        logger.error("recording {} failed ({}); retrying in {:.0f}s, collection goes on", feed, error,
                     RETRY_AFTER_ERROR_S)

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used without an event loop (tools, tests): flush on the clock instead
            if time.monotonic() - self._last_flush >= self.flush_interval_s:
                self.flush()
            return
        self._flush_handle = loop.call_later(self.flush_interval_s, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        self._last_flush = time.monotonic()
        for feed, file in list(self._open.items()):
            try:
                file.flush()
            except OSError as e:
                self._fail(feed, e)

    def close(self) -> None:
        """Finish every file (gzip trailer included); logs what was recorded."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        for feed, file in list(self._open.items()):
            try:
                file.close()
            except OSError as e:
                self.errors += 1
                logger.error("closing the recording of {} failed: {}", feed, e)
        self._open.clear()
        if self.frames or self.errors:
            logger.info(self.summary())

    def summary(self) -> str:
        frames = ", ".join(f"{k}={v}" for k, v in sorted(self.frames.items())) or "none"
        text = (f"record: {sum(self.frames.values())} frames ({frames}) in {self.files_opened} files under "
                f"{self.directory}")
        if self.not_utf8:
            text += f"; {self.not_utf8} not UTF-8"
        if self.errors:
            text += f"; {self.errors} write errors"
        return text


def from_settings(settings: Settings) -> Recorder | None:
    """The recorder the settings ask for: record_dir set turns recording on, record_feeds narrows it."""
    if not settings.record_dir:
        return None
    return Recorder(settings.record_dir, settings.record_feeds or None, settings.record_rotate_mb)


# -- `marketprism record` ------------------------------------------------------------------------------
def feed_list(text: str) -> tuple[str, ...]:
    feeds = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in feeds if f not in FEEDS]
    if bad or not feeds:
        raise argparse.ArgumentTypeError(f"unknown feed {(bad or [text])[0]!r}; feeds are {', '.join(FEEDS)}")
    return feeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Run the collector and write every WS frame and REST body it receives to "
                          "<dir>/<feed>/<YYYYMMDDTHH>-<nnn>.jsonl.gz. By default the records are published "
                          "to JetStream as by `marketprism collector` (MARKETPRISM_NATS_URL is required); "
                          "--no-publish only records. Stop with Ctrl-C or SIGTERM.")
    parser.add_argument("--dir", help="where to write (default: record_dir, else <data_dir>/recordings)")
    parser.add_argument("--feeds", type=feed_list, metavar="FEED,...",
                        help="collect and record only these feeds (default: the collector's feeds, recorded "
                             "as record_feeds says, all of them if it is empty)")
    parser.add_argument("--no-publish", action="store_true",
                        help="only record: no NATS needed, nothing published, no health server")


def main(args, settings: Settings) -> int:
    directory = args.dir or settings.record_dir or str(Path(settings.data_dir) / "recordings")
    changes = {"record_dir": directory}
    if args.feeds:
        changes.update(feeds=args.feeds, record_feeds=args.feeds)
    settings = msgspec.structs.replace(settings, **changes)
    if args.no_publish:
        asyncio.run(record_only(settings))
        return 0
    if not settings.nats_url:
        print("marketprism record: MARKETPRISM_NATS_URL is not set; set it to publish while recording, "
              "or pass --no-publish to only record", file=sys.stderr)
        return 2
    from marketprism.ops import roles
    asyncio.run(roles.run_collector(settings))  # the role creates the recorder from record_dir
    return 0


async def record_only(settings: Settings) -> None:
    """The collector without a bus. Frames are still parsed: the feeds decide which snapshots to fetch
    and which heartbeats to answer, and parse errors and gaps still show in the log."""
    from marketprism.collector.service import Collector

    async def discard(subject: str, payload: bytes, msg_id: str, token=None) -> None:
        return None

    recorder = from_settings(settings)
    collector = Collector(settings, discard, recorder)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, collector.stop)
    logger.info("recording {} to {} (not publishing)", ", ".join(settings.record_feeds or settings.feeds),
                settings.record_dir)
    try:
        await collector.run()
    finally:
        recorder.close()
