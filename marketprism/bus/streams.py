"""Stream and consumer definitions from nats/ (the same files the compose init container applies)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nats
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError
from loguru import logger


def nats_dir() -> Path:
    """nats/ of the repository, shipped in the package as bus/defs (a symlink in the checkout)."""
    path = Path(__file__).resolve().parent / "defs"
    if not (path / "MARKET_DATA.json").exists():
        raise FileNotFoundError("the nats/ stream definitions are missing from this installation")
    return path


def stream_configs() -> list[StreamConfig]:
    return [StreamConfig.from_response(json.loads(p.read_text())) for p in sorted(nats_dir().glob("*.json"))]


def consumer_configs() -> list[tuple[str, ConsumerConfig]]:
    out = []
    for p in sorted((nats_dir() / "consumers").glob("*.json")):
        raw = json.loads(p.read_text())
        stream = raw.pop("stream_name")
        out.append((stream, ConsumerConfig.from_response(raw)))
    return out


async def _log_nats_error(e: Exception) -> None:
    # nats-py's default callback logs a full traceback per failed attempt to stderr; one redacted line is
    # enough (the messages name host:port, never credentials, but redact in case a URL is echoed back)
    logger.debug("nats: {}", redact_text(str(e) or type(e).__name__))


def redact_text(text: str) -> str:
    return re.sub(r"(\w+://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


async def connect(url: str, user: str = "", password: str = "", name: str = "marketprism", **kw) -> nats.NATS:
    """A bounded first connect (two tries; the caller retries with backoff), then reconnect forever.

    With allow_reconnect on from the start nats-py retries the *first* connect forever, so a wrong URL
    would hang a role instead of failing it with one line."""
    opts = dict(name=name, max_reconnect_attempts=1, reconnect_time_wait=0.5, connect_timeout=5,
                allow_reconnect=True, pending_size=64 * 1024 * 1024, error_cb=_log_nats_error, **kw)
    if user:
        opts.update(user=user, password=password)
    nc = await nats.connect(url, **opts)
    nc.options["max_reconnect_attempts"] = -1  # read at each reconnect: from here on, never give up
    return nc


async def ensure(nc: nats.NATS) -> list[str]:
    """Create or update every stream and consumer; returns what was done, one line each."""
    js = nc.jetstream()
    done = []
    for cfg in stream_configs():
        try:
            await js.stream_info(cfg.name)
            await js.update_stream(cfg)
            done.append(f"stream {cfg.name} updated")
        except NotFoundError:
            await js.add_stream(cfg)
            done.append(f"stream {cfg.name} created")
    for stream, cfg in consumer_configs():
        await js.add_consumer(stream, cfg)  # idempotent for an unchanged config; updates the mutable fields
        done.append(f"consumer {stream}/{cfg.durable_name} ensured")
    return done
