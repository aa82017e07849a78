"""Shared fixtures: a real nats-server per test (free port, stopped by pid) and one chDB store per test
process (chDB allows one data directory per process, so tests share it and clean the tables)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from marketprism.bus.server import NatsServer, free_port
from marketprism.records import TABLE_FOR
from marketprism.store import schema
from marketprism.store.client import Store, connect
from tls_support import nkey, pki  # noqa: F401 - the TLS tests' fixtures (session-scoped PKI and nkeys)

FIXTURES = Path(__file__).parent / "fixtures"
TEST_TTL_DAYS = 3650  # receipt times in replayed fixtures are old; DateTime ends in 2106, so not more


def fixture_lines(relpath: str) -> list[bytes]:
    return [line for line in (FIXTURES / relpath).read_bytes().splitlines() if line.strip()]


@pytest.fixture
async def nats_server(tmp_path):
    server = NatsServer(str(tmp_path / "nats"), free_port())
    await server.start()
    yield server
    if server.pid and server.proc.poll() is None:
        os.kill(server.pid, signal.SIGTERM)
    server.stop()


@pytest.fixture(scope="session")
def store_session(tmp_path_factory):
    path = tmp_path_factory.mktemp("chdb") / "clickhouse"
    store = Store(connect(f"chdb://{path}"))
    schema.apply(store.client, TEST_TTL_DAYS)
    store.url = f"chdb://{path}"
    yield store
    store.close()


@pytest.fixture
def store(store_session):
    for db in (schema.HOT, schema.COLD):
        for table in TABLE_FOR.values():
            store_session.command(f"TRUNCATE TABLE {db}.{table}")
    return store_session


async def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.1):
    """Poll a condition (sync or async) until true; returns the last value. Bounded by timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or asyncio.get_running_loop().time() > deadline:
            return value
        await asyncio.sleep(interval_s)
