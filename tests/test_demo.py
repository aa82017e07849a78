"""`marketprism demo` as a user runs it (what `make demo` runs): within 30 s a table of rows per table x
exchange showing all eight data types and all four venues, exit 0, and nothing left running; with --follow
it keeps going until Ctrl-C and then stops as cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from marketprism import demo
from marketprism.demo import EXPECTED

EXCHANGES = ("binance", "okx", "deribit", "bybit")


def env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}


def table(stdout: str) -> dict[tuple[str, str], int]:
    """The last table printed: (table, exchange) -> rows ('-' cells left out)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split() == ["table", *EXCHANGES])
    cells = {}
    for line in lines[start + 1:start + 10]:
        name, *counts = line.split()
        cells.update({(name, ex): int(n) for ex, n in zip(EXCHANGES, counts) if n != "-"})
    return cells


def leftovers(data_dir: str, run_pid: int) -> list[str]:
    """Processes still alive from the demo: its `run` child, or anything using its data dir (nats-server)."""
    alive = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(proc.name) == run_pid or data_dir in cmdline:
            alive.append(f"{proc.name}: {cmdline}")
    return alive


def started(stderr: str) -> tuple[int, str]:
    m = re.search(r"`marketprism run` pid (\d+) with data in (\S+)", stderr)
    assert m, stderr
    return int(m.group(1)), m.group(2)


def check_table(stdout: str) -> None:
    cells = table(stdout)
    assert all(cells.get((t, ex), 0) > 0 for t, venues in EXPECTED.items() for ex in venues), cells
    assert "OK: 8/8 data types and 4/4 venues have rows" in stdout


def test_demo_prints_every_type_and_venue_within_30_s_and_leaves_nothing_running():
    began = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "marketprism", "demo"], env=env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert time.monotonic() - began < 30, res.stdout + res.stderr[-3000:]
    check_table(res.stdout)
    run_pid, data_dir = started(res.stderr)
    assert not Path(data_dir).exists()  # the temporary data dir is removed
    assert leftovers(data_dir, run_pid) == []


def test_demo_follow_keeps_running_until_interrupted(tmp_path):
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "marketprism", "demo", "--follow", "--data-dir", str(data_dir)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(line.startswith("OK:") for line in out):
            out.append(proc.stdout.readline())
        assert any(line.startswith("OK:") for line in out), "".join(out)
        time.sleep(1)
        assert proc.poll() is None  # still following
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    check_table("".join(out))
    run_pid, shown = started(err)
    assert shown == str(data_dir) and (data_dir / "clickhouse").is_dir()  # --data-dir is kept
    assert leftovers(str(data_dir), run_pid) == []


def test_stopping_the_run_leaves_the_event_loop_serving():
    """The simulator shares the demo's event loop, and a draining run still talks to it (WebSocket closing
    handshakes, a REST request in flight): a blocking wait for the run froze the simulator, so the run
    hung on it until its own timeouts, once past the 30 s the demo allows."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(0.3), sys.exit(0)))  # drains a moment\n"
         "print('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True)
    assert child.stdout.readline() == b"ready\n"

    async def stop_while_ticking() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)
        ticker = asyncio.create_task(tick())
        await demo.stop_run(child)
        ticker.cancel()
        return ticks

    ticks = asyncio.run(stop_while_ticking())
    child.stdout.close()
    assert child.returncode == 0  # it drained and exited on SIGTERM, it was not killed
    assert ticks > 1  # the loop went on while the run drained (a blocking wait lets it run at most once)
