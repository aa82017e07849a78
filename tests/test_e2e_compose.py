"""End to end on the Docker Compose deployment, fed by the simulator (profile sim).

Builds the images, starts compose.yaml with `--profile sim` (the live collector is not started: only
collector-sim and what it depends on, plus storage-cold), waits until every one of the eight data types has
rows in ClickHouse, then runs `marketprism integrity` inside the stack and expects exit 0.

Needs a Docker engine with the compose v2 plugin, and testcontainers (`pip install testcontainers`);
skips with the reason otherwise. Runs in its own compose project with fresh random secrets, and removes its
containers and volumes afterwards. The published ports are the defaults (127.0.0.1:4222, 8123, ...), so
they must be free. MARKETPRISM_E2E_TIMEOUT_S bounds the wait for data (default 300 s, after the build).
MARKETPRISM_E2E_COLD=1 also runs the hot -> cold test on two servers (compose.cold-test.yaml).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from marketprism.records import DATA_TYPES, TABLE_FOR

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = float(os.environ.get("MARKETPRISM_E2E_TIMEOUT_S", "300"))
TABLES = sorted(TABLE_FOR[dt] for dt in DATA_TYPES if dt != "gap")  # the eight data types


def _no_docker_reason() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on this machine"
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    if info.returncode != 0:
        first = (info.stderr.strip().splitlines() or ["`docker info` failed"])[0]
        return f"no Docker engine reachable: {first}"
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        return "the docker compose v2 plugin is missing (testcontainers drives `docker compose`)"
    return None


def _env_file(directory: Path) -> Path:
    """.env.example with every change-me replaced by a fresh secret, in a project of its own."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            if value.strip() == "change-me":
                value = secrets.token_hex(24)
            elif key.strip() == "COMPOSE_PROJECT_NAME":
                value = f"marketprism-e2e-{uuid.uuid4().hex[:8]}"
            line = f"{key}={value}"
        lines.append(line)
    path = directory / "e2e.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _start(tmp_path_factory, files: list[str], services: list[str]):
    reason = _no_docker_reason()
    if reason:
        pytest.skip(reason)
    try:
        from testcontainers.compose import DockerCompose
    except ImportError:
        pytest.skip("testcontainers is not installed (pip install testcontainers)")
    compose = DockerCompose(ROOT, compose_file_name=files, env_file=str(_env_file(tmp_path_factory.mktemp("e2e"))),
                            profiles=["sim"], build=True, wait=False, services=services)
    compose.start()
    return compose


def _stop(compose) -> None:
    compose.services = None  # `down` the whole project, not only the services named for `up`
    compose.stop(down=True)


def _query(compose, service: str, sql: str) -> str:
    """Ask a ClickHouse server from inside its container (the default user is local-only there)."""
    try:
        out, _, _ = compose.exec_in_container(["clickhouse-client", "--query", sql], service)
    except subprocess.CalledProcessError:
        return ""  # not ready yet, or the schema is still being applied: the caller polls
    return out


def _rows(compose, service: str, database: str) -> dict[str, int]:
    out = _query(compose, service, f"SELECT table, sum(rows) FROM system.parts WHERE database = '{database}' "
                                   "AND active GROUP BY table FORMAT TSV")
    counts = dict.fromkeys(TABLES, 0)
    for line in out.splitlines():
        table, _, rows = line.partition("\t")
        if table in counts:
            counts[table] = int(rows)
    return counts


def _wait_for_all_tables(compose, service: str, database: str) -> dict[str, int]:
    deadline = time.monotonic() + TIMEOUT_S
    counts = _rows(compose, service, database)
    while time.monotonic() < deadline and not all(counts.values()):
        time.sleep(5)  # polling for data, not for readiness: startup order is compose's depends_on
        counts = _rows(compose, service, database)
    if not all(counts.values()):
        logs, _ = compose.get_logs()
        missing = sorted(t for t, n in counts.items() if not n)
        pytest.fail(f"no rows in {database} for {missing} within {TIMEOUT_S:.0f} s; counts {counts}\n"
                    f"last log lines:\n{chr(10).join(logs.splitlines()[-60:])}")
    return counts


@pytest.fixture(scope="module")
def sim_stack(tmp_path_factory):
    compose = _start(tmp_path_factory, ["compose.yaml"], ["collector-sim", "storage-cold"])
    try:
        yield compose
    finally:
        _stop(compose)


@pytest.fixture(scope="module")
def hot_rows(sim_stack):
    return _wait_for_all_tables(sim_stack, "clickhouse", "marketprism_hot")


def test_all_eight_data_types_reach_clickhouse(hot_rows):
    assert set(hot_rows) == set(TABLES) and all(hot_rows.values()), hot_rows


def test_integrity_passes_on_the_stored_data(sim_stack, hot_rows):
    try:
        out, err, code = sim_stack.exec_in_container(["marketprism", "integrity"], "storage-cold")
    except subprocess.CalledProcessError as e:
        out, err, code = e.stdout.decode(errors="replace"), e.stderr.decode(errors="replace"), e.returncode
    assert code == 0, f"`marketprism integrity` exited {code}\n{out[-2000:]}\n{err[-2000:]}"


@pytest.mark.skipif(os.environ.get("MARKETPRISM_E2E_COLD") != "1", reason="set MARKETPRISM_E2E_COLD=1 to run "
                    "the hot -> cold test on two ClickHouse servers (a second full stack)")
def test_cold_tier_on_its_own_server_receives_every_table(tmp_path_factory, sim_stack):
    _stop(sim_stack)  # one stack at a time: both publish the same host ports
    compose = _start(tmp_path_factory, ["compose.yaml", "compose.cold-test.yaml"], ["collector-sim", "storage-cold"])
    try:
        _wait_for_all_tables(compose, "clickhouse-cold", "marketprism_cold")
    finally:
        _stop(compose)
