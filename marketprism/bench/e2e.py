"""End-to-end loads: source -> collector -> JetStream -> storage-hot -> chDB, every process on this machine,
and what each load cost.

A load's window opens when the source has delivered its first record (it sends only to subscribers, so the
collector's start-up is outside) and the source is paused after `duration_s`; the window closes when
storage-hot has stored what was sent. `sent` is the source's own counter; `stored`, `lost` and
`duplicates` come from the store's dedup keys once storage-hot has exited (`finish`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from marketprism.bench import profile
from marketprism.bench.stack import Stack, cpu_seconds, machine_seconds, peak_rss_mb, rss_mb, wait_until
from marketprism.store.hot import latency_percentiles

SAMPLE_S = 1.0
SETTLE_S = 3.0  # storage-hot's row count unchanged this long = nothing more is coming


@dataclass(frozen=True)
class Load:
    name: str
    symbols: int
    rate: float  # all symbols together: trades/s, or trade + book messages/s with books
    duration_s: float
    books: bool = False  # trades and order books from the exchange simulator, else pre-encoded trades
    depth: int = 400
    book_interval_ms: int = 100
    warmup_s: float = 0.0  # latency samples (and the profile) of the first seconds are left out
    profile_dir: Path | None = None  # py-spy the collector and storage-hot after the warm-up


@dataclass
class Phase:
    load: Load
    index: int
    result: dict = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.index:02d}"

    def symbols(self) -> list[str]:
        return [f"P{self.tag}N{i:03d}-USDT" for i in range(self.load.symbols)]


class Pipeline:
    """One nats-server and storage-hot for every load of a bench run."""

    def __init__(self, workdir: Path, recording: Path) -> None:
        self.stack = Stack(workdir)
        self.recording = recording
        self.phases: list[Phase] = []

    def __enter__(self) -> "Pipeline":
        self.stack.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def source_command(self, phase: Phase) -> list[str]:
        load, symbols = phase.load, ",".join(phase.symbols())
        if load.books:  # books need the simulator: its diffs chain onto its REST snapshots
            return ["marketprism", "simulate", "--feeds", "binance_spot", "--symbols", symbols,
                    "--rate", str(load.rate / load.symbols)]
        return ["marketprism.bench.source", "--symbols", symbols, "--rate", str(load.rate),
                "--recording", str(self.recording)]

    def run(self, load: Load) -> dict:
        """Run one load; its store figures are filled in by finish()."""
        phase = Phase(load, len(self.phases) + 1)
        st = self.stack
        if self.phases:
            st.restart_nats()
        self.phases.append(phase)
        before = _inserted(st)
        st.start_source(self.source_command(phase))
        st.start_collector(phase.tag, phase.symbols(), "trade,orderbook" if load.books else "trade", load.depth,
                           load.book_interval_ms)
        try:
            phase.result = _measure(st, load, before)
        finally:
            st.stop("collector")
            st.stop("source")
        phase.result["inserted"] = _settled(st) - before  # rows of this load, its disconnect gaps included
        return phase.result

    def finish(self) -> dict:
        """Stop storage-hot and read every load's rows and distinct dedup keys from the store. Returns the
        whole run's check: rows storage-hot inserted against distinct keys stored, which also catches a
        duplicate that a ReplacingMergeTree merge collapsed before the query."""
        inserted = _settled(self.stack)
        self.stack.stop("storage-hot")
        stored = _stored(self.stack, {p.tag: p.result["window_ms"] for p in self.phases if p.result})
        for phase in self.phases:
            if phase.result:
                _complete(phase.result, stored.get(phase.tag, {}))
        distinct = sum(d for kinds in stored.values() for k, (_, d) in kinds.items() if k in ("trade", "orderbook", "gap"))
        return {"rows_inserted": inserted, "distinct_keys_stored": distinct, "extra_rows": inserted - distinct}


def _inserted(st: Stack) -> int:
    return st.hot().get("inserted", 0)


def _latency(st: Stack) -> dict[float, int]:
    return {float(k): n for k, n in (st.hot().get("store_latency_ms") or {}).get("buckets", [])}


def _books_live(st: Stack, symbols: int) -> bool:
    """Every symbol's REST snapshot served (the collector paces them by the venue's request weight)."""
    feed = ((st.sim_stats() or {}).get("feeds") or {}).get("binance_spot") or {}
    return (feed.get("served") or {}).get("orderbook", 0) >= symbols


def _measure(st: Stack, load: Load, before: int) -> dict:
    """`before`: storage-hot's row count before the load's source started."""
    started = time.monotonic()
    wait_until(lambda: st.check_alive("collector", "source", "storage-hot") or sum(st.sent().values()) > 0, 90,
               "the first record from the source", 0.05)
    if load.books:  # the window holds every book live: buffers of diffs awaiting a snapshot are gone
        wait_until(lambda: st.check_alive("collector", "source", "storage-hot") or _books_live(st, load.symbols),
                   600, "a snapshot for every book", 0.5)
        time.sleep(5.0)
    startup_s = time.monotonic() - started
    rss_startup = rss_mb(st.pids()["collector"])
    t0, pids, (busy0, irq0), own0 = time.monotonic(), st.pids(), machine_seconds(), time.process_time()
    t0_ms, sent0 = time.time_ns() // 1_000_000, sum(st.sent().values())
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    inserted0, lat0, profiling = _inserted(st), None, None
    timeline: dict[str, list] = {"t_s": [], "sent": [], "inserted": [], "collector_rss_mb": []}
    while (now := time.monotonic()) < t0 + load.duration_s:
        st.check_alive("collector", "source", "storage-hot")
        if lat0 is None and now >= t0 + load.warmup_s:
            lat0 = _latency(st)
            if load.profile_dir is not None:
                profiling = profile.start({k: pids[k] for k in ("collector", "storage-hot")},
                                          t0 + load.duration_s - now - 0.5, load.profile_dir)
        timeline["t_s"].append(round(now - t0, 2))
        timeline["sent"].append(sum(st.sent().values()))
        timeline["inserted"].append(_inserted(st) - inserted0)
        timeline["collector_rss_mb"].append(round(rss_mb(pids["collector"]), 1))
        time.sleep(max(0.0, min(SAMPLE_S, t0 + load.duration_s - time.monotonic())))
    st.pause_source()
    t_pause, pause_ms = time.monotonic(), time.time_ns() // 1_000_000
    profiles = profile.finish(profiling) if profiling else None
    time.sleep(0.2)  # a tick being written when the pause came still counts
    sent = st.sent()
    expected = None if load.books else sent.get("trade", 0)
    t_end = _drain(st, before, expected, t_pause)
    window = t_end - t0
    cpu = {name: round(cpu_seconds(pid) - cpu0[name], 2) for name, pid in pids.items()}
    ours = sum(cpu.values()) + time.process_time() - own0
    busy, irq = (now - then for now, then in zip(machine_seconds(), (busy0, irq0)))
    collector = (st.health("collector") or {}).get("collector") or {}
    p50, p99, n = latency_percentiles(_diff(_latency(st), lat0 or {}))
    return {
        "name": load.name, "symbols": load.symbols, "rate_requested": load.rate,
        "data_types": "trade,orderbook" if load.books else "trade", "duration_s": round(window, 2),
        "source_s": round(t_pause - t0, 2), "drain_s": round(max(0.0, t_end - t_pause), 2),
        "sent": sum(sent.values()), "sent_by_type": sent, "sent_in_window": sum(sent.values()) - sent0,
        "window_ms": [t0_ms, pause_ms],  # receipt times of the records the rate counts
        "latency_ms": {"p50": p50, "p99": p99, "samples": n},
        "cpu_s": cpu, "cpu_cores": {k: round(v / window, 2) for k, v in cpu.items()},
        "interrupt_cores": round(irq / window, 2),  # mostly loopback networking between the processes
        "other_load_cores": round(max(0.0, busy - irq - ours) / window, 2),  # everything else on the machine
        "collector_rss_mb": {"max": max(timeline["collector_rss_mb"], default=0.0),
                             "final": round(rss_mb(pids["collector"]), 1), "at_window_start": round(rss_startup, 1),
                             "peak_since_start": round(peak_rss_mb(pids["collector"]), 1)},
        "startup_s": round(startup_s, 1),
        "publisher": {"acked": collector.get("published_acked"), "pending": collector.get("publish_pending")},
        "timeline": timeline, "profile": profiles,
    }


def _drain(st: Stack, inserted0: int, expected: int | None, t_pause: float, timeout_s: float = 300.0) -> float:
    """Until storage-hot has stored `expected` rows, or its count stops moving; returns when it last moved."""
    last, last_change = _inserted(st), time.monotonic()
    while time.monotonic() - t_pause < timeout_s:
        if expected is not None and last - inserted0 >= expected:
            return last_change
        if time.monotonic() - last_change >= SETTLE_S:
            break
        time.sleep(0.05)
        now = _inserted(st)
        if now != last:
            last, last_change = now, time.monotonic()
    return last_change


def _settled(st: Stack, quiet_s: float = 1.0) -> int:
    """storage-hot's row count once the stopped collector's last records (disconnect gaps) are in."""
    last, since = _inserted(st), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(0.1)
        now = _inserted(st)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _diff(after: dict[float, int], before: dict[float, int]) -> dict[float, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def _stored(st: Stack, windows: dict[str, list[int]]) -> dict[str, dict[str, tuple[int, int]]]:
    """Per load (the tag in its symbols) and table: rows and distinct dedup keys, without FINAL so that a
    row stored twice still shows; and the records received within the load's measured window."""
    phase = "substring(symbol, 2, 2)"
    in_window = " OR ".join(f"({phase} = '{tag}' AND received_at BETWEEN fromUnixTimestamp64Milli({a}) "
                            f"AND fromUnixTimestamp64Milli({b}))" for tag, (a, b) in windows.items()) or "0"
    sql = (f"SELECT {phase} AS phase, 'trade' AS kind, count(), uniqExact(symbol, trade_id) "
           "FROM marketprism_hot.trades GROUP BY phase "
           f"UNION ALL SELECT {phase}, 'orderbook', count(), uniqExact(symbol, sequence) "
           "FROM marketprism_hot.orderbooks GROUP BY 1 "
           f"UNION ALL SELECT {phase}, 'gap', count(), uniqExact(symbol, timestamp, stream_type) "
           "FROM marketprism_hot.gaps GROUP BY 1 "
           f"UNION ALL SELECT {phase}, 'sequence_gap', count(), 0 FROM marketprism_hot.gaps "
           "WHERE reason = 'sequence' GROUP BY 1 "
           f"UNION ALL SELECT {phase}, 'levels_per_side', toUInt64(avg(length(bids))), 0 "
           "FROM marketprism_hot.orderbooks GROUP BY 1 "
           f"UNION ALL SELECT {phase}, 'in_window', count(), 0 FROM (SELECT symbol, received_at FROM "
           "marketprism_hot.trades UNION ALL SELECT symbol, received_at FROM marketprism_hot.orderbooks) "
           f"WHERE {in_window} GROUP BY 1")
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for tag, kind, rows, distinct in st.query(sql):
        out.setdefault(tag, {})[kind] = (int(rows), int(distinct))
    return out


def _complete(result: dict, stored: dict[str, tuple[int, int]]) -> None:
    trades, books, gaps = (stored.get(k, (0, 0)) for k in ("trade", "orderbook", "gap"))
    records = trades[1] + books[1]
    distinct_all = records + gaps[1]
    in_window = stored.get("in_window", (0, 0))[0]
    result.update({
        # the records received in the window, over the window plus the time to store them
        "records_per_s": round(in_window / result["duration_s"], 1) if result["duration_s"] else 0.0,
        "stored_in_window": in_window,
        "stored": records, "stored_by_type": {"trade": trades[1], "orderbook": books[1], "gap": gaps[1]},
        # every trade the source sent carries a consecutive id: missing ones are lost
        "lost": result["sent_by_type"].get("trade", 0) - trades[1],
        "duplicates": trades[0] + books[0] + gaps[0] - distinct_all,  # see Pipeline.finish for the merged ones
        "sequence_gaps": stored.get("sequence_gap", (0, 0))[0],
        "book_levels_per_side": stored.get("levels_per_side", (0, 0))[0] or None,
    })
    pipeline = sum(v for k, v in result["cpu_s"].items() if k != "source")
    result["cpu_s_per_1k_records"] = round(pipeline / in_window * 1000, 4) if in_window else None
