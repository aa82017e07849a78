-- storage-cold bookkeeping, kept in the cold tier itself (on the cold server when it is a separate one), so a
-- restarted or moved archiver resumes where the last one stopped. storage-cold applies this file at start-up
-- (idempotent). Rows are versioned by updated_at and read with argMax(..., updated_at): nothing depends on merges.

-- Per hot table: every window before `watermark` is verified in cold; late rows received before `swept_to`
-- have been looked for (see marketprism/store/cold.py).
CREATE TABLE IF NOT EXISTS marketprism_cold.archive_watermarks (
    table_name LowCardinality(String),
    watermark DateTime64(3, 'UTC'),
    swept_to DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY table_name;

-- The outcome of every window copy: status 'verified' or 'failed', with the distinct dedup keys counted in
-- each tier. A failed window is retried every round (and by `marketprism repair`) until it verifies.
CREATE TABLE IF NOT EXISTS marketprism_cold.archive_windows (
    table_name LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    status LowCardinality(String),
    hot_keys UInt64,
    cold_keys UInt64,
    attempts UInt32,
    reason String,
    updated_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (table_name, window_start);
