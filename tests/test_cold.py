"""storage-cold on real chDB, hot and cold in the one embedded store: closed windows copied and verified, the
watermark in ClickHouse, the slow tables' longer lag, late rows, catch-up, re-copies without duplicates,
failed windows (health, metric, ledger) and their recovery, and the remote() source of separate servers."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from marketprism import records
from marketprism.settings import ConfigError, Settings
from marketprism.store import cold, ledger, schema

WINDOW_S, DELAY_S = 60, 10
W = WINDOW_S * 1000
T0 = 1_900_000_020_000 - 1_900_000_020_000 % W  # a window boundary (2030), far from any other test's data
SETTINGS = Settings(archive_window_s=WINDOW_S, archive_delay_s=DELAY_S, archive_interval_s=1)


@pytest.fixture
def cold_store(store):
    """The session store with the archive ledger dropped around each test (other tests expect only data tables)."""
    drop_ledger(store)
    yield store
    for table in ledger.TABLES:
        store.command(f"SYSTEM START MERGES {schema.COLD}.{table}")
    drop_ledger(store)


def drop_ledger(store) -> None:
    for name in ("archive_watermarks", "archive_windows"):
        store.command(f"DROP TABLE IF EXISTS {schema.COLD}.{name}")


def trade(ts: int, trade_id: int, received_at: int | None = None, symbol: str = "BTC-USDT") -> records.Trade:
    return records.Trade(exchange="binance", market_type="spot", symbol=symbol, instrument=symbol.replace("-", ""),
                         timestamp=ts, received_at=ts + 50 if received_at is None else received_at,
                         trade_id=str(trade_id), price="61837.63", quantity="0.001", side="buy")


def funding(ts: int, received_at: int | None = None) -> records.FundingRate:
    return records.FundingRate(exchange="binance", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
                               timestamp=ts, received_at=ts + 50 if received_at is None else received_at,
                               funding_rate="0.0001", funding_time=ts + 3_600_000, mark_price="61837.6")


def insert(store, recs: list[records.Record]) -> None:
    by_type: dict[str, list[bytes]] = {}
    for rec in recs:
        by_type.setdefault(records.data_type(rec), []).append(records.encode(rec))
    for dt, lines in by_type.items():
        store.insert_json(schema.ingest_table(dt), b"\n".join(lines))


def trades_over(windows: int, per_window: int = 20, start: int = T0) -> list[records.Trade]:
    step = W // per_window
    return [trade(start + i * step, i) for i in range(windows * per_window)]


def archiver(store, clock_ms: int, **kw) -> cold.Archiver:
    arch = cold.Archiver(store, store, kw.pop("settings", SETTINGS), clock=lambda: clock_ms,
                         retry_delays_s=kw.pop("retry_delays_s", (0.01, 0.01)), **kw)
    arch.start()
    return arch


def keys(store, database: str, table: str = "trades", start: int = T0, end: int = T0 + 10 ** 9) -> int:
    return int(store.query(ledger.count_sql(database, table, start, end)).result_rows[0][0])


def cold_rows(store, table: str = "trades") -> int:
    return int(store.query(f"SELECT count() FROM {schema.COLD}.{table}").result_rows[0][0])


def test_closed_windows_are_copied_verified_and_the_watermark_is_stored(cold_store):
    insert(cold_store, trades_over(5))  # five windows; the newest row was received in the last one
    arch = archiver(cold_store, clock_ms=T0 + 10 * W)
    assert arch.run_round() is False
    # the data's own clock: newest received_at ~ T0 + 5 W; minus the 10 s lag, four windows are closed
    assert arch.state["trades"].watermark == T0 + 4 * W
    assert keys(cold_store, schema.COLD) == 80 and keys(cold_store, schema.HOT) == 100
    assert cold_rows(cold_store) == 80
    verified = ledger.read_windows(ledger.rows_of(cold_store), status="verified")
    assert [(w["table"], w["start"], w["hot_keys"], w["cold_keys"]) for w in verified] == [
        ("trades", T0 + i * W, 20, 20) for i in range(4)]
    # a restarted archiver reads the watermark back from ClickHouse
    again = archiver(cold_store, clock_ms=T0 + 10 * W)
    assert again.state["trades"].watermark == T0 + 4 * W
    assert again.state["trades"].swept_to == arch.state["trades"].swept_to > 0
    health = arch.health()
    assert health["status"] == "healthy" and health["tables"]["trades"]["watermark_ms"] == T0 + 4 * W
    assert health["tables"]["trades"]["lag_s"] == pytest.approx((T0 + 5 * W - W // 20 - (T0 + 4 * W)) / 1000)
    assert REGISTRY.get_sample_value("marketprism_archive_watermark_seconds", {"table": "trades"}) == (T0 + 4 * W) / 1000
    assert REGISTRY.get_sample_value("marketprism_archive_failed_windows", {"table": "trades"}) == 0


def test_slow_tables_wait_three_times_the_delay(cold_store):
    newest = T0 + 2 * W + 25_000  # 25 s into the third window: 25 s after the second window closed
    insert(cold_store, [trade(T0 + W + 1000, 1), trade(newest, 2), funding(T0 + W + 1000)])
    arch = archiver(cold_store, clock_ms=newest + 60_000)
    arch.run_round()
    assert arch.state["trades"].watermark == T0 + 2 * W  # the 10 s lag has passed
    assert arch.state["funding_rates"].watermark is None  # 30 s have not: funding rows may still arrive late
    assert cold_rows(cold_store, "funding_rates") == 0
    insert(cold_store, [trade(newest + 10_000, 3)])  # the data's clock moves on: 35 s
    arch.run_round()
    assert arch.state["funding_rates"].watermark == T0 + 2 * W
    assert cold_rows(cold_store, "funding_rates") == 1


def test_late_rows_are_copied_into_windows_already_archived(cold_store):
    insert(cold_store, trades_over(4))
    arch = archiver(cold_store, clock_ms=T0 + 10 * W)
    arch.run_round()
    watermark = arch.state["trades"].watermark
    assert watermark == T0 + 3 * W
    # a row of the first window arrives now (received long after its window closed), and one for the third
    late = [trade(T0 + 30_000, 10_001, received_at=T0 + 4 * W + 5_000),
            trade(T0 + 2 * W + 7, 10_002, received_at=T0 + 4 * W + 6_000)]
    insert(cold_store, late)
    assert arch.run_round() is False
    assert keys(cold_store, schema.COLD, start=T0, end=T0 + 3 * W) == 62
    assert arch.state["trades"].watermark == watermark  # late rows never move the watermark
    assert arch.state["trades"].swept_to == T0 + 4 * W + 6_000
    first = [w for w in ledger.read_windows(ledger.rows_of(cold_store)) if w["start"] == T0][0]
    assert (first["status"], first["hot_keys"], first["cold_keys"]) == ("verified", 21, 21)
    assert arch.run_round() is False and cold_rows(cold_store) == 62  # swept once: nothing copied again


def test_catch_up_after_a_long_pause_takes_several_windows_per_round(cold_store):
    insert(cold_store, trades_over(60, per_window=5))
    arch = archiver(cold_store, clock_ms=T0 + 100 * W, max_windows=24)
    assert [arch.run_round(), arch.run_round(), arch.run_round()] == [True, True, False]
    assert arch.state["trades"].watermark == T0 + 59 * W
    assert keys(cold_store, schema.COLD) == 59 * 5 == cold_rows(cold_store)


def test_empty_stretches_are_skipped_without_a_copy_per_window(cold_store):
    far = T0 + 10_000 * W  # ten thousand empty windows between two trades
    insert(cold_store, [trade(T0 + 1, 1), trade(far + 1, 2), trade(far + W + 20_000, 3)])
    arch = archiver(cold_store, clock_ms=far + 5 * W)
    assert arch.run_round() is False
    assert arch.state["trades"].watermark == far + W
    assert len(ledger.read_windows(ledger.rows_of(cold_store))) == 2  # two copies, not ten thousand
    assert cold_rows(cold_store) == 2


def test_re_copying_a_window_never_duplicates_even_without_merges(cold_store):
    cold_store.command(f"SYSTEM STOP MERGES {schema.COLD}.trades")
    batch = trades_over(3)
    insert(cold_store, batch)
    insert(cold_store, batch[:20])  # a redelivered batch: hot holds the first window twice until it merges
    # a crash after the copy of the first window and before its watermark was stored
    cold_store.command(ledger.copy_sql("trades", f"{schema.HOT}.trades", T0, T0 + W))
    assert cold_rows(cold_store) == 20  # one row per key although hot has two
    arch = archiver(cold_store, clock_ms=T0 + 10 * W)
    arch.run_round()
    assert arch.state["trades"].watermark == T0 + 2 * W
    for start in (T0, T0 + W):  # and the same windows once more, as repair or a late sweep would
        assert arch.archive_window("trades", start, start + W, precheck=False)
    assert cold_rows(cold_store) == 40 == keys(cold_store, schema.COLD)


def test_a_window_that_cannot_be_verified_blocks_the_watermark_until_it_can(cold_store):
    insert(cold_store, trades_over(3))
    broken = cold.Archiver(cold_store, cold_store, SETTINGS, clock=lambda: T0 + 10 * W, retry_delays_s=(0.01, 0.01),
                           source=lambda table: f"(SELECT * FROM {schema.HOT}.{table} WHERE 0)")  # copies nothing
    broken.start()
    assert broken.run_round() is False
    state = broken.state["trades"]
    assert state.watermark is None and list(state.failed) == [T0]
    assert state.failed[T0]["attempts"] == 3 and state.failed[T0]["reason"] == "cold has 0 distinct keys, hot 20"
    health = broken.health()
    assert health["status"] == "degraded" and health["failed_windows"] == 1
    assert health["tables"]["trades"]["failed_windows"][0]["start"] == T0
    assert REGISTRY.get_sample_value("marketprism_archive_failed_windows", {"table": "trades"}) == 1
    failed = ledger.read_windows(ledger.rows_of(cold_store), status="failed")
    assert [(w["table"], w["start"], w["attempts"]) for w in failed] == [("trades", T0, 3)]
    # a new archiver (the cause fixed) picks the failure up from the ledger and retries it first
    fixed = archiver(cold_store, clock_ms=T0 + 10 * W)
    assert list(fixed.state["trades"].failed) == [T0]
    fixed.run_round()
    assert fixed.state["trades"].watermark == T0 + 2 * W and not fixed.state["trades"].failed
    assert ledger.read_windows(ledger.rows_of(cold_store), status="failed") == []
    assert fixed.health()["status"] == "healthy"


def test_cold_may_hold_more_than_hot_when_hot_rows_are_gone(cold_store):
    insert(cold_store, trades_over(2))
    arch = archiver(cold_store, clock_ms=T0 + 10 * W)
    arch.run_round()
    cold_store.command(f"DELETE FROM {schema.HOT}.trades WHERE trade_id = '3'")  # as the hot TTL would
    assert arch.archive_window("trades", T0, T0 + W, precheck=True)
    assert arch.state["trades"].failed == {}
    # cold loses two rows hot still has: fewer keys than hot, so the window is copied again
    cold_store.command(f"DELETE FROM {schema.COLD}.trades WHERE trade_id IN ('4', '5')")
    assert not arch._complete("trades", T0, T0 + W, 19, 18)
    assert arch.archive_window("trades", T0, T0 + W, precheck=True)
    assert keys(cold_store, schema.COLD, start=T0, end=T0 + W) == 20
    assert keys(cold_store, schema.HOT, start=T0, end=T0 + W) == 19


def test_separate_servers_read_hot_with_remote():
    source = ledger.hot_source("http://marketprism:pa%27ss@clickhouse:8123", "http://marketprism:x@clickhouse-cold:8123")
    assert source("trades") == ("remote('clickhouse:9000', 'marketprism_hot', 'trades', 'marketprism', 'pa\\'ss')")
    secure = ledger.hot_source("https://u:p@hot.example:8443", "https://u:p@cold.example:8443")
    assert secure("gaps").startswith("remoteSecure('hot.example:9440', 'marketprism_hot', 'gaps', 'u', 'p')")
    assert ledger.hot_source("chdb:///data/ch", "")("trades") == "marketprism_hot.trades"
    with pytest.raises(ConfigError, match="cold_clickhouse_url"):
        ledger.hot_source("chdb:///data/ch", "http://cold:8123")


def test_the_remote_copy_statement_is_valid_clickhouse(cold_store):
    """chDB parses and plans the statement, then fails only on the connection to the (absent) hot server."""
    source = ledger.hot_source("http://u:secret@127.0.0.1:8123", "http://cold:8123")
    arch = cold.Archiver(cold_store, cold_store, Settings(clickhouse_url="http://u:secret@127.0.0.1:8123",
                                                          archive_window_s=WINDOW_S), source=source,
                         clock=lambda: T0, retry_delays_s=())
    arch.ledger.ensure()
    with pytest.raises(Exception, match="(?i)connect|refused|NETWORK") as err:
        cold_store.command(ledger.copy_sql("trades", source("trades"), T0, T0 + W).replace("127.0.0.1:9000", "127.0.0.1:1"))
    assert "Syntax" not in str(err.value)
    assert not arch.archive_window("trades", T0, T0 + W)  # the failure is recorded without the password
    assert "secret" not in arch.state["trades"].failed[T0]["reason"]


def test_hot_ttl_is_checked_against_the_worst_case_lag(cold_store):
    assert cold.hot_ttl_s(cold_store, 3) == 3650 * 86400  # read from the tables, not from the settings
    worst = cold.worst_case_lag_s(Settings())  # 3600 + 1800 + 120 + 7 s
    assert worst == pytest.approx(5527)
    assert cold.ttl_warning(3 * 86400, worst) is None
    assert "less than twice" in cold.ttl_warning(3 * 3600, worst)
    assert "can expire before" in cold.ttl_warning(3600, worst)


def test_dedup_key_columns_follow_the_vocabulary():
    assert ledger.key_columns("trades") == "exchange, market_type, symbol, trade_id"
    assert ledger.key_columns("lsr_all_accounts") == "exchange, market_type, symbol, timestamp, period"
    assert ledger.key_columns("gaps") == "exchange, market_type, symbol, timestamp, stream_type"


def test_once_archives_everything_due_and_says_so(cold_store, capsys):
    insert(cold_store, trades_over(30, per_window=2, start=(cold.now_ms() - 3600_000) // W * W))
    code = cold.run_once(Settings(clickhouse_url=cold_store.url, archive_window_s=WINDOW_S, archive_delay_s=DELAY_S))
    out = capsys.readouterr().out
    assert code == 0 and "trades: verified up to 20" in out and "failed windows 0" in out
    assert cold_rows(cold_store) == 29 * 2  # the newest window is inside the lag
