"""Settings: one frozen object built from an optional YAML file and MARKETPRISM_* environment variables.

Precedence: defaults < YAML file (MARKETPRISM_CONFIG or --config) < environment. Any setting can also be
read from a file named by MARKETPRISM_<NAME>_FILE (for secrets). Errors name the key in one line.
"""

from __future__ import annotations

import os
import re
import ssl
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
    nats_nkey_seed: str = ""  # path of an nkey user seed file: instead of nats_user/nats_password
    nats_tls_ca: str = ""  # CA bundle (PEM) for the NATS server's certificate; set (or a tls:// URL) = TLS
    nats_tls_cert: str = ""  # client certificate (PEM) for mutual TLS, with nats_tls_key
    nats_tls_key: str = ""
    clickhouse_url: str = ""  # empty: chdb://<data_dir>/clickhouse
    clickhouse_ca: str = ""  # CA bundle (PEM) for https:// ClickHouse URLs (clickhouse_url and cold_clickhouse_url)
    clickhouse_tls_verify: bool = True  # false: any server certificate is accepted (tests only)
    clickhouse_tls_cert: str = ""  # client certificate (PEM) for mutual TLS, with clickhouse_tls_key
    clickhouse_tls_key: str = ""
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
        _check_nats_security(self)
        _check_clickhouse_tls(self)

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{Path(self.data_dir, 'clickhouse')}"

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS when a CA or client certificate is set or the URL is tls://; else None."""
        if not (self.nats_tls_ca or self.nats_tls_cert or self.nats_url.startswith("tls://")):
            return None
        return tls_context(self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)

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


_SEED = re.compile(r"S[A-Z2-7]{57}")  # an encoded nkey seed; a user seed starts SU


def tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client TLS context: the server's certificate and host name verified against `ca` (the system's CAs
    when empty), and a client certificate for mutual TLS when `cert` is given."""
    ctx = ssl.create_default_context(cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None, password=_no_password)
    return ctx


def _no_password():
    # without a callback OpenSSL would prompt on the terminal for the passphrase of an encrypted key
    raise ConfigError("an encrypted private key is not supported: give the key file without a passphrase")


def _check_file(key: str, path: str) -> None:
    if "\n" in path or path.lstrip().startswith("-----BEGIN") or _SEED.fullmatch(path.strip()):
        # MARKETPRISM_<KEY>_FILE reads the file's *content* as the value; never echo it (it may be a key)
        raise ConfigError(f"{key}: expects the path of a file, not its content "
                          f"(set MARKETPRISM_{key.upper()}=PATH, not MARKETPRISM_{key.upper()}_FILE)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _check_tls_files(prefix: str, ca_key: str, ca: str, cert: str, key: str) -> None:
    """The CA bundle and the client certificate pair exist, are readable and load."""
    cert_key, key_key = f"{prefix}_tls_cert", f"{prefix}_tls_key"
    for name, path in ((ca_key, ca), (cert_key, cert), (key_key, key)):
        if path:
            _check_file(name, path)
    if bool(cert) != bool(key):
        raise ConfigError(f"{cert_key if not cert else key_key}: required with {key_key if not cert else cert_key} "
                          "(a client certificate needs its key: set both or neither)")
    try:
        if ca:
            ssl.create_default_context(cafile=ca)
    except ssl.SSLError as e:
        raise ConfigError(f"{ca_key}: {ca} holds no usable PEM certificate ({e.reason or e})") from None
    try:
        if cert:
            tls_context("", cert, key)
    except ConfigError as e:
        raise ConfigError(f"{key_key}: {e}") from None
    except ssl.SSLError as e:
        raise ConfigError(f"{cert_key}: cannot use {cert} with the key {key} ({e.reason or e})") from None


def _check_nats_security(s: Settings) -> None:
    _check_tls_files("nats", "nats_tls_ca", s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key)
    if s.nats_tls_ca or s.nats_tls_cert:
        key = "nats_tls_ca" if s.nats_tls_ca else "nats_tls_cert"
        if not s.nats_url:
            raise ConfigError(f"{key}: needs nats_url (the nats-server that `run` manages has no TLS)")
        scheme = urlsplit(s.nats_url).scheme if "://" in s.nats_url else "nats"
        if scheme not in ("nats", "tls", "wss"):
            raise ConfigError(f"{key}: nats_url {redact(s.nats_url)!r} is not a TLS-capable URL "
                              "(nats://, tls:// or wss://)")
    if s.nats_nkey_seed:
        if s.nats_user or s.nats_password or (s.nats_url and urlsplit(s.nats_url).username):
            raise ConfigError("nats_nkey_seed: set either nats_nkey_seed or nats_user/nats_password "
                              "(or credentials in nats_url), not both")
        _check_file("nats_nkey_seed", s.nats_nkey_seed)
        try:
            seed = Path(s.nats_nkey_seed).read_text(errors="replace").strip()
        except OSError as e:
            raise ConfigError(f"nats_nkey_seed: cannot read {s.nats_nkey_seed}: {e.strerror}") from None
        if not (_SEED.fullmatch(seed) and seed.startswith("SU")):  # never echo the content: it is the secret
            raise ConfigError(f"nats_nkey_seed: {s.nats_nkey_seed} does not hold an nkey user seed "
                              "(one line of 58 characters starting with SU)")


def _check_clickhouse_tls(s: Settings) -> None:
    _check_tls_files("clickhouse", "clickhouse_ca", s.clickhouse_ca, s.clickhouse_tls_cert, s.clickhouse_tls_key)
    for key in ("clickhouse_ca", "clickhouse_tls_cert"):
        if getattr(s, key) and not any(u.startswith("https://") for u in (s.store_url, s.cold_clickhouse_url)):
            cold = f", cold_clickhouse_url {redact(s.cold_clickhouse_url)!r}" if s.cold_clickhouse_url else ""
            raise ConfigError(f"{key}: is only used with https:// ClickHouse URLs; clickhouse_url is "
                              f"{redact(s.store_url)!r}{cold}")


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


# MARKETPRISM_* names the project uses for something other than a setting. They are accepted in the
# environment (a shell that sourced .env, the e2e test run) and never read by load().
OTHER_ENV = (
    "MARKETPRISM_TAG",  # image tag: .env.example sets it, compose*.yaml interpolate it (never a container env)
    "MARKETPRISM_CH_PASSWORD",  # compose*.yaml -> the clickhouse container, read by clickhouse/config/users.d
    "MARKETPRISM_CH_RO_PASSWORD",  # the same, for the read-only user marketprism_ro
    "MARKETPRISM_E2E_TIMEOUT_S",  # tests/test_e2e_compose.py: how long to wait for data
    "MARKETPRISM_E2E_COLD",  # tests/test_e2e_compose.py: =1 also runs the two-server cold-tier test
    "MARKETPRISM_SOAK_S",  # tests/test_soak.py: soak duration
    "MARKETPRISM_SOAK_SEED",  # tests/test_soak.py: repeats a soak's fault plan
    "MARKETPRISM_SOAK_OUT",  # tests/test_soak.py: where the soak's figures (JSON) are written
    "MARKETPRISM_SOAK_FAULTS",  # tests/test_soak.py: 0 runs the soak without faults (RSS of long-lived processes)
)


def env_names() -> frozenset[str]:
    """Every MARKETPRISM_* environment variable accepted: MARKETPRISM_<FIELD> and MARKETPRISM_<FIELD>_FILE for
    each setting, MARKETPRISM_CONFIG, MARKETPRISM_<FEED>_WS_URL/_REST_URL, and OTHER_ENV."""
    names = {ENV_PREFIX + "CONFIG", *OTHER_ENV}
    for field in Settings.__struct_fields__:
        if field not in ("ws_urls", "rest_urls"):
            names.update((ENV_PREFIX + field.upper(), ENV_PREFIX + field.upper() + "_FILE"))
    for feed in FEEDS:
        names.update(f"{ENV_PREFIX}{feed.upper()}_{kind}_URL" for kind in ("WS", "REST"))
    return frozenset(names)


def check_env_names(environ) -> None:
    """A ConfigError naming every unknown MARKETPRISM_* variable (a typo would otherwise be ignored)."""
    import difflib
    known = env_names()
    unknown = sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known)
    if not unknown:
        return
    suffixes = sorted(k[len(ENV_PREFIX):] for k in known)
    parts = []
    for name in unknown:  # compare without the common prefix, which would make every name look close
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], suffixes, n=1, cutoff=0.6)
        parts.append(f"{name}: unknown environment variable"
                     + (f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else " (see README: Configuration)"))
    raise ConfigError("; ".join(parts))


def _from_env(environ: dict[str, str]) -> dict:
    check_env_names(environ)
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
            key = key.rstrip('`').split('[')[0]
            # a value from the environment is a string whatever the type: name the variable, and show the
            # value when it was given inline (only int, float and bool settings fail this way, never a secret)
            field = key.split(".")[0]
            name = ENV_PREFIX + field.upper()
            source = "" if field not in env else (f" ({name}={str(env[field])[:40]!r})" if name in environ
                                                  else f" (from {name}_FILE)")
            raise ConfigError(f"{key}: {text}{source}") from None
        if " - at `" not in msg and ":" in msg and "unknown field" not in msg:
            raise ConfigError(msg) from None
        if "unknown field" in msg:
            import difflib
            unknown = msg.rsplit("`", 2)[-2] if msg.count("`") >= 2 else ""
            close = difflib.get_close_matches(unknown, Settings.__struct_fields__, n=1, cutoff=0.6)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ConfigError(f"config: {msg.replace('Object contains unknown field', 'unknown key')}{hint}") from None
        raise ConfigError(f"config: {msg}") from None
