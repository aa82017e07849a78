-- Applied once per tier: {db} is marketprism_hot or marketprism_cold, {ttl} the hot TTL clause or empty.
-- Decimals are exact (Decimal(38,18) holds every value the venues publish); times are UTC milliseconds.
-- ReplacingMergeTree on the dedup key of DESIGN.md §3: a record inserted twice collapses to one row.
-- Book levels are unnamed (price, quantity) tuples: JSONEachRow then reads the records' [price, qty] arrays.

CREATE TABLE IF NOT EXISTS {db}.trades (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    trade_id String, price Decimal(38, 18), quantity Decimal(38, 18), side LowCardinality(String),
    INDEX ts_minmax timestamp TYPE minmax GRANULARITY 1
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, trade_id)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.orderbooks (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    sequence Int64,
    bids Array(Tuple(Decimal(38, 18), Decimal(38, 18))),
    asks Array(Tuple(Decimal(38, 18), Decimal(38, 18))),
    INDEX ts_minmax timestamp TYPE minmax GRANULARITY 1
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, sequence)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.funding_rates (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    funding_rate Decimal(38, 18), funding_time DateTime64(3, 'UTC'),
    mark_price Nullable(Decimal(38, 18)), index_price Nullable(Decimal(38, 18))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.open_interests (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    open_interest Decimal(38, 18), open_interest_value Nullable(Decimal(38, 18))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.liquidations (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    side LowCardinality(String), price Decimal(38, 18), quantity Decimal(38, 18)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.lsr_top_positions (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    period LowCardinality(String), long_short_ratio Decimal(38, 18),
    long_ratio Nullable(Decimal(38, 18)), short_ratio Nullable(Decimal(38, 18))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp, period)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.lsr_all_accounts (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    period LowCardinality(String), long_short_ratio Decimal(38, 18),
    long_ratio Nullable(Decimal(38, 18)), short_ratio Nullable(Decimal(38, 18))
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp, period)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.volatility_indices (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    value Decimal(38, 18)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp)
{ttl};

CREATE TABLE IF NOT EXISTS {db}.gaps (
    exchange LowCardinality(String), market_type LowCardinality(String), symbol LowCardinality(String),
    instrument LowCardinality(String), timestamp DateTime64(3, 'UTC'), received_at DateTime64(3, 'UTC'),
    stream_type LowCardinality(String), reason LowCardinality(String),
    from_sequence Nullable(Int64), to_sequence Nullable(Int64),
    started_at DateTime64(3, 'UTC'), ended_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (exchange, market_type, symbol, timestamp, stream_type)
{ttl};
