"""`marketprism bench`: parse throughput against cryptofeed, end-to-end throughput, latency, scaling, memory.

Parts (`--parts`, default all):
  parse    our Binance parse + normalize vs cryptofeed's Binance handler on the recordings (in this process)
  e2e      the highest sustainable rate (short probes, unless --rate is given), then --duration at it
  latency  a steady --latency-rate, exchange time -> stored (sampled by storage-hot)
  scaling  --scaling-symbols at a fixed total --scaling-rate: cost per record
  memory   the collector's RSS holding --memory-symbols books at --memory-rate messages/s (the simulator)

Writes a table to stdout and everything measured to --json (default bench/latest.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path

from marketprism.ops.args import positive_float, positive_int

PARTS = ("parse", "e2e", "latency", "scaling", "memory")
RECORDING = "binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return values


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"unknown part {bad[0] if bad else text!r}; parts are {', '.join(PARTS)}")
    return parts


def _rate(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (a number or 'auto')") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    num, whole = positive_float, positive_int
    a = parser.add_argument
    a("--parts", type=_parts, default=PARTS, help=f"comma list of {', '.join(PARTS)} (default: all)")
    a("--json", default="bench/latest.json", metavar="PATH", help="where to write the results (default %(default)s)")
    a("--duration", type=num, default=60.0, metavar="S", help="seconds of the e2e run (default %(default)s)")
    a("--rate", type=_rate, default=None, metavar="N|auto",
      help="e2e records/s; auto (default) = the highest rate the probes sustain")
    a("--symbols", type=whole, default=100, help="symbols of the e2e and latency runs (default %(default)s)")
    a("--probe-duration", type=num, default=12.0, metavar="S", help="seconds per rate probe (default %(default)s)")
    a("--probe-start", type=num, default=10000.0, metavar="N", help="first probe rate (default %(default)s)")
    a("--latency-rate", type=num, default=10000.0, metavar="N", help="records/s of the latency run (default %(default)s)")
    a("--latency-duration", type=num, default=30.0, metavar="S", help="seconds of the latency run (default %(default)s)")
    a("--scaling-symbols", type=_int_list, default=[10, 100, 500], metavar="N,N", help="default 10,100,500")
    a("--scaling-rate", type=num, default=10000.0, metavar="N", help="total records/s of each scaling run")
    a("--scaling-duration", type=num, default=20.0, metavar="S", help="seconds per scaling run (default %(default)s)")
    a("--memory-symbols", type=whole, default=200, help="books held in the memory run (default %(default)s)")
    a("--memory-rate", type=num, default=10000.0, metavar="N", help="trade + book messages/s of the memory run")
    a("--memory-duration", type=num, default=30.0, metavar="S", help="seconds of the memory run (default %(default)s)")
    a("--parse-messages", type=whole, default=200_000, metavar="N", help="frames per parse case (default %(default)s)")
    a("--parse-rounds", type=whole, default=3, metavar="N", help="alternating rounds, best kept (default %(default)s)")
    a("--fixtures", default=None, metavar="DIR", help="the recordings (default: tests/fixtures of this checkout)")
    a("--workdir", default=None, metavar="DIR", help="data of the e2e runs (default: a temporary directory)")
    a("--profile", default=None, metavar="DIR",
      help="py-spy the collector and storage-hot during the e2e run; raw stacks go to DIR, top costs to the JSON")
    a("--compare", default=None, metavar="PATH",
      help="an earlier result (JSON) to compare with, scaled by the machine's speed; exit 1 on a regression")
    a("--tolerance", type=num, default=0.15, metavar="F",
      help="how much worse a figure may be before --compare calls it a regression (default %(default)s)")


def _fixtures(arg: str | None) -> Path:
    path = Path(arg) if arg else Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    if not (path / RECORDING).exists():
        raise FileNotFoundError(f"bench: recordings not found under {path} (run from a source checkout, or --fixtures)")
    return path


def _command_line() -> str:
    argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    return " ".join(["marketprism", "bench", *map(shlex.quote, argv)])


def main(args, settings) -> int:
    from marketprism.bench import report
    fixtures = _fixtures(args.fixtures)
    base = _baseline(args.compare) if args.compare else None
    if args.profile:
        from marketprism.bench.profile import py_spy
        py_spy()  # missing: fail now, not after the probes
    out: dict = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": _command_line(),
                 "machine": report.machine(), "parse": None, "e2e": None, "collector": None, "scaling": [],
                 "store_check": None}
    if "parse" in args.parts:
        from marketprism.bench import parse
        print("parse: ours vs cryptofeed ...", file=sys.stderr, flush=True)
        out["parse"] = parse.run(fixtures, args.parse_messages, args.parse_rounds)
    if set(args.parts) - {"parse"}:
        try:
            with tempfile.TemporaryDirectory(prefix="marketprism-bench-") as tmp:
                _pipeline_parts(args, Path(args.workdir or tmp), fixtures / RECORDING, out)
        except RuntimeError as e:
            print(f"marketprism: {e}", file=sys.stderr)
            return 1
    out["targets"] = report.targets(out)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(report.table(out))
    print(f"\nresults: {path}")
    runs = [r for r in ((out["e2e"] or {}).get("run"), (out["e2e"] or {}).get("latency_run"),
                        (out["collector"] or {}).get("run"), *[s["run"] for s in out["scaling"]]) if r]
    broken = any(r.get("lost") or r.get("duplicates") for r in runs) or (out.get("store_check") or {}).get("extra_rows")
    if base is not None:
        lines, regressed = report.compare(base, out, args.tolerance)
        print(f"\ncompared with {args.compare} ({base.get('started_at', 'no start time')}):")
        print("\n".join(lines))
        broken = broken or regressed
    return 1 if broken else 0


def _baseline(path: str) -> dict:
    """An earlier bench result, read before the run so that a wrong path fails at once."""
    try:
        base = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"bench --compare: cannot read {path}: {e}") from None
    if not isinstance(base, dict) or "parse" not in base:
        raise ValueError(f"bench --compare: {path} is not a bench result")
    return base


def _pipeline_parts(args, workdir: Path, recording: Path, out: dict) -> None:
    from marketprism.bench.e2e import Load, Pipeline
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731 - progress lines
    with Pipeline(workdir, recording) as pipe:
        runs: dict[str, dict] = {}
        if "e2e" in args.parts:
            rate, probes = args.rate, []
            if rate is None:
                rate, probes = _find_rate(pipe, args, say)
            runs["e2e"] = _sustained_run(pipe, args, rate, probes, say)
        if "latency" in args.parts:
            say(f"latency: {args.latency_rate:.0f} records/s for {args.latency_duration:.0f} s ...")
            runs["latency"] = pipe.run(Load("latency", args.symbols, args.latency_rate, args.latency_duration,
                                            warmup_s=min(5.0, args.latency_duration / 4)))
        scaling = []
        if "scaling" in args.parts:
            for n in args.scaling_symbols:
                say(f"scaling: {n} symbols at {args.scaling_rate:.0f} records/s ...")
                scaling.append(pipe.run(Load(f"scaling-{n}", n, args.scaling_rate, args.scaling_duration)))
        if "memory" in args.parts:
            say(f"memory: {args.memory_symbols} books at {args.memory_rate:.0f} messages/s ...")
            runs["memory"] = pipe.run(Load("memory", args.memory_symbols, args.memory_rate, args.memory_duration,
                                           books=True))
        out["store_check"] = pipe.finish()
    from marketprism.bench import report
    report.assemble(out, runs, scaling)


def _kept_up(r: dict, rate: float) -> bool:
    """The source delivered the rate, and storage-hot had stored all of it within 2 s of the pause."""
    return r["drain_s"] <= 2.0 and r["sent"] >= 0.95 * rate * r["source_s"] and r["inserted"] >= r["sent"]


SUSTAINED_ATTEMPTS = 4
SUSTAINED_STEP = 0.9  # a tenth lower per retry: the figure moves in steps of 10 %, not 20 %


def _sustained_run(pipe, args, rate: float, probes: list[dict], say) -> dict:
    """--duration at the rate; a found rate that does not hold for the whole duration (a short probe cannot
    see costs that grow with the run, like the stream's duplicate window filling) is retried lower."""
    from marketprism.bench.e2e import Load
    earlier = []
    for attempt in range(SUSTAINED_ATTEMPTS):
        say(f"e2e: {rate:.0f} records/s for {args.duration:.0f} s ...")
        run = pipe.run(Load("e2e", args.symbols, rate, args.duration, warmup_s=min(5.0, args.duration / 4),
                            profile_dir=Path(args.profile) if args.profile else None))
        run["kept_up"] = _kept_up(run, rate)
        if run["kept_up"] or args.rate is not None or attempt == SUSTAINED_ATTEMPTS - 1:
            break
        earlier.append({k: run[k] for k in ("rate_requested", "sent", "inserted", "source_s", "drain_s", "cpu_cores",
                                            "other_load_cores")})
        rate *= SUSTAINED_STEP
    run["probes"], run["slower_attempts"] = probes, earlier
    return run


def _find_rate(pipe, args, say) -> tuple[float, list[dict]]:
    """Probe upwards by a quarter while the pipeline keeps up (downwards if the first probe does not),
    then halve the step twice between the highest rate that kept up and the lowest that did not; the
    highest rate that kept up wins. Keeping up: the source delivered the rate, and storage-hot had stored
    all of it within 2 s of the source pausing."""
    from marketprism.bench.e2e import Load
    probes: list[dict] = []

    def probe(rate: float) -> bool:
        say(f"probe: {rate:.0f} records/s for {args.probe_duration:.0f} s ...")
        r = pipe.run(Load(f"probe-{rate:.0f}", args.symbols, rate, args.probe_duration))
        delivered = r["sent"] / max(r["source_s"], 1e-9)
        kept_up = _kept_up(r, rate)
        probes.append({"rate": round(rate), "sent_per_s": round(delivered), "drain_s": r["drain_s"],
                       "kept_up": kept_up, "stored_per_s": round(r["inserted"] / max(r["duration_s"], 1e-9)),
                       "cpu_cores": r["cpu_cores"], "other_load_cores": r["other_load_cores"]})
        return kept_up

    rate, best, failed = args.probe_start, None, None
    for _ in range(12):
        if probe(rate):
            best = rate
        else:
            failed = rate
            if best is not None:
                break
        rate = rate * 1.25 if best == rate else rate * 0.7
    if best is not None and failed is not None:
        for _ in range(2):
            mid = (best + failed) / 2
            if probe(mid):
                best = mid
            else:
                failed = mid
    return (best or rate), probes
