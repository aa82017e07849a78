"""Sampling profiles of the running roles with py-spy (`bench --profile`): where their CPU goes, as the
share of samples in which a function is running (self) or on the stack (inclusive)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Frames on every stack of an asyncio program: they say nothing about where the time goes.
_FRAMEWORK = ("<frozen runpy>", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py",
              "marketprism/__main__.py", "marketprism/ops/cli.py", "threading.py", "concurrent/futures/thread.py")


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    path = str(found) if found.exists() else shutil.which("py-spy")
    if not path:
        raise FileNotFoundError("bench --profile needs py-spy (pip install py-spy)")
    return path


def start(pids: dict[str, int], seconds: float, out_dir: Path) -> dict[str, tuple[subprocess.Popen, Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    running = {}
    for name, pid in pids.items():
        path = out_dir / f"{name}.txt"
        proc = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                                 "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        running[name] = (proc, path)
    return running


def finish(running: dict[str, tuple[subprocess.Popen, Path]], top: int = 15) -> dict[str, dict]:
    out = {}
    for name, (proc, path) in running.items():
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out[name] = summarize(path, top) if path.exists() else None
    return out


def summarize(path: Path, top: int = 15) -> dict:
    """py-spy's raw (collapsed) stacks -> the functions with the most samples, self and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            if not any(part in frame for part in _FRAMEWORK):
                inclusive[frame] += n

    def share(counter: Counter[str]) -> list[list]:
        return [[round(100 * n / total, 1), frame] for frame, n in counter.most_common(top)] if total else []
    return {"samples": total, "self_pct": share(own), "inclusive_pct": share(inclusive), "file": str(path)}
