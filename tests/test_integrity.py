"""`marketprism integrity` on real chDB (hot and cold in the one embedded store): exit 0 on whole data, exit 1
with the reason on a deleted cold window, a duplicated batch, a schema drift, a silent stream, a recorded gap
and a window the archiver could not verify; the table for people and --json for machines."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from marketprism import records
from marketprism.ops import integrity
from marketprism.settings import Settings
from marketprism.store import cold, ledger, schema
from test_cold import cold_store, insert  # noqa: F401 - the fixture is used by name

W = 600_000
NOW = 0  # set for each test: the data must be fresh when the test runs, however long the suite took before


@pytest.fixture(autouse=True)
def fresh_now(monkeypatch):
    monkeypatch.setitem(globals(), "NOW", ledger.now_ms())
SETTINGS_KW = dict(archive_window_s=600, archive_delay_s=10, archive_interval_s=1)
SETTINGS = Settings(**SETTINGS_KW)


def record(dt: str, exchange: str, market_type: str, ts: int, n: int) -> records.Record:
    symbol = "BTC" if dt == "volatility_index" else "BTC-USDT"
    common = dict(exchange=exchange, market_type=market_type, symbol=symbol, instrument=symbol, timestamp=ts,
                  received_at=ts + 40)
    return {
        "trade": lambda: records.Trade(**common, trade_id=str(n), price="1.5", quantity="2", side="buy"),
        "orderbook": lambda: records.OrderBook(**common, sequence=n, bids=[("1.4", "1")], asks=[("1.6", "1")]),
        "funding_rate": lambda: records.FundingRate(**common, funding_rate="0.0001", funding_time=ts + 1),
        "open_interest": lambda: records.OpenInterest(**common, open_interest="10"),
        "liquidation": lambda: records.Liquidation(**common, side="sell", price="1.5", quantity="1"),
        "lsr_top_position": lambda: records.LsrTopPosition(**common, period="5m", long_short_ratio="1.2"),
        "lsr_all_account": lambda: records.LsrAllAccount(**common, period="5m", long_short_ratio="1.1"),
        "volatility_index": lambda: records.VolatilityIndex(**common, value="55.1"),
    }[dt]()


def whole_data(store, skip: tuple = ()) -> None:
    """Every expected cell: a row every 4 minutes over the last 20, the newest a few seconds old."""
    recs = []
    for dt, ex, mt in integrity.expected_cells(SETTINGS):
        if (dt, ex, mt) in skip:
            continue
        for i in range(6):
            recs.append(record(dt, ex, mt, NOW - 3000 - i * 240_000 - len(dt + ex + mt), i))
    insert(store, recs)


def archived(store) -> cold.Archiver:
    arch = cold.Archiver(store, store, SETTINGS, clock=lambda: NOW, retry_delays_s=(0.01,))
    arch.start()
    while arch.run_round():
        pass
    return arch


def run_check(store, collector_ok: bool = False, **kw) -> dict:
    rows = ledger.rows_of(store)
    return integrity.check(rows, rows, SETTINGS, collector_ok=collector_ok, now=NOW + 1000, **kw)


def problems_about(report: dict, prefix: str) -> list[str]:
    return [p for p in report["problems"] if p.startswith(prefix)]


def cli(store, *flags: str) -> int:
    parser = argparse.ArgumentParser()
    integrity.add_arguments(parser)
    args = parser.parse_args([*flags, "--collector-url", "http://127.0.0.1:1/health"])
    settings = Settings(clickhouse_url=store.url, **SETTINGS_KW)
    return integrity.main(args, settings)


def test_whole_data_exits_0(cold_store, capsys):
    whole_data(cold_store)
    archived(cold_store)
    report = run_check(cold_store)
    assert report["problems"] == [] and report["whole"]
    cells = {(c["data_type"], c["exchange"], c["market_type"]): c for c in report["coverage"]}
    assert len(cells) == 31 and all(c["rows"] >= 1 for c in cells.values())
    trade = cells[("trade", "binance", "spot")]
    assert trade["window_s"] == 300 and trade["max_timestamp"] and trade["hot_cold_lag_s"] >= 0
    assert cells[("funding_rate", "okx", "perpetual")]["window_s"] == 8 * 3600
    assert {a["table"]: a["problems"] for a in report["archive"]}["trades"] == []
    assert all(d["duplicates"] == 0 for d in report["duplicates"])
    code = cli(cold_store)
    out = capsys.readouterr().out
    assert code == 0 and "WHOLE: every check passed" in out and "binance" in out
    code = cli(cold_store, "--json")
    body = json.loads(capsys.readouterr().out)
    assert code == 0 and body["whole"] is True and body["schema"] == []


def test_a_deleted_cold_window_is_found(cold_store, capsys):
    whole_data(cold_store)
    archived(cold_store)
    start = ledger.read_windows(ledger.rows_of(cold_store), status="verified")[0]["start"]  # in cold, verified
    cold_store.command(f"DELETE FROM {schema.COLD}.trades WHERE {ledger.in_window(start, start + W)}")
    report = run_check(cold_store)
    found = problems_about(report, "archive: trades:")
    assert any("keys were verified" in p or "were verified" in p for p in found), found
    assert any(f"window {ledger.iso(start)}: cold has 0 keys, hot" in p for p in found), found
    assert not problems_about(report, "archive: orderbooks")
    code = cli(cold_store)
    assert code == 1 and "NOT WHOLE" in capsys.readouterr().out


def test_a_duplicated_batch_is_found(cold_store):
    whole_data(cold_store)
    archived(cold_store)
    cold_store.command(f"SYSTEM STOP MERGES {schema.COLD}.orderbooks")  # the duplicates stay until looked at
    old = ledger.in_window(NOW - 30 * 60_000, NOW - 11 * 60_000)
    cold_store.command(f"INSERT INTO {schema.COLD}.orderbooks SELECT * FROM {schema.COLD}.orderbooks WHERE {old}")
    report = run_check(cold_store)
    dup = {(d["tier"], d["table"]): d for d in report["duplicates"]}[("cold", "orderbooks")]
    assert dup["duplicates"] == dup["rows"] - dup["distinct"] > 0
    assert problems_about(report, "duplicates: cold.orderbooks:") and not report["whole"]
    # a redelivery of the last minutes is not counted yet: merges may still collapse it
    insert(cold_store, [record("trade", "okx", "spot", NOW - 1000, 0)])
    assert not problems_about(run_check(cold_store), "duplicates: hot.trades")


def test_a_schema_drift_is_found(cold_store):
    whole_data(cold_store)
    archived(cold_store)
    cold_store.command(f"ALTER TABLE {schema.COLD}.liquidations ADD COLUMN note String")
    try:
        report = run_check(cold_store)
    finally:
        cold_store.command(f"ALTER TABLE {schema.COLD}.liquidations DROP COLUMN note")
    assert report["schema"] == [{"table": "liquidations", "difference": "hot only: order; cold only: ['note String']"}]
    assert problems_about(report, "schema: liquidations:") and not report["whole"]
    cold_store.command(f"ALTER TABLE {schema.COLD}.gaps MODIFY COLUMN reason String")  # a type drift
    try:
        assert run_check(cold_store)["schema"] == [{"table": "gaps", "difference": "hot only: ['reason LowCardinality("
                                                 "String)']; cold only: ['reason String']"}]
    finally:
        cold_store.command(f"ALTER TABLE {schema.COLD}.gaps MODIFY COLUMN reason LowCardinality(String)")


def test_silent_streams_liquidations_and_gaps(cold_store):
    whole_data(cold_store, skip=(("trade", "bybit", "spot"), ("liquidation", "okx", "perpetual")))
    archived(cold_store)
    report = run_check(cold_store)
    assert problems_about(report, "coverage: trade/bybit/spot: no rows in the last 300 s")
    assert problems_about(report, "coverage: liquidation/okx/perpetual")
    healthy_collector = run_check(cold_store, collector_ok=True)
    assert not problems_about(healthy_collector, "coverage: liquidation")  # event-driven: none is fine
    assert problems_about(healthy_collector, "coverage: trade/bybit/spot")
    gap = records.Gap(exchange="okx", market_type="spot", symbol="BTC-USDT", instrument="BTC-USDT", timestamp=NOW - 5000,
                      received_at=NOW - 5000, stream_type="orderbook", reason="sequence", started_at=NOW - 7500,
                      ended_at=NOW - 5000)
    insert(cold_store, [gap, gap])  # redelivered: still one gap
    assert run_check(cold_store)["gaps"] == [{"stream": "orderbook/okx/spot/BTC-USDT", "gaps": 1, "duration_s": 2.5}]


def test_failed_and_unarchived_windows_are_found(cold_store):
    whole_data(cold_store)
    rows = ledger.rows_of(cold_store)
    report = run_check(cold_store)  # storage-cold never ran
    assert problems_about(report, "archive: trades:") and "is storage-cold running?" in report["problems"][0]
    broken = cold.Archiver(cold_store, cold_store, SETTINGS, clock=lambda: NOW, retry_delays_s=(),
                           source=lambda table: f"(SELECT * FROM {schema.HOT}.{table} WHERE 0)")
    broken.start()
    broken.run_round()
    failed = ledger.read_windows(rows, status="failed")
    assert failed and {w["table"] for w in failed} >= {"trades", "orderbooks"}
    report = run_check(cold_store)
    assert any("failed to archive (1 attempts): cold has 0 distinct keys" in p for p in report["problems"])
    archived(cold_store)
    assert run_check(cold_store)["whole"]


def test_rows_received_just_now_are_still_being_swept(cold_store):
    whole_data(cold_store)
    archived(cold_store)
    late = records.Trade(exchange="binance", market_type="spot", symbol="BTC-USDT", instrument="BTCUSDT",
                         timestamp=NOW - 15 * 60_000, received_at=NOW, trade_id="late", price="1.5", quantity="2",
                         side="buy")
    insert(cold_store, [late])
    assert run_check(cold_store)["whole"]  # the archiver's next round copies it
    later = integrity.check(ledger.rows_of(cold_store), ledger.rows_of(cold_store), SETTINGS, now=NOW + 10 * 60_000)
    assert any("run `marketprism repair`" in p for p in problems_about(later, "archive: trades:")), later["problems"]


@pytest.mark.parametrize("text,value", [("\\N", None), ("42", 42), ("-7", -7), ("a\\tb", "a\tb"), ("1.5", "1.5")])
def test_tsv_cells_from_the_running_instance(text, value):
    assert integrity._cell(text) == value



async def test_through_the_running_instance_query_endpoint(cold_store):
    """While `run` holds chDB, integrity asks it over POST /query: the same answers as reading the store."""
    from marketprism.ops.health import HealthServer
    from marketprism.store.client import Store, connect
    whole_data(cold_store, skip=(("trade", "okx", "spot"),))
    archived(cold_store)
    readonly = Store(connect(cold_store.url, readonly=True))
    server = HealthServer("127.0.0.1", 0, {}, store=readonly)
    await server.start()
    try:
        rows = integrity.http_rows(server.port)
        remote = await asyncio.to_thread(integrity.check, rows, rows, SETTINGS, now=NOW + 1000)  # blocking HTTP
    finally:
        await server.stop()
        readonly.close()
    assert remote == run_check(cold_store)
    assert remote["problems"] == ["coverage: trade/okx/spot: no rows in the last 300 s"]
