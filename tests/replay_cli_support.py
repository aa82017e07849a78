"""Scenarios, the module-scoped replay runs and record checks shared by test_replay_cli.py."""
from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from marketprism import records

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent
COMMON = ("data_type", "exchange", "market_type", "symbol", "instrument", "timestamp", "received_at")
DECIMAL_FIELDS = {"price", "quantity", "funding_rate", "mark_price", "index_price", "open_interest",
                  "open_interest_value", "long_short_ratio", "long_ratio", "short_ratio", "value"}
PLAIN_DECIMAL = re.compile(r"-?\d+(\.\d+)?")
ENVELOPE_MS = 1723161300000  # received_at of the enveloped lines below
SUMMARY = re.compile(r"replay: (\d+) lines, records (.+); (\d+) unparseable(?: \((.+)\))?")

BS = "binance_spot"
UM = "binance_usdm"
SPOT_TRADES = f"{BS}/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"
SPOT_BOOK = (f"{BS}/depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json",
             f"{BS}/depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl")
USDM_TRADES = f"{UM}/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"
SUSHI_BOOK = (f"{UM}/depth_snapshot_rest_SUSHIUSDT_2021-07-22_cryptofeed.json",
              f"{UM}/depth_diff_ws_SUSHIUSDT_2021-07-22_cryptofeed.jsonl")
USDM_BTC_BOOK = (f"{UM}/depth_snapshot_rest_BTCUSDT_2024-08-08_hftbacktest.json",
                 f"{UM}/depth_diff_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl")
OKX_FILES = (
    "books_spot_BTC-USDT_2022-05-13_cryptofeed.jsonl", "books_swap_UNI-USD-SWAP_2022-05-13_cryptofeed.jsonl",
    "funding_rate_ws_BTC-USD-SWAP_2022-03-03_crypto-msg-parser.json",
    "funding_rate_ws_BTC-USDT-SWAP_2022-03-03_crypto-msg-parser.json", "funding_rate_ws_LTC-USDT-SWAP_2025-12-08_roq.json",
    "funding_rate_ws_docs_example.json", "liquidation_orders_ws_FUTURES_XRP-USD-230929_2023-03-30_tardis.json",
    "liquidation_orders_ws_docs_example.json", "open_interest_rest_SWAP_2022-06-04_crypto-msg-parser.json",
    "open_interest_rest_docs_example.json", "open_interest_ws_WNCG-USDT-SWAP_2021-12-22_tardis.json",
    "open_interest_ws_docs_example.json", "trades_spot_BTC-USDT_2022-05-13_cryptofeed.jsonl",
    "trades_swap_BTC-USDT-SWAP_2022-03-03_crypto-msg-parser.json", "trades_swap_BTC-USDT-SWAP_2025-12-08_roq.json",
    "trades_swap_UNI-USD-SWAP_2022-05-13_cryptofeed.json", "trades_ws_docs_example.json",
)


def text(relpath: str) -> str:
    return (FIXTURES / relpath).read_text().strip()


def lines(relpath: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / relpath).read_text().splitlines() if line.strip()]


def envelope(source: str, relpath: str) -> str:
    return json.dumps({"received_at": ENVELOPE_MS, "source": source, "data": text(relpath)})


@dataclass
class Run:
    returncode: int
    out: list[dict]
    raw_out: list[str]
    stderr: str
    started_ms: int
    ended_ms: int

    def of(self, data_type: str) -> list[dict]:
        return [r for r in self.out if r["data_type"] == data_type]

    def counts(self) -> Counter:
        return Counter(r["data_type"] for r in self.out)

    def summary(self) -> tuple[int, str, int, str | None]:
        err = self.stderr.strip().splitlines()
        assert len(err) == 1, self.stderr
        m = SUMMARY.fullmatch(err[0])
        assert m, err[0]
        return int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)


def scenarios(tmp: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (feed, files, extra flags). Files are relative to tests/fixtures or absolute."""
    usdm_rest = tmp / "usdm_rest.jsonl"
    usdm_rest.write_text("\n".join([
        # a ratio body without its request says nothing of its kind or period: unparseable. It comes first,
        # so the enveloped copy below is not simply the second sighting of an already emitted bucket.
        text(f"{UM}/top_long_short_position_ratio_rest_sdk_example.json"),
        text(f"{UM}/open_interest_rest_BTCUSDT_2022-06-04_crypto-msg-parser.json"),  # no mark price yet
        text(f"{UM}/mark_price_ws_BTCUSDT_2021-04-01_crypto-msg-parser.json"),
        text(f"{UM}/open_interest_rest_BTCUSDT_2022-06-04_crypto-msg-parser.json"),  # valued at that mark
        text(f"{UM}/force_order_ws_BTCUSDT_2022-10-11_barter.json"),
        text(f"{UM}/force_order_ws_IOTXUSDT_2021-10-19_tiagosiebler.json"),
        envelope("/futures/data/topLongShortPositionRatio?symbol=BTCUSDT&period=5m&limit=30",
                 f"{UM}/top_long_short_position_ratio_rest_sdk_example.json"),
        envelope("/futures/data/globalLongShortAccountRatio?symbol=BTCUSDT&period=5m&limit=30",
                 f"{UM}/global_long_short_account_ratio_rest_sdk_example.json"),
        envelope("wss://fstream.binance.com/stream?streams=!markPrice@arr",
                 f"{UM}/mark_price_arr_ws_2021-04-01_crypto-msg-parser.json"),
        text(f"{UM}/premium_index_rest_BTCUSDT_sdk_example.json"),
    ]) + "\n")
    okx_ratio = tmp / "okx_ratio.jsonl"
    okx_ratio.write_text(envelope("/api/v5/rubik/stat/contracts/long-short-account-ratio?ccy=BTC&period=5m",
                                  "okx/long_short_account_ratio_rest_docs_example.json") + "\n")
    deribit_wrapped = tmp / "deribit_wrapped.jsonl"
    # The docs give only the notification's "data" object; on the wire it arrives inside the JSON-RPC
    # subscription notification (https://docs.deribit.com/articles/notifications).
    notes = [("deribit_volatility_index.btc_usd", line) for line in lines("deribit/volatility_index_ws_docs_example_data.json")]
    notes += [("book.BTC-PERPETUAL.100ms", line) for line in lines("deribit/book_docs_example_data.jsonl")]
    deribit_wrapped.write_text("".join(json.dumps({"jsonrpc": "2.0", "method": "subscription",
                                                   "params": {"channel": ch, "data": d}}) + "\n" for ch, d in notes))
    bybit_ratio = tmp / "bybit_ratio.jsonl"
    bybit_ratio.write_text("\n".join([
        text("bybit/long_short_ratio_rest_docs_example.json"),  # bare: its period is only in the request
        envelope("/v5/market/account-ratio?category=linear&symbol=BTCUSDT&period=1h&limit=50",
                 "bybit/long_short_ratio_rest_docs_example.json"),
    ]) + "\n")
    trade_lines = (FIXTURES / SPOT_TRADES).read_text().splitlines()
    bad = tmp / "bad_lines.jsonl"
    bad.write_text("\n".join([trade_lines[0], "this is not json", "", trade_lines[1][:60], "{}",
                              trade_lines[2]]) + "\n")
    gz = tmp / "trades.jsonl.gz"
    gz.write_bytes(gzip.compress((FIXTURES / SPOT_TRADES).read_bytes()))
    bybit = "bybit/"
    return {
        # the plain trades run at --depth 10, the gzip copy at the default depth: each book pair twice
        "spot_plain": (BS, [SPOT_TRADES, *SPOT_BOOK], ["--depth", "10"]),
        "spot_gz": (BS, [str(gz), *SPOT_BOOK], []),
        "spot_bad": (BS, [str(bad)], []),
        "depth_negative": (BS, list(SPOT_BOOK), ["--depth", "-1"]),
        "usdm": (UM, [USDM_TRADES, *SUSHI_BOOK, *USDM_BTC_BOOK, str(usdm_rest)], []),
        "okx": ("okx", [f"okx/{f}" for f in OKX_FILES] + [str(okx_ratio)], []),
        "deribit": ("deribit", ["deribit/book_raw_BTC-24SEP21-8000-P_2021-07-22_cryptofeed.jsonl",
                                "deribit/book_raw_BTC-31DEC21-34000-P_2021-07-22_cryptofeed.jsonl",
                                "deribit/ticker_ws_BTC-PERPETUAL_2022-06-02_crypto-msg-parser.json",
                                "deribit/trades_ws_BTC-PERPETUAL_2021-03-21_crypto-msg-parser.json",
                                "deribit/trades_ws_BTC-26MAR21_2021-03-21_crypto-msg-parser.json",
                                "deribit/trades_ws_option_any_2021-03-21_crypto-msg-parser.json",
                                str(deribit_wrapped)], []),
        "bybit_spot": ("bybit_spot", [bybit + f for f in (
            "public_trade_spot_BTCUSDT_2023-04-21_roq.json", "orderbook50_spot_BTCUSDT_2023-04-21_roq.jsonl",
            "tickers_spot_BTCUSDT_2023-04-21_roq.json")], []),
        "bybit_linear": ("bybit_linear", [bybit + f for f in (
            "public_trade_linear_BTCUSDT_2025-09-26_hftbacktest.json", "orderbook1_linear_BTCUSDT_2023-04-05_tardis.jsonl",
            "orderbook50_linear_BTCPERP_2023-04-05_tardis.jsonl", "tickers_linear_BTCUSDT_2023-04-22_roq.json",
            "all_liquidation_linear_PIPPINUSDT_2025-02-25_tardis.json", "all_liquidation_docs_example.json",
            "open_interest_rest_docs_example.json")] + [str(bybit_ratio)], []),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("replay")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
    procs = {}
    started = int(time.time() * 1000)
    for name, (feed, files, flags) in scenarios(tmp).items():
        paths = [f if os.path.isabs(f) else str(FIXTURES / f) for f in files]
        procs[name] = subprocess.Popen([sys.executable, "-m", "marketprism", "replay", "--exchange", feed, *flags,
                                        *paths], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        raw = stdout.decode().splitlines()
        parsed = []
        for line in raw:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                parsed.append({"unparseable output": line})
        out[name] = Run(proc.returncode, parsed, raw, stderr.decode(), started, int(time.time() * 1000))
    return out


def check_record(rec: dict) -> None:
    """DESIGN.md §3: one JSON object per record, decimals as plain strings, times as integer ms."""
    assert "data_type" in rec, rec
    dt = rec["data_type"]
    assert set(rec) == set(records.record_fields(dt)), rec
    assert all(k in rec for k in COMMON)
    for key in ("exchange", "market_type", "symbol", "instrument"):
        assert isinstance(rec[key], str) and rec[key], rec
    assert rec["exchange"] in records.EXCHANGES and rec["market_type"] in records.MARKET_TYPES
    for key in records.TIME_FIELDS:
        if key in rec:
            assert type(rec[key]) is int and 1_000_000_000_000 < rec[key] < 10_000_000_000_000, (key, rec)
    for key in DECIMAL_FIELDS & set(rec):
        value = rec[key]
        if value is not None:
            assert isinstance(value, str) and PLAIN_DECIMAL.fullmatch(value), (key, rec)
    for side in ("bids", "asks"):
        for level in rec.get(side, ()):
            assert len(level) == 2 and all(isinstance(v, str) and PLAIN_DECIMAL.fullmatch(v) for v in level)
    if "side" in rec:
        assert rec["side"] in records.SIDES
    records.decode(json.dumps(rec).encode())  # the vocabulary's own validation


