"""`marketprism bench` and the hot-path pieces it measures. No timed assertions: the smoke run checks the
JSON's shape and that nothing was lost or stored twice; the rest checks exactness, not speed."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from nats.protocol.command import hpub_cmd

from conftest import FIXTURES
from marketprism.bench import parse
from marketprism.bench.source import templates
from marketprism.book import Book
from marketprism.bus import wire
from marketprism.bus.publisher import Publisher
from marketprism.store.hot import latency_bucket, latency_percentiles

SMOKE = ["--parse-messages", "3000", "--parse-rounds", "1", "--symbols", "4", "--duration", "2", "--rate", "400",
         "--latency-rate", "400", "--latency-duration", "2", "--scaling-symbols", "3", "--scaling-rate", "300",
         "--scaling-duration", "2", "--memory-symbols", "3", "--memory-rate", "150", "--memory-duration", "2"]


def test_bench_smoke_run_writes_every_section(tmp_path: Path):
    out = tmp_path / "latest.json"
    res = subprocess.run([sys.executable, "-m", "marketprism", "bench", *SMOKE, "--json", str(out),
                          "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    for case in ("binance_trade", "binance_depth"):
        assert set(data["parse"][case]) >= {"marketprism_msgs_per_s", "cryptofeed_msgs_per_s", "ratio"}
        assert data["parse"][case]["outputs"]["marketprism"] == 3000
    assert data["parse"]["binance_depth"]["same_final_book"] in (True, None)  # None: cryptofeed not installed
    e2e = data["e2e"]
    assert set(e2e) >= {"records_per_s", "duration_s", "sent", "stored", "lost", "duplicates", "latency_ms",
                        "cpu_s_per_1k_records"}
    assert set(e2e["latency_ms"]) >= {"p50", "p99"}
    assert e2e["sent"] > 0 and e2e["stored"] == e2e["sent"]
    assert e2e["lost"] == 0 and e2e["duplicates"] == 0
    assert data["store_check"]["extra_rows"] == 0  # storage-hot inserted each record once
    assert data["collector"]["rss_mb"] > 0
    assert data["collector"]["run"]["lost"] == 0 and data["collector"]["run"]["duplicates"] == 0
    assert [s["symbols"] for s in data["scaling"]] == [3]
    assert all(set(s) >= {"symbols", "records_per_s", "cpu_s_per_1k_records"} for s in data["scaling"])
    assert all(s["lost"] == 0 and s["duplicates"] == 0 for s in data["scaling"])
    assert {t["target"].split()[0] for t in data["targets"]} >= {"parse", "e2e", "latency", "collector", "scaling"}
    assert "targets" in res.stdout and "records/s" in res.stdout


def test_bench_rejects_bad_flags():
    res = subprocess.run([sys.executable, "-m", "marketprism", "bench", "--parts", "parse,warp"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown part 'warp'" in res.stderr and len(res.stderr.splitlines()) == 1


def test_bench_compare_with_an_unreadable_result_fails_before_running(tmp_path: Path):
    (tmp_path / "old.json").write_text("{}")
    for path, says in ((tmp_path / "missing.json", "cannot read"), (tmp_path / "old.json", "not a bench result")):
        res = subprocess.run([sys.executable, "-m", "marketprism", "bench", "--parts", "parse", "--compare", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and says in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr


def _result(cf_rate: float, ratio: float, rps: float, cpu: float, p99: float, lost: int = 0) -> dict:
    case = {"cryptofeed_msgs_per_s": cf_rate, "ratio": ratio}
    return {"parse": {"binance_trade": case, "binance_depth": case},
            "e2e": {"records_per_s": rps, "cpu_s_per_1k_records": cpu, "lost": lost, "duplicates": 0,
                    "latency_ms": {"p50": 150.0, "p99": p99}},
            "collector": {"rss_mb": 180.0}, "store_check": {"extra_rows": 0}}


def test_bench_compare_scales_throughput_by_the_machine_speed():
    from marketprism.bench.report import compare, speed_factor
    base = _result(30_000, 2.0, 50_000, 0.034, 290)
    # the machine at 80 % speed: 40k records/s at 0.0425 CPU-s per 1k is the same pipeline
    slower = _result(24_000, 2.0, 40_000, 0.0425, 300)
    assert abs(speed_factor(base, slower) - 0.8) < 1e-9
    lines, regressed = compare(base, slower)
    assert not regressed and "0.80x" in lines[0]
    assert [line.split()[-1] for line in lines[2:]] == ["same"] * 7
    # at the same speed, 40k and a depth ratio of 1.6 are regressions; latency is compared as measured
    lines, regressed = compare(base, _result(30_000, 1.6, 40_000, 0.034, 400))
    verdicts = {line[:36].strip(): line.split()[-1] for line in lines[2:]}
    assert regressed and verdicts["parse binance_depth ratio"] == "REGRESSED"
    assert verdicts["e2e records/s"] == verdicts["latency p99 ms at 10,000/s"] == "REGRESSED"
    assert verdicts["e2e CPU-s per 1,000 records"] == "same"
    lines, regressed = compare(base, _result(30_000, 2.0, 50_000, 0.034, 290, lost=3))
    assert regressed and lines[-1] == "  e2e lost: 3  REGRESSED (must be 0)"
    no_parse = {k: v for k, v in base.items() if k != "parse"}
    assert speed_factor(no_parse, base) is None and "unknown" in compare(no_parse, base)[0][0]


def test_parse_cases_feed_both_sides_the_same_frames():
    trades = parse.trade_frames(FIXTURES, 500)
    assert len(trades) == 500 and all(json.loads(f)["data"]["e"] == "aggTrade" for f in trades)
    snapshot, diffs = parse.depth_frames(FIXTURES, 500)
    data = [json.loads(d)["data"] for d in diffs]
    assert data[0]["U"] <= json.loads(snapshot)["lastUpdateId"] + 1 <= data[0]["u"]
    assert all(b["U"] == a["u"] + 1 for a, b in zip(data, data[1:]))  # the chain holds across cycles
    rate, produced, last = parse.ours_depth(snapshot, diffs)
    assert produced == 500 and len(last.bids) == len(last.asks) == parse.DEPTH


def test_source_templates_keep_the_recorded_frame():
    recording = FIXTURES / "binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"
    line = recording.read_bytes().splitlines()[0]
    template, order = templates(recording, "S001USDT")[0]
    values = (1700000000123, 42, 1700000000120)
    frame = json.loads(template % tuple(values[i] for i in order))
    recorded = json.loads(line)
    assert frame["stream"] == "s001usdt@trade"
    assert frame["data"] == {**recorded["data"], "s": "S001USDT", "E": values[0], "t": values[1], "T": values[2]}


def test_raw_publish_is_byte_for_byte_what_nats_py_sends():
    pub = Publisher(nc=None)
    pub._reply_prefix = b"_INBOX.abc."
    payload, msg_id = b'{"data_type":"trade"}', "trade:binance:spot:BTC-USDT:3735683259"
    hdr = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + b"\r\n\r\n"
    expected = hpub_cmd("trade.binance.spot.BTC-USDT", "_INBOX.abc.7", hdr, payload)
    sent = []

    class FakeNats:
        is_connected, is_draining_pubs, max_payload = True, False, 1 << 20
        _flush_queue = type("Q", (), {"empty": staticmethod(lambda: False)})()

        async def _send_command(self, data):
            sent.append(data)

        async def _flush_pending(self):
            pass

    pub.nc, pub._raw = FakeNats(), True
    import asyncio
    asyncio.run(pub._send(7, "trade.binance.spot.BTC-USDT", payload, msg_id))
    assert sent == [expected]
    assert pub._plain("trade.binance.spot.BTC USDT", msg_id) is None  # these go through nats-py's checks
    assert pub._plain("trade.binance.spot.BTC-USDT", "id\r\nPUB x 0") is None
    assert wire.reply_lines([b"$JS.ACK.S.c.1.2.3.4.5", b"$JS.ACK.S.c.1.2.4.5.5"], wire.ACK) == (
        b"PUB $JS.ACK.S.c.1.2.3.4.5 0\r\n\r\nPUB $JS.ACK.S.c.1.2.4.5.5 0\r\n\r\n")
    assert wire.reply_lines([b"$JS.ACK.S.c.1.2.3.4.5"], wire.nak(1.5)) == (
        b'PUB $JS.ACK.S.c.1.2.3.4.5 26\r\n-NAK {"delay": 1500000000}\r\n')
    assert wire.reply_lines([b"r"], wire.TERM) == b"PUB r 5\r\n+TERM\r\n"
    assert wire.reply_lines([], wire.ACK) == b""  # nothing to answer: not a PUB to an empty subject


@pytest.mark.parametrize("seed", range(5))
def test_book_matches_a_plain_reference(seed):
    rng = random.Random(seed)
    book, ref = Book(), {"b": {}, "a": {}}
    for _ in range(300):
        rows = {"b": [], "a": []}
        for side, base in (("b", 100), ("a", 200)):
            for _ in range(rng.randrange(8)):
                price = f"{base + rng.randrange(-60, 60) / 4:.2f}"
                qty = "0.000" if rng.random() < 0.35 else f"{rng.randrange(1, 999) / 100:.3f}"
                rows[side].append((price, qty))
                if Decimal(qty) == 0:
                    ref[side].pop(Decimal(price), None)
                else:
                    ref[side][Decimal(price)] = (price, qty)
        book.update(rows["b"], rows["a"])
    for depth in (1, 5, 1000):
        bids, asks = book.top(depth)
        assert bids == [ref["b"][p] for p in sorted(ref["b"], reverse=True)][:depth]
        assert asks == [ref["a"][p] for p in sorted(ref["a"])][:depth]
    assert len(book) == len(ref["b"]) + len(ref["a"])
    assert book.top(0) == ([], [])


def test_book_stores_the_level_tuples_it_is_given_and_may_cross():
    book = Book()
    bid, ask = ("10.5", "1"), ("10.4", "2")
    book.load([bid], [ask])
    bids, asks = book.top(5)
    assert bids == [bid] and bids[0] is bid and asks[0] is ask and book.crossed()
    book.update([("10.5", "0")], [])
    assert not book.crossed() and len(book) == 1
    with pytest.raises(ValueError):
        book.update([("10.5", "1", "0", "3")], [])  # OKX's 4-field rows are cut to pairs by okx.py


def test_book_refuses_a_price_beyond_float_range_and_recovers_on_clear():
    book = Book()
    book.load([("100", "1")], [("101", "1")])
    huge = "9" * 400  # a plain decimal that float() takes to inf
    for bids in ([(huge, "1")], [(huge, "0")]):
        with pytest.raises(ValueError):
            book.update(bids, [])
        book.load([("100", "1")], [("101", "1")])  # what a feed does next: reset and a new snapshot
        assert book.top(5) == ([("100", "1")], [("101", "1")])
    book.update([], [(huge, "1")])  # an ask that far out is only the worst level: nothing breaks
    assert book.top(5)[1] == [("101", "1"), (huge, "1")]


def test_latency_percentiles_are_bucket_bounds():
    assert latency_bucket(0.2) == 1.0 and latency_bucket(100) >= 100 > latency_bucket(100) / 1.05
    buckets = {latency_bucket(ms): 0 for ms in (10, 250, 900)}
    for ms, n in ((10, 90), (250, 9), (900, 1)):
        buckets[latency_bucket(ms)] += n
    p50, p99, n = latency_percentiles(buckets)
    assert n == 100 and p50 == latency_bucket(10) and p99 == latency_bucket(250)
    assert latency_percentiles({}) == (None, None, 0)


class FakePipe:
    """A pipeline that keeps up with any rate up to `limit` records/s."""

    def __init__(self, limit: float) -> None:
        self.limit, self.rates = limit, []

    def run(self, load) -> dict:
        self.rates.append(round(load.rate))
        kept = load.rate <= self.limit
        sent = load.rate * load.duration_s
        return {"rate_requested": load.rate, "sent": sent, "source_s": load.duration_s, "drain_s": 0.5 if kept else 9.0, "duration_s": 12.0,
                "inserted": sent if kept else sent / 2, "cpu_cores": {}, "other_load_cores": 0.0}


@pytest.mark.parametrize("limit, expected_rates, found", [
    # up by a quarter until one fails, then the step between the last two halved twice
    (52_000, [10_000, 12_500, 15_625, 19_531, 24_414, 30_518, 38_147, 47_684, 59_605, 53_644, 50_664], 50_664),
    # the first probe fails: down by 0.7 until one keeps up, back up, then halved twice
    (6_000, [10_000, 7_000, 4_900, 6_125, 5_512, 5_819], 5_819),
])
def test_rate_probes_narrow_the_step(limit, expected_rates, found):
    from types import SimpleNamespace

    from marketprism import bench
    pipe = FakePipe(limit)
    args = SimpleNamespace(probe_start=10_000.0, probe_duration=12.0, symbols=100)
    rate, probes = bench._find_rate(pipe, args, lambda _: None)
    assert (pipe.rates, round(rate)) == (expected_rates, found)
    assert [p["kept_up"] for p in probes] == [r <= limit for r in expected_rates]


@pytest.mark.parametrize("limit, expected_rates, kept_up", [
    (50_000, [50_000], True),  # the found rate holds: one run
    (46_000, [50_000, 45_000], True),  # a tenth lower per retry, the failed run kept in slower_attempts
    (30_000, [50_000, 45_000, 40_500, 36_450], False),  # four attempts at most, the last one reported
])
def test_sustained_run_retries_a_tenth_lower(limit, expected_rates, kept_up):
    from types import SimpleNamespace

    from marketprism import bench
    pipe = FakePipe(limit)
    args = SimpleNamespace(duration=60.0, symbols=100, profile=None, rate=None)
    run = bench._sustained_run(pipe, args, 50_000.0, [], lambda _: None)
    assert pipe.rates == expected_rates and run["kept_up"] is kept_up
    assert [round(a["rate_requested"]) for a in run["slower_attempts"]] == expected_rates[:len(expected_rates) - 1]
    given = bench._sustained_run(FakePipe(30_000), SimpleNamespace(**{**vars(args), "rate": 50_000.0}), 50_000.0,
                                 [], lambda _: None)
    assert given["kept_up"] is False and given["slower_attempts"] == []  # --rate given: that rate only


def test_book_refuses_levels_that_are_not_plain_decimals():
    book = Book()
    book.load([("100.5", "1")], [("101", "2.25")])
    for bad in ("1e5", "nan", "inf", " 1", "1_0", "-1", "+1", "\uff11", "1\n"):
        with pytest.raises(ValueError):
            book.update([("100.5", bad)], [])
        with pytest.raises(ValueError):
            book.update([("99", "1")], [(bad, "1")])  # nothing of the message applied, its good side neither
    assert book.top(5) == ([("100.5", "1")], [("101", "2.25")])
    book.update([("100.5", "0"), ("100.25", "3")], [])
    assert book.top(5) == ([("100.25", "3")], [("101", "2.25")])
    for bad in ("1.2.3", ".", ""):  # digits and points, but no number: refused part way
        with pytest.raises(ValueError):
            book.update([("100.5", "1"), (bad, "1")], [])


def test_binance_diff_with_a_bad_level_is_counted_and_breaks_the_chain():
    from marketprism.exchanges.binance import BinanceSpotFeed
    from marketprism.records import Gap, OrderBook
    snapshot, diffs = parse.depth_frames(FIXTURES, 3)
    feed = BinanceSpotFeed(depth=400, book_interval_ms=0)
    feed.on_message(snapshot, "/api/v3/depth?symbol=BTCUSDT&limit=1000", 0)
    assert [type(r) for r in feed.on_message(diffs[0], None, 0)] == [OrderBook]
    bad = json.loads(diffs[1])
    bad["data"]["b"] = [[bad["data"]["b"][0][0], "nan"]] if bad["data"]["b"] else [["1", "nan"]]
    gap, = feed.on_message(json.dumps(bad), None, 0)
    assert type(gap) is Gap and feed.errors == {"invalid level": 1}
    first = json.loads(diffs[0])["data"]["u"] + 1
    assert (gap.reason, gap.from_sequence, gap.to_sequence) == ("invalid", first, bad["data"]["u"])
    assert feed.take_requests() == ["/api/v3/depth?symbol=BTCUSDT&limit=1000"]  # a resync
    assert feed.on_message(diffs[2], None, 0) == []  # held for the new snapshot


@pytest.mark.parametrize("levels, plain", [
    ('[["100.5","1.25"],["99","0.00000000"]]', True),
    ('[ ["100.5", "1.25"] ]', False),  # spaces: the strings are then checked one by one (and pass)
    ('[["\\u0031","1"]]', False),  # an escape: checked one by one
    ('[["1e5","1"]]', False),
    ('[]', True),
])
def test_binance_diff_levels_are_known_plain_from_their_bytes(levels, plain):
    import msgspec

    from marketprism.exchanges.binance import depth_diff
    from marketprism.exchanges.binance_wire import WsDepth
    frame = f'{{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":5,"u":6,"b":{levels},"a":[]}}'
    diff = depth_diff(msgspec.json.decode(frame, type=WsDepth))
    assert diff.plain is plain and diff.b == [tuple(r) for r in json.loads(levels)]
