"""`marketprism storage-hot` with a switchable ClickHouse outage, for the soak test: while the file named by
SOAK_STORE_OUTAGE_FLAG exists, every insert fails with the error clickhouse-connect raises for a refused
connection (the injection of test_store_outage.py, in the real role process; chDB has no server to stop)."""

from __future__ import annotations

import os
import sys

from clickhouse_connect.driver.exceptions import OperationalError

from marketprism.ops.cli import main
from marketprism.store.client import Store

FLAG = os.environ["SOAK_STORE_OUTAGE_FLAG"]
_insert = Store.insert_json


def insert_json(self: Store, table: str, rows: bytes) -> None:
    if os.path.exists(FLAG):
        raise OperationalError("Error HTTPConnectionPool(host='clickhouse', port=8123): Connection refused")
    _insert(self, table, rows)


Store.insert_json = insert_json

if __name__ == "__main__":
    raise SystemExit(main(["storage-hot", *sys.argv[1:]]))
