"""Settings: one frozen object built from an optional YAML file and MARKETPRISM_* environment variables.

Precedence: defaults < YAML file (MARKETPRISM_CONFIG or --config) < environment. Any setting can also be
read from a file named by MARKETPRISM_<NAME>_FILE (for secrets). Errors name the key in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

from marketprism.records import DATA_TYPES

FEEDS = ("binance_spot", "binance_usdm", "okx", "deribit", "bybit_spot", "bybit_linear")
DEFAULT_WS_URLS = {
    "binance_spot": "wss://stream.binance.com:9443",
    "binance_usdm": "wss://fstream.binance.com",
    "okx": "wss://ws.okx.com:8443",
    "deribit": "wss://www.deribit.com",
    "bybit_spot": "wss://stream.bybit.com",
    "bybit_linear": "wss://stream.bybit.com",
}
DEFAULT_REST_URLS = {
    "binance_spot": "https://api.binance.com",
    "binance_usdm": "https://fapi.binance.com",
    "okx": "https://www.okx.com",
    "deribit": "https://www.deribit.com",
    "bybit_spot": "https://api.bybit.com",
    "bybit_linear": "https://api.bybit.com",
}
ROLE_HEALTH_PORTS = {"collector": 8087, "storage-hot": 8085, "storage-cold": 8086, "run": 8087}
ENV_PREFIX = "MARKETPRISM_"


def redact(url: str) -> str:
    """A URL safe for logs and health output: the password replaced by ***."""
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key."""


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = "./data"
    nats_url: str = ""  # empty: `run` starts a managed nats-server under data_dir
    embedded_nats_port: int = 4222  # the managed nats-server's port (loopback only)
    nats_user: str = ""
    nats_password: str = ""
    clickhouse_url: str = ""  # empty: chdb://<data_dir>/clickhouse
    hot_ttl_days: int = 3
    feeds: tuple[str, ...] = FEEDS
    symbols: tuple[str, ...] = ("BTC-USDT", "ETH-USDT")
    data_types: tuple[str, ...] = tuple(dt for dt in DATA_TYPES if dt != "gap")
    depth: int = 400
    book_interval_ms: int = 100
    ws_urls: dict[str, str] = {}
    rest_urls: dict[str, str] = {}
    health_host: str = "127.0.0.1"
    health_port: int = 0  # 0: the role's default port
    log_level: str = "INFO"
    batch_rows: int = 20000
    flush_interval_s: float = 0.25
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    reconnect_max_s: float = 30.0
    publish_max_pending: int = 50000
    # storage-cold: copies closed windows hot -> cold and verifies them
    cold_clickhouse_url: str = ""  # empty: the cold database lives in the hot store
    archive_window_s: int = 3600
    archive_delay_s: int = 600  # safety lag before a window counts as closed (slow tables use more)
    archive_interval_s: float = 60.0
    # operations
    metrics_port: int = 0  # 0: /metrics on the health port (collector: 9093)
    grace_s: float = 120.0
    stale_fast_s: float = 60.0  # trades and books
    stale_liquidation_s: float = 3600.0
    stale_slow_s: float = 8 * 3600.0  # funding, open interest, ratios, volatility index
    log_file: str = ""  # empty: stderr only; embedded run rotates it by size
    log_rotation_mb: int = 50
    # raw traffic recording (opt-in per feed)
    record_dir: str = ""
    record_feeds: tuple[str, ...] = ()
    record_rotate_mb: int = 256

    def __post_init__(self) -> None:
        _check_members("feeds", self.feeds, FEEDS)
        _check_members("data_types", self.data_types, DATA_TYPES)
        _check_members("record_feeds", self.record_feeds, FEEDS)
        _check_members("ws_urls", tuple(self.ws_urls), FEEDS)
        _check_members("rest_urls", tuple(self.rest_urls), FEEDS)
        for key in ("hot_ttl_days", "depth", "batch_rows", "publish_max_pending", "archive_window_s",
                    "archive_interval_s", "record_rotate_mb", "log_rotation_mb"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be a positive integer, got {getattr(self, key)}")
        if self.log_level.upper() not in ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: unknown level {self.log_level!r}")
        for key in ("clickhouse_url", "cold_clickhouse_url"):
            url = getattr(self, key)
            if url and not url.startswith(("chdb://", "http://", "https://")):
                raise ConfigError(f"{key}: must start with chdb://, http:// or https://, got {redact(url)!r}")

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{Path(self.data_dir, 'clickhouse')}"

    def ws_url(self, feed: str) -> str:
        return self.ws_urls.get(feed, DEFAULT_WS_URLS[feed]).rstrip("/")

    def rest_url(self, feed: str) -> str:
        return self.rest_urls.get(feed, DEFAULT_REST_URLS[feed]).rstrip("/")

    def port_for(self, role: str) -> int:
        return self.health_port or ROLE_HEALTH_PORTS[role]


def _check_members(key: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ConfigError(f"{key}: unknown value(s) {', '.join(bad)}; expected one of {', '.join(allowed)}")


def _env_value(environ: dict[str, str], name: str) -> str | None:
    if name in environ:
        return environ[name]
    path = environ.get(name + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ConfigError(f"{name}_FILE: cannot read {path}: {e.strerror}") from None
    return None


def _from_env(environ: dict[str, str]) -> dict:
    raw: dict = {}
    for field in Settings.__struct_fields__:
        if field in ("ws_urls", "rest_urls"):
            continue
        value = _env_value(environ, ENV_PREFIX + field.upper())
        if value is None:
            continue
        default = getattr(Settings(), field)
        raw[field] = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(default, tuple) else value
    for kind in ("ws", "rest"):
        urls = {f: environ[ENV_PREFIX + f"{f.upper()}_{kind.upper()}_URL"] for f in FEEDS
                if ENV_PREFIX + f"{f.upper()}_{kind.upper()}_URL" in environ}
        if urls:
            raw[f"{kind}_urls"] = urls
    return raw


def load(config_path: str | None = None, environ: dict[str, str] | None = None, **overrides) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    raw: dict = {}
    path = config_path or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {path} must hold a mapping of settings")
        raw.update(loaded)
    env = _from_env(environ)
    for kind in ("ws_urls", "rest_urls"):
        if kind in env:
            env[kind] = {**raw.get(kind, {}), **env[kind]}
    raw.update(env)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        msg = str(e)
        if " - at `$." in msg:
            text, key = msg.rsplit(" - at `$.", 1)
            raise ConfigError(f"{key.rstrip('`').split('[')[0]}: {text}") from None
        if " - at `" not in msg and ":" in msg and "unknown field" not in msg:
            raise ConfigError(msg) from None
        if "unknown field" in msg:
            raise ConfigError(f"config: {msg.replace('Object contains unknown field', 'unknown key')}") from None
        raise ConfigError(f"config: {msg}") from None
