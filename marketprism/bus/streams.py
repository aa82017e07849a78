"""Stream and consumer definitions from nats/ (the same files the compose init container applies)."""

from __future__ import annotations

import json
from pathlib import Path

import nats
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError


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


async def connect(url: str, user: str = "", password: str = "", name: str = "marketprism", **kw) -> nats.NATS:
    opts = dict(name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5,
                allow_reconnect=True, pending_size=64 * 1024 * 1024, **kw)
    if user:
        opts.update(user=user, password=password)
    return await nats.connect(url, **opts)


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
