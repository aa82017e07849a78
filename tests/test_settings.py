"""Settings: defaults < YAML file < environment, typed conversion, secrets from files, and one-line
ConfigErrors naming the key (DESIGN.md §4-§5); the CLI turns a bad setting or flag into exit 2 and one
stderr line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from marketprism import settings
from marketprism.records import DATA_TYPES
from marketprism.settings import FEEDS, ConfigError, load

ROOT = Path(__file__).parent.parent
TRADES = Path(__file__).parent / "fixtures" / "binance_spot" / "trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"


def test_defaults():
    s = load(environ={})
    assert s.data_dir == "./data"
    assert s.nats_url == "" and s.clickhouse_url == ""
    assert s.store_url == f"chdb://{Path('./data', 'clickhouse')}"
    assert s.hot_ttl_days == 3
    assert s.feeds == FEEDS == ("binance_spot", "binance_usdm", "okx", "deribit", "bybit_spot", "bybit_linear")
    assert s.symbols == ("BTC-USDT", "ETH-USDT")
    assert s.data_types == tuple(dt for dt in DATA_TYPES if dt != "gap")
    assert s.depth == 400
    assert s.batch_rows == 20000 and s.flush_interval_s == 0.25
    assert s.ws_url("okx") == "wss://ws.okx.com:8443"
    assert s.rest_url("binance_usdm") == "https://fapi.binance.com"
    assert s.port_for("storage-hot") == 8085 and s.port_for("collector") == 8087


def test_environment_overrides_with_types():
    s = load(environ={"MARKETPRISM_DEPTH": "50", "MARKETPRISM_SYMBOLS": "BTC-USDT, SOL-USDT",
                      "MARKETPRISM_FLUSH_INTERVAL_S": "0.5", "MARKETPRISM_FEEDS": "okx,deribit",
                      "MARKETPRISM_DATA_TYPES": "trade, orderbook", "MARKETPRISM_HOT_TTL_DAYS": "7",
                      "MARKETPRISM_CLICKHOUSE_URL": "http://default:pw@localhost:8123",
                      "MARKETPRISM_HEALTH_PORT": "9999", "UNRELATED": "x"})
    assert s.depth == 50 and type(s.depth) is int
    assert s.symbols == ("BTC-USDT", "SOL-USDT")
    assert s.flush_interval_s == 0.5 and type(s.flush_interval_s) is float
    assert s.feeds == ("okx", "deribit")
    assert s.data_types == ("trade", "orderbook")
    assert s.hot_ttl_days == 7
    assert s.store_url == "http://default:pw@localhost:8123"
    assert s.port_for("storage-hot") == 9999


def test_per_feed_url_environment():
    s = load(environ={"MARKETPRISM_BINANCE_SPOT_WS_URL": "ws://127.0.0.1:9001/",
                      "MARKETPRISM_BINANCE_SPOT_REST_URL": "http://127.0.0.1:9002",
                      "MARKETPRISM_BYBIT_LINEAR_WS_URL": "ws://127.0.0.1:9003"})
    assert s.ws_url("binance_spot") == "ws://127.0.0.1:9001"  # trailing slash dropped
    assert s.rest_url("binance_spot") == "http://127.0.0.1:9002"
    assert s.ws_url("bybit_linear") == "ws://127.0.0.1:9003"
    assert s.ws_url("bybit_spot") == "wss://stream.bybit.com"  # untouched feeds keep their defaults
    assert s.ws_urls == {"binance_spot": "ws://127.0.0.1:9001/", "bybit_linear": "ws://127.0.0.1:9003"}


def test_yaml_file_with_environment_precedence(tmp_path):
    cfg = tmp_path / "marketprism.yaml"
    cfg.write_text("depth: 20\nsymbols: [BTC-USDT, XRP-USDT]\nlog_level: DEBUG\n"
                   "ws_urls:\n  okx: ws://yaml-okx\n  deribit: ws://yaml-deribit\n")
    s = load(str(cfg), environ={"MARKETPRISM_DEPTH": "30", "MARKETPRISM_OKX_WS_URL": "ws://env-okx"})
    assert s.depth == 30  # environment beats the file
    assert s.symbols == ("BTC-USDT", "XRP-USDT")  # the file beats the default
    assert s.log_level == "DEBUG"
    assert s.ws_url("okx") == "ws://env-okx" and s.ws_url("deribit") == "ws://yaml-deribit"
    # the file can also be named by MARKETPRISM_CONFIG
    s2 = load(environ={"MARKETPRISM_CONFIG": str(cfg)})
    assert (s2.depth, s2.symbols, s2.ws_url("okx")) == (20, ("BTC-USDT", "XRP-USDT"), "ws://yaml-okx")
    # keyword overrides (command-line flags) beat both; None means "not given"
    assert load(str(cfg), environ={"MARKETPRISM_DEPTH": "30"}, depth=5, log_level=None).depth == 5


def test_empty_yaml_file_gives_defaults(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing set\n")
    assert load(str(cfg), environ={}) == load(environ={})


def test_secret_from_file(tmp_path):
    secret = tmp_path / "nats_password"
    secret.write_text("s3cr3t\n")
    s = load(environ={"MARKETPRISM_NATS_PASSWORD_FILE": str(secret), "MARKETPRISM_NATS_USER": "mp"})
    assert s.nats_password == "s3cr3t" and s.nats_user == "mp"
    # a value given directly wins over the file
    assert load(environ={"MARKETPRISM_NATS_PASSWORD_FILE": str(secret),
                         "MARKETPRISM_NATS_PASSWORD": "direct"}).nats_password == "direct"
    depth_file = tmp_path / "depth"
    depth_file.write_text("25\n")
    assert load(environ={"MARKETPRISM_DEPTH_FILE": str(depth_file)}).depth == 25


def test_settings_are_frozen():
    s = load(environ={})
    with pytest.raises(AttributeError):
        s.depth = 1  # type: ignore[misc]


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


BAD_ENV = [
    ({"MARKETPRISM_DEPTH": "abc"}, "depth"),
    ({"MARKETPRISM_DEPTH": "-5"}, "depth"),
    ({"MARKETPRISM_DEPTH": "0"}, "depth"),
    ({"MARKETPRISM_BATCH_ROWS": "1e3x"}, "batch_rows"),
    ({"MARKETPRISM_FLUSH_INTERVAL_S": "fast"}, "flush_interval_s"),
    ({"MARKETPRISM_FEEDS": "binance_spot,kraken"}, "feeds"),
    ({"MARKETPRISM_DATA_TYPES": "trade,ticker"}, "data_types"),
    ({"MARKETPRISM_CLICKHOUSE_URL": "mysql://localhost:3306"}, "clickhouse_url"),
    ({"MARKETPRISM_CLICKHOUSE_URL": "localhost:8123"}, "clickhouse_url"),
    ({"MARKETPRISM_HOT_TTL_DAYS": "-1"}, "hot_ttl_days"),
    ({"MARKETPRISM_LOG_LEVEL": "loud"}, "log_level"),
    ({"MARKETPRISM_NATS_PASSWORD_FILE": "/nonexistent/marketprism/secret"}, "MARKETPRISM_NATS_PASSWORD_FILE"),
]


@pytest.mark.parametrize("environ, key", BAD_ENV, ids=[k for _, k in BAD_ENV])
def test_bad_environment_raises_one_line_naming_the_key(environ, key):
    with pytest.raises(ConfigError) as info:
        load(environ=environ)
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert msg.startswith(f"{key}:"), msg


BAD_YAML = [
    ("depth: 10\nbogus_key: 1\n", "bogus_key"),
    ("- depth\n- 10\n", "mapping"),
    ("just a string\n", "mapping"),
    ("depth: [1, 2\nfeeds: : x\n", "not valid YAML"),
    ("depth: abc\n", "depth"),
    ("depth: -3\n", "depth"),
    ("feeds: [binance_spot, kraken]\n", "feeds"),
    ("data_types: [trade, ticker]\n", "data_types"),
    ("clickhouse_url: tcp://localhost:9000\n", "clickhouse_url"),
    ("ws_urls:\n  kraken: ws://x\n", "ws_urls"),
]


@pytest.mark.parametrize("text, key", BAD_YAML, ids=[f"{i}-{k}" for i, (_, k) in enumerate(BAD_YAML)])
def test_bad_yaml_raises_one_line_naming_the_key(tmp_path, text, key):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ={})
    msg = str(info.value)
    assert msg and "\n" not in msg
    assert key in msg, msg
    if key in ("mapping", "not valid YAML"):
        assert msg.startswith("config: ") and path in msg  # the key at fault is the file itself


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "absent.yaml"), environ={})
    assert str(info.value) == f"config: cannot read {tmp_path / 'absent.yaml'}: No such file or directory"


def test_config_error_is_a_value_error():
    assert issubclass(settings.ConfigError, ValueError)


# -- the command line ------------------------------------------------------------------------------------

def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    return subprocess.run([sys.executable, "-m", "marketprism", *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_bad_setting_exits_2_with_one_line():
    proc = _cli("replay", "--exchange", "binance_spot", str(TRADES), MARKETPRISM_DEPTH="abc")
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.splitlines()
    assert len(err) == 1, proc.stderr
    assert "depth" in err[0] and "configuration error" in err[0]


def test_cli_unknown_flag_exits_2_with_one_line():
    proc = _cli("replay", "--exchange", "binance_spot", "--no-such-flag", str(TRADES))
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.splitlines()
    assert len(err) == 1, proc.stderr
    assert "--no-such-flag" in err[0]
