"""Processes for the fault tests: a simulator, a nats-server, the collector and storage-hot roles,
each started and stopped (or killed) by its own pid, all on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from marketprism.bus.server import binary, free_port
from marketprism.settings import FEEDS


class Stack:
    def __init__(self, tmp: Path, feeds=("binance_spot",), rate: int = 50) -> None:
        self.tmp = tmp
        self.feeds = feeds
        self.rate = rate
        self.sim_port, self.nats_port = free_port(), free_port()
        self.ports = {"collector": free_port(), "storage-hot": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.log = open(tmp / "stack.log", "ab")

    def env(self, role: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKETPRISM_")}
        env.update(MARKETPRISM_NATS_URL=f"nats://127.0.0.1:{self.nats_port}", MARKETPRISM_LOG_LEVEL="WARNING",
                   MARKETPRISM_CLICKHOUSE_URL=f"chdb://{self.tmp / 'clickhouse'}",
                   MARKETPRISM_DATA_DIR=str(self.tmp / "data"), MARKETPRISM_HEALTH_PORT=str(self.ports.get(role, 0)),
                   MARKETPRISM_FEEDS=",".join(self.feeds), MARKETPRISM_SYMBOLS="BTC-USDT",
                   MARKETPRISM_DATA_TYPES="trade,orderbook", MARKETPRISM_HOT_TTL_DAYS="3650",
                   MARKETPRISM_RECONNECT_MAX_S="1")
        for feed in FEEDS:
            env[f"MARKETPRISM_{feed.upper()}_WS_URL"] = f"ws://127.0.0.1:{self.sim_port}/{feed}"
            env[f"MARKETPRISM_{feed.upper()}_REST_URL"] = f"http://127.0.0.1:{self.sim_port}/{feed}"
        return env

    def _spawn(self, name: str, args: list[str], env: dict | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=env or self.env(name), stdout=self.log, stderr=self.log)
        self.procs[name] = proc
        return proc

    def start_nats(self) -> None:
        self._spawn("nats", [binary(), "-js", "-sd", str(self.tmp / "nats"), "-a", "127.0.0.1", "-p",
                             str(self.nats_port)], env=dict(os.environ))
        wait_port(self.nats_port)

    def start_sim(self) -> None:
        self._spawn("sim", [sys.executable, "-m", "marketprism", "simulate", "--port", str(self.sim_port),
                            "--feeds", ",".join(self.feeds), "--symbols", "BTC-USDT", "--rate", str(self.rate),
                            "--speed", "20"])
        wait_port(self.sim_port)

    def init(self) -> None:
        res = subprocess.run([sys.executable, "-m", "marketprism", "init"], env=self.env("init"),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr

    def start(self, role: str) -> subprocess.Popen:
        proc = self._spawn(role, [sys.executable, "-m", "marketprism", role])
        deadline = time.monotonic() + 60
        while self.health(role) is None:
            assert proc.poll() is None, f"{role} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{role} did not serve /health"
            time.sleep(0.3)
        return proc

    def health(self, role: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[role]}/health", timeout=5) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())
        except OSError:
            return None

    def metric(self, role: str, name: str, **labels) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[role]}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if all(f'{k}="{v}"' in line for k, v in labels.items()):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self, name: str, sig=signal.SIGKILL) -> int:
        proc = self.procs[name]
        proc.send_signal(sig)
        return proc.wait(timeout=60)

    def query(self, sql: str) -> list[list[str]]:
        res = subprocess.run([sys.executable, "-m", "marketprism", "query", sql], env=self.env("query"),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return [line.split("\t") for line in res.stdout.splitlines()[1:]]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.log.close()


def wait_port(port: int, timeout_s: float = 20) -> None:
    import socket
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"port {port} never opened"
        time.sleep(0.05)


def wait(predicate, timeout_s: float = 60, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval_s)
    return value
