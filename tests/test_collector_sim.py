"""The collector against the simulator, every venue x data type, through the real pipeline (nats-server,
storage-hot, chDB), while recording the raw traffic. Then the round trip: the recording, replayed, gives
exactly the records the live collector published, and `replay --publish` re-ingests exactly the rows the
live run stored (twice adds nothing).

One live session serves the module (its rows are copied out of the store right away, since other
tests share the chDB store); each test checks one aspect of it."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import wait_for
from marketprism import record, replay
from marketprism.bus import streams
from marketprism.bus.server import NatsServer, free_port
from marketprism.exchanges import make_feed
from marketprism.records import TABLE_FOR, decode, dedup_key, record_fields
from marketprism.settings import FEEDS, load
from marketprism.sim import start
from marketprism.store import schema
from marketprism.store.hot import HotWriter
from test_collector_sim_support import decode_all, now_ms, pipeline, record_feed, rows, sim_settings
from test_run import EXPECTED

DEPTH = 20
SYMBOLS = {"deribit": ("BTC-USD", "ETH-USD")}
VOL_SYMBOLS = ("BTC", "ETH")
INSTRUMENTS = {("binance", "spot"): "{b}USDT", ("binance", "perpetual"): "{b}USDT", ("okx", "spot"): "{b}-USDT",
               ("okx", "perpetual"): "{b}-USDT-SWAP", ("deribit", "perpetual"): "{b}-PERPETUAL",
               ("deribit", "options"): "{l}_usd", ("bybit", "spot"): "{b}USDT", ("bybit", "perpetual"): "{b}USDT"}
SUMMARY = re.compile(r"published (\d+) of (\d+) \((\d+) already in JetStream\)")


def expected_streams(table: str) -> set[tuple[str, str, str]]:
    """(exchange, market_type, symbol) that must have rows: DESIGN.md §2 for both default symbols."""
    out = set()
    for exchange, market_type in EXPECTED[table]:
        symbols = VOL_SYMBOLS if table == "volatility_indices" else SYMBOLS.get(exchange, ("BTC-USDT", "ETH-USDT"))
        out |= {(exchange, market_type, s) for s in symbols}
    return out


def stored_streams(store, table: str) -> set[tuple[str, str, str]]:
    return {tuple(r) for r in store.query(f"SELECT exchange, market_type, symbol FROM marketprism_hot.{table} "
                                          "GROUP BY 1, 2, 3").result_rows}


@dataclass
class Live:
    started_ms: int
    stopped_ms: int
    rows: dict[str, list[dict]]      # table -> rows, read back right after the session
    published: list[dict]           # every record the collector published, in order
    record_dir: Path
    parse_errors: dict


async def live_session(store, tmp: Path) -> Live:
    nats = NatsServer(str(tmp / "nats"), free_port())
    await nats.start()
    sim = await start(port=0, rate=20, speed=20, seed=5)
    try:
        # book_interval_ms=0: one book per update, as replay makes them, so that the two can be compared
        settings = sim_settings(sim.url, nats.url, depth=DEPTH, book_interval_ms=0, record_dir=str(tmp / "rec"))
        started = now_ms()
        async with pipeline(settings, store, record.from_settings(settings), capture=True) as s:
            covered = await wait_for(lambda: all(expected_streams(t) <= stored_streams(store, t) for t in EXPECTED), 20)
            await asyncio.sleep(1.0)
            errors = {n: dict(f.errors) for n, f in s.collector.feeds.items() if f.errors}
        stopped = now_ms()
        assert covered, {t: expected_streams(t) - stored_streams(store, t) for t in EXPECTED}
    finally:
        await sim.stop()
        nats.stop()
    tables = {t: rows(store, f"SELECT * FROM {schema.HOT}.{t} FINAL") for t in TABLE_FOR.values()}
    return Live(started, stopped, tables, decode_all(s.published), tmp / "rec", errors)


@pytest.fixture(scope="module")
def live(store_session, tmp_path_factory) -> Live:
    for table in TABLE_FOR.values():
        store_session.command(f"TRUNCATE TABLE {schema.HOT}.{table}")
    return asyncio.run(live_session(store_session, tmp_path_factory.mktemp("live")))


# -- every venue x data type ------------------------------------------------------------------------------

def test_every_venue_and_data_type_has_rows_with_the_right_fields(live):
    assert live.parse_errors == {}
    for dt, table in TABLE_FOR.items():
        if dt == "gap":
            continue
        got = live.rows[table]
        assert {(r["exchange"], r["market_type"], r["symbol"]) for r in got} == expected_streams(table), table
        assert set(got[0]) == set(record_fields(dt)) - {"data_type"}, table
        for r in got:
            base = r["symbol"].split("-")[0]
            assert r["instrument"] == INSTRUMENTS[(r["exchange"], r["market_type"])].format(b=base, l=base.lower())
            received, ts = ms(r["received_at"]), ms(r["timestamp"])
            assert live.started_ms - 50 <= received <= live.stopped_ms, (table, r)
            assert received - 86_400_000 < ts <= received + 50, (table, r)  # exchange time, not ours
            CHECKS[dt](r)


def ms(value) -> int:
    return int(value.timestamp() * 1000 + 0.5)


def positive(*values) -> bool:
    return all(isinstance(v, Decimal) and v > 0 for v in values)


def check_trade(r):
    assert r["side"] in ("buy", "sell") and positive(r["price"], r["quantity"]) and r["trade_id"], r


def check_book(r):
    bids, asks = r["bids"], r["asks"]
    assert 0 < len(bids) <= DEPTH and 0 < len(asks) <= DEPTH and r["sequence"] > 0, r
    assert [p for p, _ in bids] == sorted((p for p, _ in bids), reverse=True) and bids[0][0] < asks[0][0]
    assert [p for p, _ in asks] == sorted(p for p, _ in asks)
    assert all(positive(q) for _, q in bids + asks)


def check_funding(r):
    assert abs(r["funding_rate"]) < Decimal("0.01") and ms(r["funding_time"]) > 0, r
    assert r["mark_price"] is None or positive(r["mark_price"]), r
    assert r["index_price"] is None or positive(r["index_price"]), r


def check_open_interest(r):
    assert positive(r["open_interest"]) and (r["open_interest_value"] is None or positive(r["open_interest_value"]))


def check_liquidation(r):
    assert r["side"] in ("buy", "sell") and positive(r["price"], r["quantity"]), r


def check_ratio(r):
    assert r["period"] == "5m" and positive(r["long_short_ratio"]), r
    if r["long_ratio"] is not None and r["short_ratio"] is not None:
        assert abs(r["long_ratio"] / r["short_ratio"] - r["long_short_ratio"]) < Decimal("0.001"), r


CHECKS = {"trade": check_trade, "orderbook": check_book, "funding_rate": check_funding,
          "open_interest": check_open_interest, "liquidation": check_liquidation, "lsr_top_position": check_ratio,
          "lsr_all_account": check_ratio, "volatility_index": lambda r: positive(r["value"])}


def test_the_only_gaps_are_the_streams_ending_when_the_collector_stopped(live):
    assert {g["reason"] for g in live.rows["gaps"]} == {"disconnect"}
    assert ("orderbook", "disconnect") in {(g["stream_type"], g["reason"]) for g in live.rows["gaps"]}
    assert all(ms(g["timestamp"]) >= live.stopped_ms - 2000 for g in live.rows["gaps"])


# -- round trip ------------------------------------------------------------------------------------------

def recordings(live: Live, feed: str) -> list[str]:
    return sorted(str(p) for p in (live.record_dir / feed).glob("*.jsonl.gz"))


def live_records(live: Live, feed: str) -> list[dict]:
    """What the collector published for a feed, less the gaps of its own stop (not in any traffic)."""
    return [r for r in live.published if record_feed(r) == feed
            and not (r["data_type"] == "gap" and r["reason"] == "disconnect")]


def test_the_recording_has_one_envelope_per_frame_for_every_feed(live):
    for feed in FEEDS:
        files = recordings(live, feed)
        assert files and all(re.fullmatch(r"\d{8}T\d{2}-\d{3}\.jsonl\.gz", Path(f).name) for f in files), feed
        with gzip.open(files[0], "rt") as fh:
            first = json.loads(fh.readline())
        assert list(first) == ["received_at", "source", "data"] and isinstance(first["data"], str)
        assert live.started_ms <= first["received_at"] <= live.stopped_ms


def test_the_recording_holds_the_instrument_lists_the_collector_loaded(live):
    for feed in FEEDS:
        lists = replay.instrument_list_paths(make_feed(feed))
        sources = {json.loads(line)["source"] for f in recordings(live, feed) for line in gzip.open(f)}
        assert any(urlsplit(s).path in lists for s in sources), feed


def test_replaying_the_recording_gives_every_record_the_live_collector_published(live):
    for feed in FEEDS:
        out = io.BytesIO()
        assert replay.run(feed, recordings(live, feed), DEPTH, out=out) == 0  # what `marketprism replay` runs
        replayed = [json.loads(line) for line in out.getvalue().splitlines()]
        expected = live_records(live, feed)
        assert len(replayed) == len(expected) > 0, feed
        # same records; order may differ only where two sockets of one feed interleaved their publishes
        assert sorted(replayed, key=repr) == sorted(expected, key=repr), feed


async def test_replay_publish_stores_the_rows_of_the_live_run_and_twice_adds_nothing(live, store, nats_server,
                                                                                     capsys):
    nc = await streams.connect(nats_server.url)
    await streams.ensure(nc)
    writer = HotWriter(nc, store, batch_rows=5000, flush_interval_s=0.1)
    task = asyncio.create_task(writer.run())
    expected = {t: [r for r in got if not (t == "gaps" and r["reason"] == "disconnect")]
                for t, got in live.rows.items()}
    total = len({dedup_key(decode(json.dumps(r).encode())) for f in FEEDS for r in live_records(live, f)})
    # what `marketprism replay --publish` runs (test_record.py runs the command itself)
    settings = load(environ={"MARKETPRISM_NATS_URL": nats_server.url})
    try:
        first = [await replay.publish(f, recordings(live, f), DEPTH, settings) for f in FEEDS]
        assert await wait_for(lambda: writer.inserted >= total, 20), (writer.inserted, total)
        capsys.readouterr()
        again = [await replay.publish(f, recordings(live, f), DEPTH, settings) for f in FEEDS]
        summaries = SUMMARY.findall(capsys.readouterr().err)
        await asyncio.sleep(0.5)
    finally:
        writer.stop()
        await task
        await nc.drain()
    assert first == again == [0] * len(FEEDS)
    assert [tuple(map(int, s)) for s in summaries] == [(len(live_records(live, f)),) * 3 for f in FEEDS]
    assert writer.inserted == total
    for table, want in expected.items():
        got = rows(store, f"SELECT * FROM {schema.HOT}.{table} FINAL")
        assert sorted(got, key=repr) == sorted(want, key=repr), table
