"""One embedded instance per data directory: chDB allows a single process per data dir."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class LockedError(RuntimeError):
    pass


class InstanceLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "marketprism.lock"
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock is released by the kernel when the holder dies, so a stale file never blocks a start.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder().get("pid", "?")
            raise LockedError(f"data dir {self.path.parent} is in use by marketprism pid {pid}") from None
        self._fd = fd
        self._write({"pid": os.getpid()})

    def write_port(self, port: int) -> None:
        self._write({"pid": os.getpid(), "port": port})

    def _write(self, body: dict) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(body).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
