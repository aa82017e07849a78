-- Both tiers have the same tables; the hot tier adds a TTL and the ingest tables below.
CREATE DATABASE IF NOT EXISTS marketprism_hot;
CREATE DATABASE IF NOT EXISTS marketprism_cold;
