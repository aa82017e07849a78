"""The ClickHouse schema against the record vocabulary (DESIGN.md §2-§3): every table's columns are the
record's fields, decimals are exact Decimal(38, 18), times are DateTime64(3, 'UTC') (Int64 ms in the
ingest tables), the hot tier alone has a TTL, applying the DDL twice changes nothing, and a record of
every data type written through the ingest path reads back exactly."""

from __future__ import annotations

import time
import typing
from decimal import Decimal

import msgspec
import pytest

import conftest
from marketprism import records
from marketprism.store import schema

DECIMAL = "Decimal(38, 18)"
DATETIME = "DateTime64(3, 'UTC')"
LEVELS = f"Array(Tuple({DECIMAL}, {DECIMAL}))"
# Every str field of the records is either a decimal string or one of these text fields.
TEXT_FIELDS = {"exchange", "market_type", "symbol", "instrument", "trade_id", "side", "period", "stream_type",
               "reason"}
DECIMAL_FIELDS = {"price", "quantity", "funding_rate", "mark_price", "index_price", "open_interest",
                  "open_interest_value", "long_short_ratio", "long_ratio", "short_ratio", "value"}


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _base(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if _optional(tp) else tp


def expected_types(dt: str, ingest: bool = False) -> dict[str, str]:
    """Column name -> ClickHouse type that the record struct of `dt` calls for."""
    out = {}
    for field in msgspec.structs.fields(records.RECORD_FOR[dt]):
        name, base = field.encode_name, _base(field.type)
        if name in records.TIME_FIELDS:
            ch = "Int64" if ingest else DATETIME
        elif name in DECIMAL_FIELDS:
            assert base is str, name
            ch = DECIMAL
        elif name in ("bids", "asks"):
            ch = LEVELS
        elif base is int:
            ch = "Int64"
        elif name == "trade_id":
            ch = "String"
        else:
            assert name in TEXT_FIELDS, f"{dt}.{name} is neither decimal, time nor a known text field"
            ch = "LowCardinality(String)"
        out[name] = f"Nullable({ch})" if _optional(field.type) else ch
    return out


def columns(store, database: str, table: str) -> list[tuple[str, str]]:
    return [tuple(r) for r in store.query(
        f"SELECT name, type FROM system.columns WHERE database = '{database}' AND table = '{table}' "
        "ORDER BY position").result_rows]


def create_statements(store) -> dict[str, str]:
    rows = store.query("SELECT database, name FROM system.tables WHERE database IN ('marketprism_hot', "
                       "'marketprism_cold') ORDER BY database, name").result_rows
    return {f"{db}.{name}": store.command(f"SHOW CREATE TABLE {db}.{name}") for db, name in rows}


def test_every_str_field_is_classified():
    for dt in records.TABLE_FOR:
        for field in msgspec.structs.fields(records.RECORD_FOR[dt]):
            if _base(field.type) is str:
                assert (field.name in DECIMAL_FIELDS) != (field.name in TEXT_FIELDS), f"{dt}.{field.name}"
    assert set(records.TABLE_FOR) == set(records.DATA_TYPES)


@pytest.mark.parametrize("dt", list(records.TABLE_FOR))
def test_columns_are_the_record_fields(store, dt):
    table = records.TABLE_FOR[dt]
    fields = [f for f in records.record_fields(dt) if f != "data_type"]
    want = expected_types(dt)
    hot = columns(store, schema.HOT, table)
    cold = columns(store, schema.COLD, table)
    ingest = columns(store, schema.HOT, f"{table}_ingest")
    assert sorted(name for name, _ in hot) == sorted(fields)
    assert dict(hot) == want
    assert cold == hot  # same names, same types, same order
    assert sorted(name for name, _ in ingest) == sorted(fields)
    assert dict(ingest) == expected_types(dt, ingest=True)
    assert schema.ingest_table(dt) == f"marketprism_hot.{table}_ingest"


def test_time_and_decimal_types_spot_checks(store):
    hot = dict(columns(store, schema.HOT, "funding_rates"))
    assert hot["funding_time"] == "DateTime64(3, 'UTC')"
    assert hot["funding_rate"] == "Decimal(38, 18)"
    assert hot["index_price"] == "Nullable(Decimal(38, 18))"
    ingest = dict(columns(store, schema.HOT, "gaps_ingest"))
    assert [ingest[f] for f in ("timestamp", "received_at", "started_at", "ended_at")] == ["Int64"] * 4
    assert ingest["to_sequence"] == "Nullable(Int64)"


def test_apply_again_changes_nothing(store):
    before = create_statements(store)
    expected_tables = {f"{db}.{t}" for db in (schema.HOT, schema.COLD) for t in records.TABLE_FOR.values()}
    expected_tables |= {f"{schema.HOT}.{t}_ingest" for t in records.TABLE_FOR.values()}
    expected_tables |= {f"{schema.HOT}.{t}_ingest_mv" for t in records.TABLE_FOR.values()}
    assert set(before) == expected_tables
    schema.apply(store.client, conftest.TEST_TTL_DAYS)
    assert create_statements(store) == before


def test_hot_has_ttl_on_received_at_and_cold_none(store):
    rows = dict(((db, name), query) for db, name, query in store.query(
        "SELECT database, name, create_table_query FROM system.tables "
        "WHERE database IN ('marketprism_hot', 'marketprism_cold')").result_rows)
    ttl = f"TTL toDateTime(received_at) + toIntervalDay({conftest.TEST_TTL_DAYS})"
    for table in records.TABLE_FOR.values():
        assert ttl in rows[(schema.HOT, table)], table
        assert rows[(schema.HOT, table)].count("TTL") == 1, table
        assert "TTL" not in rows[(schema.COLD, table)], table
        assert "ReplacingMergeTree" in rows[(schema.HOT, table)]
        assert "ReplacingMergeTree" in rows[(schema.COLD, table)]


# -- round trip through the ingest path ------------------------------------------------------------------

NOW_MS = int(time.time() * 1000)  # the hot TTL counts from received_at: keep the rows alive
TS = 1723161255342
COMMON = dict(exchange="binance", market_type="perpetual", symbol="BTC-USDT", instrument="BTCUSDT",
              received_at=NOW_MS)


def sample_records() -> list[records.Record]:
    return [
        records.Trade(**COMMON, timestamp=TS, trade_id="3735683259", price="61837.63000000",
                      quantity="0.00001234", side="sell"),
        records.OrderBook(**COMMON, timestamp=TS + 1, sequence=50093239224,
                          bids=[("61837.63000000", "1.23400000"), ("61837.62000000", "0.00001234")],
                          asks=[("61837.64000000", "0.50000000"), ("61900.00000000", "12.00000000")]),
        records.FundingRate(**COMMON, timestamp=TS + 2, funding_rate="0.0001534702159002",
                            funding_time=1723190400000, mark_price="61837.63000000", index_price="61830.12345678"),
        records.FundingRate(**COMMON, timestamp=TS + 3, funding_rate="-0.00001234", funding_time=1723219200000,
                            mark_price=None, index_price=None),
        records.OpenInterest(**COMMON, timestamp=TS + 4, open_interest="84617.188",
                             open_interest_value="4987349689.43930056016"),
        records.OpenInterest(**COMMON, timestamp=TS + 5, open_interest="10659.509", open_interest_value=None),
        records.Liquidation(**COMMON, timestamp=TS + 6, side="sell", price="18917.15", quantity="0.009"),
        records.LsrTopPosition(**COMMON, timestamp=TS + 7, period="5m", long_short_ratio="1.4342",
                               long_ratio="0.5344", short_ratio="0.4238"),
        records.LsrAllAccount(**COMMON, timestamp=TS + 8, period="5m", long_short_ratio="1.25",
                              long_ratio=None, short_ratio=None),
        records.VolatilityIndex(exchange="deribit", market_type="options", symbol="BTC", instrument="btc_usd",
                                timestamp=TS + 9, received_at=NOW_MS, value="129.36"),
        records.Gap(**COMMON, timestamp=TS + 10, stream_type="orderbook", reason="sequence",
                    from_sequence=5123107837558, to_sequence=None, started_at=TS - 500, ended_at=TS + 10),
    ]


def _as_db(field: str, value):
    """The Python value clickhouse-connect returns for a record field stored exactly."""
    if value is None:
        return None
    if field in DECIMAL_FIELDS:
        return Decimal(value)
    if field in ("bids", "asks"):
        return [(Decimal(p), Decimal(q)) for p, q in value]
    return value


def read_rows(store, dt: str) -> list[dict]:
    fields = [f for f in records.record_fields(dt) if f != "data_type"]
    select = ", ".join(f"toUnixTimestamp64Milli({f}) AS ms_{f}" if f in records.TIME_FIELDS else f for f in fields)
    order = ", ".join(records.KEY_FIELDS[dt])
    rows = store.query(f"SELECT {select} FROM {schema.HOT}.{records.TABLE_FOR[dt]} FINAL ORDER BY {order}").result_rows
    return [dict(zip(fields, row)) for row in rows]


def test_round_trip_every_data_type_exact(store):
    recs = sample_records()
    assert {records.data_type(r) for r in recs} == set(records.TABLE_FOR)
    for rec in recs:
        payload = records.encode(rec)
        store.insert_json(schema.ingest_table(records.data_type(rec)), payload)
        store.insert_json(schema.ingest_table(records.data_type(rec)), payload)  # a redelivery
    for dt in records.TABLE_FOR:
        want = [{f: _as_db(f, v) for f, v in records.to_dict(r).items() if f != "data_type"}
                for r in recs if records.data_type(r) == dt]
        got = read_rows(store, dt)
        assert got == want, dt
        assert store.count(schema.HOT, dt) == len(want)
    # exactness beyond Decimal equality: the stored text has the exchange's digits
    trade_text = store.query(f"SELECT toString(price), toString(quantity) FROM {schema.HOT}.trades FINAL").result_rows
    assert trade_text == [("61837.63", "0.00001234")]
    ts_types = store.query(f"SELECT toTypeName(timestamp), toUnixTimestamp64Milli(received_at) "
                           f"FROM {schema.HOT}.trades FINAL").result_rows
    assert ts_types == [("DateTime64(3, 'UTC')", NOW_MS)]
    nulls = store.query(f"SELECT isNull(mark_price), isNull(index_price) FROM {schema.HOT}.funding_rates "
                        "FINAL ORDER BY timestamp").result_rows
    assert nulls == [(0, 0), (1, 1)]


def test_same_key_collapses_and_other_key_stays(store):
    first = sample_records()[0]
    other = msgspec.structs.replace(first, trade_id="3735683260", price="61837.64000000")
    table = schema.ingest_table("trade")
    store.insert_json(table, records.encode(first))
    store.insert_json(table, records.encode(first))
    assert store.count(schema.HOT, "trade") == 1
    store.insert_json(table, records.encode(other))
    assert store.count(schema.HOT, "trade") == 2
    assert [r["trade_id"] for r in read_rows(store, "trade")] == ["3735683259", "3735683260"]
    assert store.count(schema.COLD, "trade") == 0  # the ingest path writes the hot tier only


def test_several_rows_in_one_insert(store):
    """storage-hot inserts newline-separated batches: every row lands with its own exact values."""
    base = sample_records()[0]
    batch = [msgspec.structs.replace(base, trade_id=str(i), price=f"{i}.000000000000000001", timestamp=TS + i)
             for i in range(1, 4)]
    store.insert_json(schema.ingest_table("trade"), b"\n".join(records.encode(r) for r in batch))
    got = store.query(f"SELECT trade_id, price, toUnixTimestamp64Milli(timestamp) FROM {schema.HOT}.trades FINAL "
                      "ORDER BY trade_id").result_rows
    assert got == [(str(i), Decimal(f"{i}.000000000000000001"), TS + i) for i in range(1, 4)]
