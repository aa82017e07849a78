"""Soak (issue 9, item 8): the real processes at a moderate rate for MARKETPRISM_SOAK_S seconds (default 45,
`make soak`: 600) with every fault injected at random times, one after another: storage-hot, nats-server and
collector SIGKILL + restart, a ClickHouse outage, and the simulator's disconnect storm, sequence gap, stale
stream, 429 and 451. At the end every trade the simulator sent is stored exactly once or lies in a recorded
gap, no dedup key is stored twice, `marketprism integrity` reports nothing but the recorded gaps, and (long
runs only) the collector's and storage-hot's RSS do not grow.

Faults do not overlap: each waits until the previous one is recovered from (processes serving /health, the
collector connected with its backlog acknowledged). The seed (MARKETPRISM_SOAK_SEED, printed) fixes the
order and the timing of the faults; the machine's timing does the rest. Figures go to <tmp>/soak.json, or to
MARKETPRISM_SOAK_OUT if set. MARKETPRISM_SOAK_FAULTS=0 runs the same without any fault: the RSS slopes of
processes that live the whole run."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import pytest

from faults_support import wait
from soak_support import TunedStack, Witness, drained, duplicates, rss_mb, slope_mb_per_min, trade_accounting


DURATION_S = float(os.environ.get("MARKETPRISM_SOAK_S", "45"))
SEED = int(os.environ.get("MARKETPRISM_SOAK_SEED", str(random.randrange(1, 10 ** 6))))
FAULTS = os.environ.get("MARKETPRISM_SOAK_FAULTS", "1") != "0"
FEEDS = ("binance_spot", "okx")
RATE = 100  # trade + depth messages per second per instrument: ~150 trades/s over the three instruments
LONG_RUN_S = 300
# MB/min, asserted for long runs only, against the slope's uncertainty: growth must not be significantly
# (two standard errors) above it. The collector's RSS is steady to a few hundred KB, so its slope is sharp;
# storage-hot holds the chDB engine, whose RSS swings by 100-200 MB with merges and caches, so the slope
# over the few minutes between its restarts is known only to several MB/min.
RSS_SLOPE_MAX = 1.0
RSS_EVERY_S = 3.0
WARMUP_S = 60.0  # left out of the slope after a (re)start: chDB climbs to its working set in about a minute
GEO_BLOCK_PAUSE_S = 300  # a 451 pauses the venue this long (collector/ratelimit.py BLOCKED_PAUSE_S)


@pytest.fixture
def stack(tmp_path):
    s = TunedStack(tmp_path, feeds=FEEDS, rate=RATE, extra={"MARKETPRISM_IDLE_TIMEOUT_S": "3"})
    yield s
    s.close()


class RssSampler(threading.Thread):
    """(seconds since start, pid, MB) for each watched process every few seconds."""

    def __init__(self, stack: TunedStack, names=("collector", "storage-hot", "nats")) -> None:
        super().__init__(daemon=True)
        self.stack, self.names = stack, names
        self.samples: dict[str, list[tuple[float, int, float]]] = {n: [] for n in names}
        self.born: dict[int, float] = {}
        self.t0 = time.monotonic()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(RSS_EVERY_S):
            now = time.monotonic() - self.t0
            for name in self.names:
                proc = self.stack.procs.get(name)
                if proc is None or proc.poll() is not None:
                    continue
                mb = rss_mb(proc.pid)
                if mb is not None:
                    self.born.setdefault(proc.pid, now)
                    self.samples[name].append((now, proc.pid, mb))

    def slope(self, name: str, since_s: float) -> tuple[float, float] | None:
        """(MB/min, its standard error): one slope fitted to every process lifetime at once, each with its own
        level (a restart starts a new segment), so that it is the growth of a running process, not the drop
        of a restart. Samples before since_s or in a warm-up are left out."""
        segments: dict[int, list[tuple[float, float]]] = {}
        for t, pid, mb in self.samples[name]:
            if t >= since_s and t - self.born[pid] >= WARMUP_S:
                segments.setdefault(pid, []).append((t, mb))
        fits = []
        for pts in segments.values():
            if len(pts) >= 3:
                mt, mv = sum(t for t, _ in pts) / len(pts), sum(v for _, v in pts) / len(pts)
                fits.append([(t - mt, v - mv) for t, v in pts])
        den = sum(dt * dt for pts in fits for dt, _ in pts)
        dof = sum(len(pts) for pts in fits) - len(fits) - 1
        if not den or dof < 1:
            return None
        slope = sum(dt * dv for pts in fits for dt, dv in pts) / den
        residual = sum((dv - slope * dt) ** 2 for pts in fits for dt, dv in pts) / dof
        return slope * 60, (residual / den) ** 0.5 * 60

    def summary(self, name: str, since_s: float) -> dict:
        mbs = [mb for _, _, mb in self.samples[name]]
        later = [mb for t, _, mb in self.samples[name] if t >= since_s]
        pids = {pid for _, pid, _ in self.samples[name]}
        return {"samples": len(mbs), "processes": len(pids), "min_mb": round(min(mbs), 1) if mbs else None,
                "max_mb": round(max(mbs), 1) if mbs else None,
                "second_half_max_mb": round(max(later), 1) if later else None,
                "slope_mb_per_min": _round(fit[0] if (fit := self.slope(name, since_s)) else None),
                "slope_stderr_mb_per_min": _round(fit[1] if fit else None),
                "slope_all_samples_mb_per_min": _round(slope_mb_per_min([(t, mb) for t, _, mb in self.samples[name]
                                                                         if t >= since_s])),
                "samples_s_pid_mb": [(round(t, 1), pid, round(mb, 1)) for t, pid, mb in self.samples[name]]}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class Faults:
    """The fault kinds, dealt from a shuffled deck (every kind before any repeats) by a seeded RNG."""

    KINDS = ("storage_hot_kill", "nats_kill", "collector_kill", "clickhouse_outage", "disconnect_storm",
             "sequence_gap", "stale_stream", "rate_limit_429", "geo_block_451")

    def __init__(self, stack: TunedStack, rng: random.Random, duration_s: float) -> None:
        self.stack, self.rng, self.duration_s = stack, rng, duration_s
        self.deck: list[str] = []
        self.log: list[dict] = []
        self.counts: dict[str, int] = {k: 0 for k in self.KINDS}

    def next_kind(self, elapsed: float) -> str:
        if not self.deck:
            self.deck = list(self.KINDS)
            self.rng.shuffle(self.deck)
        kind = self.deck.pop()
        # A 451 stops the Binance book for GEO_BLOCK_PAUSE_S; late in a long run, the book would still be
        # missing when integrity checks the last 5 minutes (a coverage finding, not a recorded gap).
        if kind == "geo_block_451" and self.duration_s >= GEO_BLOCK_PAUSE_S and \
                elapsed > self.duration_s - GEO_BLOCK_PAUSE_S - 60:
            kind = self.deck.pop() if self.deck else "sequence_gap"
        return kind

    def inject(self, kind: str, elapsed: float) -> None:
        s, rng = self.stack, self.rng
        detail: dict = {}
        if kind in ("storage_hot_kill", "nats_kill", "collector_kill"):
            role = {"storage_hot_kill": "storage-hot", "nats_kill": "nats", "collector_kill": "collector"}[kind]
            down = detail["down_s"] = round(rng.uniform(1, 4), 1)
            assert s.kill(role) == -signal.SIGKILL
            time.sleep(down)
            if role == "nats":
                s.start_nats()  # same port, same store dir
            elif role == "storage-hot":
                s.start_storage_hot_with_outage_switch()
            else:
                s.start("collector")
        elif kind == "clickhouse_outage":
            down = detail["down_s"] = round(rng.uniform(4, 10), 1)
            s.outage_flag.touch()
            time.sleep(down)
            s.outage_flag.unlink()
        elif kind == "disconnect_storm":
            n = detail["drops"] = rng.randint(2, 4)
            for i in range(n):
                feed = rng.choice((*FEEDS, "*"))
                s.sim_fault({"type": "drop", "feed": feed, "mode": rng.choice(("close", "abort"))})
                time.sleep(rng.uniform(0.3, 1.5))
        elif kind == "sequence_gap":
            feed = detail["feed"] = rng.choice(FEEDS)
            s.sim_fault({"type": "skip_sequence", "feed": feed, "count": rng.randint(1, 3)})
        elif kind == "stale_stream":
            feed = detail["feed"] = rng.choice(FEEDS)
            s.sim_fault({"type": "stale", "feed": feed, "seconds": 6})  # idle watchdog at 3 s
            time.sleep(6)
        else:  # the next Binance spot snapshot (forced by a skipped book message) is refused
            status = 429 if kind == "rate_limit_429" else 451
            s.sim_fault([{"type": "rest_status", "feed": "binance_spot", "status": status, "retry_after": 2,
                          "count": 1, "path": "/api/v3/depth"},
                         {"type": "skip_sequence", "feed": "binance_spot", "count": 1}])
        self.counts[kind] += 1
        self.log.append({"at_s": round(elapsed, 1), "kind": kind, **detail})

    def recovered(self) -> bool:
        s = self.stack
        hot, col = s.health("storage-hot"), (s.health("collector") or {}).get("collector")
        return bool(hot and col and col.get("nats_connected") and col.get("publish_pending", 1 << 30) < 500)


def test_soak_with_random_faults(stack, tmp_path):
    rng = random.Random(SEED)
    print(f"\nSOAK seed={SEED} duration_s={DURATION_S} faults={FAULTS} (MARKETPRISM_SOAK_SEED={SEED} repeats "
          f"the fault plan)")
    stack.start_nats()
    stack.start_sim()
    stack.init()
    stack.start_storage_hot_with_outage_switch()
    stack.start("collector")
    wait(lambda: (stack.health("storage-hot") or {}).get("storage_hot", {}).get("inserted", 0) > 100, 60)
    witness = Witness(stack.sim_port, FEEDS)
    witness.start()

    rss = RssSampler(stack)
    rss.start()
    faults = Faults(stack, rng, DURATION_S)
    quiet = (4, 8) if DURATION_S < 120 else (8, 20)
    started = time.monotonic()
    while True:
        time.sleep(rng.uniform(*quiet))
        elapsed = time.monotonic() - started
        if elapsed >= DURATION_S:
            break
        if not FAULTS:
            continue
        faults.inject(faults.next_kind(elapsed), elapsed)
        wait(faults.recovered, 120, 0.5)
        for name in ("collector", "storage-hot", "nats", "sim"):
            assert stack.procs[name].poll() is None, f"{name} exited by itself ({stack.procs[name].returncode})"
        if time.monotonic() - started >= DURATION_S:
            break
    ran_s = time.monotonic() - started
    rss.stopped.set()
    rss.join()

    # stop the source once the collector takes every trade stream again (a trade sent while it still
    # reconnects would be lost past its last stored one, where no neighbour shows the hole); then let it
    # publish everything it has, and storage-hot store it
    wait(lambda: trades_flowing(stack), 60)
    stack.sim_fault({"type": "stale", "seconds": 3600})
    (sent,) = wait(lambda: stable(stack.sent_trades), 30)
    wait(lambda: stable(lambda: stack.metric("collector", "marketprism_records_published_total", data_type="trade")),
         30)
    assert stack.kill("collector", signal.SIGTERM) == 0
    wait(lambda: drained(stack.nats_port), 180)
    assert stack.kill("storage-hot", signal.SIGTERM) == 0
    witness.stop()

    acct = trade_accounting(stack, sent)
    dups = duplicates(stack)
    code, report = stack.integrity({"MARKETPRISM_ARCHIVE_DELAY_S": "86400"})  # storage-cold is not part of it
    not_gaps = [p for p in report["problems"] if not p.startswith("gaps:")]
    half = ran_s / 2
    figures = {
        "seed": SEED, "faults_injected": FAULTS, "duration_s": round(ran_s, 1), "rate_per_instrument": RATE,
        "feeds": FEEDS,
        "faults": {k: n for k, n in faults.counts.items()}, "faults_total": sum(faults.counts.values()),
        "fault_log": faults.log, "witness": {"connects": witness.connects, "frames": witness.frames},
        "trades": acct,
        "duplicates": sum(r - k for r, k in dups.values()), "rows_vs_keys": dups,
        "integrity": {"exit": code, "gap_problems": len(report["problems"]) - len(not_gaps),
                      "other_problems": not_gaps},
        "rss": {name: rss.summary(name, half) for name in rss.names},
    }
    out = os.environ.get("MARKETPRISM_SOAK_OUT") or str(tmp_path / "soak.json")  # pytest prunes its tmp dirs
    with open(out, "w") as fh:
        json.dump(figures, fh, indent=2)
    shown = {**figures, "rss": {n: {k: v for k, v in r.items() if k != "samples_s_pid_mb"}
                                for n, r in figures["rss"].items()}}
    print(f"SOAK figures ({out}, with the RSS samples):\n{json.dumps(shown, indent=2)}")

    assert acct["unexplained_holes"] == [] and acct["missing_ids_outside_gaps"] == 0, acct
    assert acct["lost"] <= acct["missing_ids_in_gaps"], acct  # nothing lost past the last stored trade either
    binance = acct["by_feed"]["binance_spot"]
    assert binance["ids_in_range"] == binance["sent"], binance  # one socket: every id made was sent
    assert figures["duplicates"] == 0, dups
    assert not_gaps == [], report["problems"]
    if DURATION_S >= LONG_RUN_S:
        for name in ("collector", "storage-hot"):
            rss_fit = figures["rss"][name]
            slope, stderr = rss_fit["slope_mb_per_min"], rss_fit["slope_stderr_mb_per_min"]
            assert slope is not None and slope - 2 * stderr < RSS_SLOPE_MAX, (name, slope, stderr)


def trades_flowing(stack) -> bool:
    coverage = (stack.health("collector") or {}).get("collector", {}).get("coverage", {})
    trades = [v["age_s"] for k, v in coverage.items() if k.startswith("trade/")]
    return len(trades) == 3 and max(trades) < 0.5


def stable(read) -> tuple | None:
    """(value,) once two reads a second apart agree."""
    first = read()
    time.sleep(1.0)
    return (first,) if read() == first else None
