"""Stream and consumer definitions from nats/ (the same files the compose init container applies)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import nats
from nats.js.api import ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError
from loguru import logger

from marketprism.bus import wire


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


def client_options(settings) -> dict:
    """Credentials and TLS for connect() from the settings: user/password or an nkey seed file, and a TLS
    context (nats-py `tls=`) when a CA or client certificate is set or the URL is tls://."""
    opts: dict = {}
    if settings.nats_nkey_seed:
        opts["nkeys_seed"] = settings.nats_nkey_seed  # nats-py reads it at each (re)connect to sign the nonce
    elif settings.nats_user:
        opts.update(user=settings.nats_user, password=settings.nats_password)
    tls = settings.nats_tls()
    if tls is not None:
        opts["tls"] = tls
    return opts


def uses_tls(nc: nats.NATS, url: str) -> bool:
    """True if the connection runs over TLS (nats-py upgrades only when the server's INFO requires it)."""
    if urlsplit(url).scheme == "wss":
        return True
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    return writer is not None and writer.get_extra_info("ssl_object") is not None


async def require_tls(nc: nats.NATS, url: str, tls) -> None:
    """With TLS configured, refuse a server that did not switch to TLS instead of going on in clear.

    nats-py has no "TLS required" switch: it upgrades when the server's INFO asks for it, else stays in
    clear. So this check comes after the CONNECT line (password or nkey signature) went out."""
    if (tls is not None or url.startswith("tls://")) and not uses_tls(nc, url):
        await nc.close()
        raise ConnectionError("the server did not switch to TLS, but nats_tls_ca, nats_tls_cert or a tls:// "
                              "nats_url requires it")


async def connect(url: str, user: str = "", password: str = "", name: str = "marketprism", **kw) -> nats.NATS:
    """A bounded first connect (one try; the caller retries with backoff), then reconnect forever.

    The first connect runs with allow_reconnect off: with it on, nats-py retries the first connect forever
    (max_reconnect_attempts=-1), and after a failed TLS handshake it waits forever on the dead socket
    (nats-py issue #718), so a wrong URL or CA would hang a role instead of failing it with one line. Off,
    nats-py raises the attempt's own error (certificate, authorization), which names the problem."""
    opts = dict(name=name, max_reconnect_attempts=1, reconnect_time_wait=0.5, connect_timeout=5,
                allow_reconnect=False, pending_size=64 * 1024 * 1024, error_cb=_log_nats_error, **kw)
    if user:
        opts.update(user=user, password=password)
    nc = nats.NATS()
    wire.install(nc)
    try:
        await nc.connect(url, **opts)
    except BaseException:
        if nc._transport is not None:  # nats-py leaves the failed attempt's socket open when it bails
            nc._transport.close()
        raise
    await require_tls(nc, url, kw.get("tls"))
    # both read at each disconnect/reconnect: from here on, reconnect and never give up
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
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
