"""`marketprism repair` on real chDB against the simulator's history endpoints: ratio buckets, funding and
Bybit open-interest history backfilled into hot and de-duplicated against what is stored (a second run adds
nothing), rows behind the watermark archived at once, the exchange's retention and the unrecoverable reported,
failed and incomplete cold windows re-copied and verified, and the two funding parsers on documented bodies."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import marketprism.sim
from marketprism import records
from marketprism.ops import repair
from marketprism.settings import Settings
from marketprism.store import cold, ledger, schema
from test_cold import cold_store, insert  # noqa: F401 - the fixture is used by name

SYMBOL = "BTC-USDT"
FEEDS = ("binance_usdm", "okx", "bybit_linear")
HOUR = 3_600_000
RATIO_STREAMS = ("lsr_top_position/binance/perpetual/BTC-USDT", "lsr_all_account/binance/perpetual/BTC-USDT",
                 "lsr_top_position/okx/perpetual/BTC-USDT", "lsr_all_account/okx/perpetual/BTC-USDT",
                 "lsr_all_account/bybit/perpetual/BTC-USDT")


@pytest.fixture
async def sim():
    simulator = await marketprism.sim.start(port=0, feeds=",".join(FEEDS), symbols=SYMBOL, rate=1)
    yield simulator
    await simulator.stop()


def settings_for(sim, **kw) -> Settings:
    return Settings(**{"feeds": FEEDS, "symbols": (SYMBOL,), "rest_urls": {f: f"{sim.url}/{f}" for f in FEEDS},
                       "archive_window_s": 3600, "archive_delay_s": 60, "archive_interval_s": 1, **kw})


async def run(store, settings: Settings, hours: float = 24.0, **kw) -> dict:
    return await repair.repair(settings, store, store, ledger.hot_source("", ""), hours, **kw)


def by_stream(report: dict) -> dict[str, dict]:
    assert not [b for b in report["backfill"] if "error" in b], report["backfill"]
    return {b["stream"]: b for b in report["backfill"]}


def hot_times(store, table: str, exchange: str, period: str | None = "5m") -> list[int]:
    extra = f" AND period = '{period}'" if period else ""
    return [int(t) for (t,) in store.query(
        f"SELECT DISTINCT toUnixTimestamp64Milli(timestamp) FROM {schema.HOT}.{table} WHERE exchange = '{exchange}'"
        f"{extra} ORDER BY 1").result_rows]


def settlements(since: int, until: int) -> list[int]:
    return [t for t in range(since - since % (8 * HOUR), until, 8 * HOUR) if since <= t < until]


async def test_backfill_fills_what_is_missing_and_only_that(cold_store, sim):
    settings = settings_for(sim)
    until = ledger.now_ms()
    near_settlement = settlements(until - 24 * HOUR, until)[0] + 20_000  # a live funding row 20 s after one
    insert(cold_store, [records.FundingRate(exchange="bybit", market_type="perpetual", symbol=SYMBOL,
                                            instrument="BTCUSDT", timestamp=near_settlement, received_at=near_settlement,
                                            funding_rate="0.0001", funding_time=near_settlement)])
    first = await run(cold_store, settings)
    streams = by_stream(first)
    for name in RATIO_STREAMS:  # every 5-minute bucket of the day whose period has ended
        assert 284 <= streams[name]["filled"] <= 288 and streams[name]["unrecoverable"] == 0, (name, streams[name])
    assert streams["open_interest/bybit/perpetual/BTC-USDT"]["filled"] >= 284
    n = len(settlements(ledger.now_ms() - 24 * HOUR, ledger.now_ms()))
    assert streams["funding_rate/binance/perpetual/BTC-USDT"]["filled"] == n
    assert streams["funding_rate/bybit/perpetual/BTC-USDT"]["filled"] == n - 1  # that settlement was stored
    buckets = hot_times(cold_store, "lsr_all_accounts", "binance")
    assert len(buckets) == streams["lsr_all_account/binance/perpetual/BTC-USDT"]["filled"]
    assert all(b % 300_000 == 0 for b in buckets) and buckets == sorted(set(buckets))
    row = cold_store.query(f"SELECT long_short_ratio, long_ratio, short_ratio, period, toUnixTimestamp64Milli("
                           f"received_at) FROM {schema.HOT}.lsr_all_accounts WHERE exchange = 'binance' "
                           "LIMIT 1").result_rows[0]
    assert row[3] == "5m" and row[1] + row[2] == 1 and row[4] >= until  # exact decimals, received now
    funding = cold_store.query(f"SELECT toUnixTimestamp64Milli(timestamp), toUnixTimestamp64Milli(funding_time), "
                               f"isNull(mark_price) FROM {schema.HOT}.funding_rates WHERE exchange = 'binance'"
                               ).result_rows
    assert all(ts == ft and ts % (8 * HOUR) == 0 and not no_mark for ts, ft, no_mark in funding)

    # the collector missed an hour of Binance all-account ratios: exactly those twelve buckets come back
    hole = buckets[100]
    cold_store.command(f"DELETE FROM {schema.HOT}.lsr_all_accounts WHERE exchange = 'binance' AND "
                       f"{ledger.in_window(hole, hole + HOUR)}")
    second = by_stream(await run(cold_store, settings))
    assert second["lsr_all_account/binance/perpetual/BTC-USDT"]["filled"] == 12
    assert hot_times(cold_store, "lsr_all_accounts", "binance") == buckets
    third = by_stream(await run(cold_store, settings))
    assert {name: b["filled"] for name, b in third.items() if b["filled"]} == {}  # de-duplicated against the store


async def test_backfilled_rows_behind_the_watermark_reach_cold(cold_store, sim):
    settings = settings_for(sim, data_types=("lsr_all_account",))
    await run(cold_store, settings, hours=6)
    archiver = cold.Archiver(cold_store, cold_store, settings, retry_delays_s=())
    archiver.start()
    while archiver.run_round():
        pass
    watermark = archiver.state["lsr_all_accounts"].watermark
    buckets = hot_times(cold_store, "lsr_all_accounts", "okx")
    assert watermark and buckets[0] < watermark
    hole = buckets[0] - buckets[0] % HOUR + HOUR  # a whole archived hour the collector never stored
    for db in (schema.HOT, schema.COLD):
        cold_store.command(f"DELETE FROM {db}.lsr_all_accounts WHERE {ledger.in_window(hole, hole + HOUR)}")
    report = await run(cold_store, settings, hours=6, recopy_on=False)
    assert by_stream(report)["lsr_all_account/okx/perpetual/BTC-USDT"]["filled"] == 12
    assert {(r["table"], r["window"], r["why"], r["verified"]) for r in report["recopy"]} == {
        ("lsr_all_accounts", ledger.iso(hole), "backfilled", True)}
    keys = [cold_store.query(ledger.count_sql(db, "lsr_all_accounts", hole, hole + HOUR)).result_rows[0][0]
            for db in (schema.HOT, schema.COLD)]
    assert keys == [36, 36]  # three venues x twelve buckets


async def test_retention_and_unrecoverable_gaps_are_reported(cold_store, sim, monkeypatch):
    settings = settings_for(sim, data_types=("lsr_all_account",), feeds=("binance_usdm",))
    short = dataclasses.replace(repair.SOURCES[1], retention_days=1)  # as if Binance kept one day
    assert short.data_type == "lsr_all_account" and short.feed == "binance_usdm"
    gap = records.Gap(exchange="binance", market_type="spot", symbol=SYMBOL, instrument="BTCUSDT",
                      timestamp=ledger.now_ms() - 60_000, received_at=ledger.now_ms(), stream_type="trade",
                      reason="sequence", from_sequence=10, to_sequence=19, started_at=ledger.now_ms() - 62_000,
                      ended_at=ledger.now_ms() - 60_000)
    insert(cold_store, [gap])
    monkeypatch.setattr(repair, "SOURCES", (short,))
    report = await run(cold_store, settings, hours=26, recopy_on=False)
    (item,) = report["backfill"]
    assert item["unrecoverable"] == 24 and "1-day retention" in item["note"]  # two hours of buckets
    assert 284 <= item["filled"] <= 288
    assert report["unrecoverable"] == [f"trade/binance/spot/BTC-USDT: gap {ledger.iso(gap.started_at)}.."
                                       f"{ledger.iso(gap.ended_at)}: feed binance_spot is not configured"]
    assert "funding_rate okx, deribit" in report["not_covered"]
    text = repair.render(report)
    assert "backfill lsr_all_account/binance/perpetual/BTC-USDT: filled" in text and "unrecoverable trade/" in text


async def test_unreachable_history_is_an_error_not_a_silent_success(cold_store):
    settings = Settings(feeds=("binance_usdm",), symbols=(SYMBOL,), data_types=("funding_rate",),
                        rest_urls={"binance_usdm": "http://127.0.0.1:1"})
    report = await run(cold_store, settings, hours=1, recopy_on=False)
    assert report["ok"] is False and "error" in report["backfill"][0]


def test_failed_and_incomplete_windows_are_copied_again(cold_store, capsys):
    from test_cold import T0, W, SETTINGS, trades_over
    insert(cold_store, trades_over(4))
    broken = cold.Archiver(cold_store, cold_store, SETTINGS, clock=lambda: T0 + 10 * W, retry_delays_s=(),
                           source=lambda table: f"(SELECT * FROM {schema.HOT}.{table} WHERE 0 = 1)")
    broken.start()
    broken.run_round()  # the first window fails; nothing is archived
    good = cold.Archiver(cold_store, cold_store, SETTINGS, clock=lambda: T0 + 10 * W, retry_delays_s=())
    good.start()
    good.state["trades"].failed.clear()
    for i in (1, 2):  # later windows verified by hand, then one loses rows in cold
        assert good.archive_window("trades", T0 + i * W, T0 + (i + 1) * W)
    good.ledger.save("trades", T0 + 3 * W, 0)
    cold_store.command(f"DELETE FROM {schema.COLD}.trades WHERE {ledger.in_window(T0 + 2 * W, T0 + 2 * W + 10_000)}")
    parser = argparse.ArgumentParser()
    repair.add_arguments(parser)
    args = parser.parse_args(["--no-backfill", "--hours", str((ledger.now_ms() - T0) / HOUR + 10 ** 6)])
    code = repair.main(args, Settings(clickhouse_url=cold_store.url, archive_window_s=60, archive_delay_s=10))
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"re-copy trades {ledger.iso(T0)} (failed): verified" in out
    assert f"re-copy trades {ledger.iso(T0 + 2 * W)} (incomplete): verified" in out
    assert ledger.read_windows(ledger.rows_of(cold_store), status="failed") == []
    keys = [cold_store.query(ledger.count_sql(db, "trades", T0, T0 + 3 * W)).result_rows[0][0]
            for db in (schema.HOT, schema.COLD)]
    assert keys == [60, 60]


BINANCE_FUNDING_DOCS = (  # developers.binance.com "Get Funding Rate History" response example (comment removed)
    b'[{"symbol":"BTCUSDT","fundingRate":"-0.03750000","fundingTime":1570608000000,"markPrice":"34287.54619963"},'
    b'{"symbol":"BTCUSDT","fundingRate":"0.00010000","fundingTime":1570636800000,"markPrice":"34287.54619963"}]')
BYBIT_FUNDING_DOCS = (  # ../shared/fixtures/exchanges/bybit/funding_history_rest_docs_example.json
    b'{"retCode":0,"retMsg":"OK","result":{"category":"linear","list":[{"symbol":"ETHPERP","fundingRate":"0.0001",'
    b'"fundingRateTimestamp":"1672041600000"}]},"retExtInfo":{},"time":1672051897447}')


def test_funding_history_parsers_on_documented_bodies():
    binance = repair.parse_binance_funding(BINANCE_FUNDING_DOCS, "BTC-USDT", 5)
    assert [records.to_dict(r) for r in binance][0] == {
        "data_type": "funding_rate", "exchange": "binance", "market_type": "perpetual", "symbol": "BTC-USDT",
        "instrument": "BTCUSDT", "timestamp": 1570608000000, "received_at": 5, "funding_rate": "-0.03750000",
        "funding_time": 1570608000000, "mark_price": "34287.54619963", "index_price": None}
    assert binance[1].funding_rate == "0.00010000"
    (bybit,) = repair.parse_bybit_funding(BYBIT_FUNDING_DOCS, "ETH-USDC", 5)
    assert (bybit.instrument, bybit.symbol, bybit.timestamp, bybit.funding_time, bybit.funding_rate,
            bybit.mark_price) == ("ETHPERP", "ETH-USDC", 1672041600000, 1672041600000, "0.0001", None)
    with pytest.raises(ValueError):
        repair.parse_bybit_funding(b'{"retCode":10001,"result":{"list":[]}}', "ETH-USDC", 5)
