-- Ingest path of the hot tier: storage-hot inserts the records' JSON as it came off the bus into a
-- Null table whose time columns are Int64 milliseconds; a materialized view converts them into the
-- DateTime64 table. (JSONEachRow would read a bare integer for DateTime64 as seconds.)

CREATE TABLE IF NOT EXISTS {db}.trades_ingest AS {db}.trades ENGINE = Null;
ALTER TABLE {db}.trades_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.trades_ingest_mv TO {db}.trades AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.trades_ingest;

CREATE TABLE IF NOT EXISTS {db}.orderbooks_ingest AS {db}.orderbooks ENGINE = Null;
ALTER TABLE {db}.orderbooks_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.orderbooks_ingest_mv TO {db}.orderbooks AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.orderbooks_ingest;

CREATE TABLE IF NOT EXISTS {db}.funding_rates_ingest AS {db}.funding_rates ENGINE = Null;
ALTER TABLE {db}.funding_rates_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64, MODIFY COLUMN funding_time Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.funding_rates_ingest_mv TO {db}.funding_rates AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at, fromUnixTimestamp64Milli(funding_time, 'UTC') AS funding_time) FROM {db}.funding_rates_ingest;

CREATE TABLE IF NOT EXISTS {db}.open_interests_ingest AS {db}.open_interests ENGINE = Null;
ALTER TABLE {db}.open_interests_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.open_interests_ingest_mv TO {db}.open_interests AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.open_interests_ingest;

CREATE TABLE IF NOT EXISTS {db}.liquidations_ingest AS {db}.liquidations ENGINE = Null;
ALTER TABLE {db}.liquidations_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.liquidations_ingest_mv TO {db}.liquidations AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.liquidations_ingest;

CREATE TABLE IF NOT EXISTS {db}.lsr_top_positions_ingest AS {db}.lsr_top_positions ENGINE = Null;
ALTER TABLE {db}.lsr_top_positions_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.lsr_top_positions_ingest_mv TO {db}.lsr_top_positions AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.lsr_top_positions_ingest;

CREATE TABLE IF NOT EXISTS {db}.lsr_all_accounts_ingest AS {db}.lsr_all_accounts ENGINE = Null;
ALTER TABLE {db}.lsr_all_accounts_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.lsr_all_accounts_ingest_mv TO {db}.lsr_all_accounts AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.lsr_all_accounts_ingest;

CREATE TABLE IF NOT EXISTS {db}.volatility_indices_ingest AS {db}.volatility_indices ENGINE = Null;
ALTER TABLE {db}.volatility_indices_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.volatility_indices_ingest_mv TO {db}.volatility_indices AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at) FROM {db}.volatility_indices_ingest;

CREATE TABLE IF NOT EXISTS {db}.gaps_ingest AS {db}.gaps ENGINE = Null;
ALTER TABLE {db}.gaps_ingest MODIFY COLUMN timestamp Int64, MODIFY COLUMN received_at Int64, MODIFY COLUMN started_at Int64, MODIFY COLUMN ended_at Int64;
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.gaps_ingest_mv TO {db}.gaps AS
    SELECT * REPLACE (fromUnixTimestamp64Milli(timestamp, 'UTC') AS timestamp, fromUnixTimestamp64Milli(received_at, 'UTC') AS received_at, fromUnixTimestamp64Milli(started_at, 'UTC') AS started_at, fromUnixTimestamp64Milli(ended_at, 'UTC') AS ended_at) FROM {db}.gaps_ingest;
