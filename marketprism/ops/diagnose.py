"""`marketprism diagnose`: what is wrong and what to do about it.

Ports (taken, and by what), the instance lock (stale?), NATS (reachable, streams, consumers), ClickHouse
(reachable, schema), disk space of the data dirs, blocked venues and stale streams reported by the running
collector, and the clock offset against each exchange's server time (offsets corrupt latency figures).
Exit 0 when nothing is wrong (warnings allowed), 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import aiohttp

from marketprism.ops import status
from marketprism.settings import ROLE_HEALTH_PORTS, redact

LEVELS = ("ok", "warn", "fail")
CLOCK_WARN_MS, CLOCK_FAIL_MS = 500, 5000
DISK_WARN, DISK_FAIL = (0.10, 2 << 30), (0.03, 512 << 20)  # (free fraction, free bytes)
BACKLOG_WARN = 100_000
STREAM_FULL_WARN = 0.8


def _server_ms_binance(body) -> int:
    return int(body["serverTime"])


def _server_ms_okx(body) -> int:
    return int(body["data"][0]["ts"])


def _server_ms_deribit(body) -> int:
    return int(body["result"])


def _server_ms_bybit(body) -> int:
    nano = (body.get("result") or {}).get("timeNano")
    return int(nano) // 1_000_000 if nano else int(body["time"])


# Each venue's public server-time endpoint and where its answer keeps the time (milliseconds).
SERVER_TIME = {
    "binance_spot": ("/api/v3/time", _server_ms_binance),
    "binance_usdm": ("/fapi/v1/time", _server_ms_binance),
    "okx": ("/api/v5/public/time", _server_ms_okx),
    "deribit": ("/api/v2/public/get_time", _server_ms_deribit),
    "bybit_spot": ("/v5/market/time", _server_ms_bybit),
    "bybit_linear": ("/v5/market/time", _server_ms_bybit),
}


def finding(level: str, subject: str, detail: str, action: str = "") -> dict:
    return {"level": level, "subject": subject, "detail": detail, "action": action}


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per probe (default 3)")
    parser.add_argument("--offline", action="store_true", help="skip the exchange probes (reachability, clock)")


def main(args, settings) -> int:
    found = run_checks(settings, args.timeout, args.offline)
    if args.json:
        print(json.dumps({"ok": not any(f["level"] == "fail" for f in found), "findings": found}, indent=2))
    else:
        for f in found:
            print(f"{f['level'].upper():<5} {f['subject']}: {f['detail']}")
            if f["action"]:
                print(f"      -> {f['action']}")
        problems = sum(f["level"] == "fail" for f in found)
        warnings = sum(f["level"] == "warn" for f in found)
        print(f"diagnose: {problems} problem(s), {warnings} warning(s)" if problems or warnings
              else "diagnose: nothing wrong found")
    return 1 if any(f["level"] == "fail" for f in found) else 0


def run_checks(settings, timeout: float = 3.0, offline: bool = False) -> list[dict]:
    state = status.lock_state(settings.data_dir)
    inst = status.live_instance(settings)
    found = check_lock(state, settings, timeout)
    found += check_ports(settings, inst, timeout)
    found += asyncio.run(check_nats(settings, inst, timeout))
    found += check_clickhouse(settings, inst, timeout)
    found += check_disk(settings)
    found += check_roles(settings, timeout)
    if not offline:
        found += asyncio.run(check_clocks(settings, timeout))
    return found


# ---- instance lock ----------------------------------------------------------------------------------
def check_lock(state: dict, settings, timeout: float) -> list[dict]:
    path, holder, held_by = state["path"], state["holder"], state["held_by"]
    if state["stale"]:
        pid, port = holder.get("pid"), holder.get("port")
        why = "is gone" if not status.pid_alive(int(pid)) else "is alive but does not hold the lock (pid reused)"
        also = f"; `marketprism query` would still try its dead health port {port}" if port else ""
        return [finding("warn", "instance lock", f"stale lock {path}: pid {pid} {why}{also}",
                        f"harmless for `marketprism run`, which takes it over; to clear it now: rm {path}")]
    if held_by:
        port = holder.get("port")
        if port:
            host = status.client_host(settings.health_host)
            code, body, err = status.fetch_health(f"http://{host}:{port}/health", timeout)
            if body is None:
                return [finding("warn", "instance lock", f"{path} is held by pid {held_by}, but its health port "
                                f"{port} does not answer ({err})", f"look at pid {held_by}: hung? (kill -TERM drains it)")]
        return [finding("ok", "instance lock", f"{path} held by `marketprism run` pid {held_by}"
                        + (f", health port {port}" if port else " (starting)"))]
    return [finding("ok", "instance lock", f"no `run` holds {Path(path).parent}")]


# ---- ports ---------------------------------------------------------------------------------------------
def wanted_ports(settings) -> dict[int, tuple[str, str]]:
    """port -> (what uses it, the setting that moves it)."""
    ports: dict[int, tuple[str, str]] = {}
    if settings.health_port:
        ports[settings.health_port] = ("health of every role", "MARKETPRISM_HEALTH_PORT")
    else:
        for port in sorted(set(ROLE_HEALTH_PORTS.values())):
            roles = "/".join(r for r, p in ROLE_HEALTH_PORTS.items() if p == port)
            ports[port] = (f"health of {roles}", "MARKETPRISM_HEALTH_PORT")
    from marketprism.ops.health import COLLECTOR_METRICS_PORT
    ports.setdefault(settings.metrics_port or COLLECTOR_METRICS_PORT, ("metrics of run/collector",
                                                                       "MARKETPRISM_METRICS_PORT"))
    if not settings.nats_url:
        ports.setdefault(settings.embedded_nats_port, ("managed nats-server of run", "MARKETPRISM_EMBEDDED_NATS_PORT"))
    return ports


def check_ports(settings, inst: dict | None, timeout: float) -> list[dict]:
    out = []
    host = status.client_host(settings.health_host)
    for port, (use, knob) in wanted_ports(settings).items():
        subject = f"port {port} ({use})"
        taken, pid = status.port_holder(port)
        if not taken:
            out.append(finding("ok", subject, "free"))
            continue
        who = f"pid {pid} ({status.cmdline(pid)})" if pid else "a process this user cannot see"
        if knob == "MARKETPRISM_EMBEDDED_NATS_PORT":
            if pid and inst and status.parent_pid(pid) == inst["pid"]:
                out.append(finding("ok", subject, f"the managed nats-server of run pid {inst['pid']}"))
            elif pid and not inst and status.nats_store_dir(pid) == Path(settings.data_dir, "nats").resolve():
                out.append(finding("fail", subject, f"pid {pid} is a managed nats-server left behind by a `run` "
                                   "that died", f"stop it: kill {pid}; the next `marketprism run` starts its own"))
            else:
                out.append(finding("fail" if not inst else "warn", subject, f"taken by {who}",
                                   f"`marketprism run` cannot start its nats-server: stop that process, set {knob}, "
                                   f"or use that server with MARKETPRISM_NATS_URL=nats://127.0.0.1:{port}"))
            continue
        if knob == "MARKETPRISM_METRICS_PORT":
            ours = _serves_our_metrics(f"http://{host}:{port}/metrics", timeout)
            if ours:
                out.append(finding("ok", subject, f"marketprism metrics, {who}"))
            else:
                out.append(finding("fail" if settings.metrics_port else "warn", subject, f"taken by {who}",
                                   f"stop that process or set {knob}; without it /metrics stays on the health port"))
            continue
        code, body, _ = status.fetch_health(f"http://{host}:{port}/health", timeout)
        if body is not None and "status" in body:
            role = body.get("role") or "role"
            mine = not inst or body.get("pid") == inst["pid"]
            out.append(finding("ok" if mine else "warn", subject,
                               f"marketprism {role} pid {body.get('pid')} ({body['status']})",
                               "" if mine else f"another instance answers here: a second one needs its own {knob}"))
        else:
            out.append(finding("fail", subject, f"taken by {who}, not marketprism",
                               f"stop that process, or set {knob} to a free port"))
    return out


def _serves_our_metrics(url: str, timeout: float) -> bool:
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return b"marketprism_" in resp.read()
    except OSError:
        return False


# ---- NATS, ClickHouse, disk ----------------------------------------------------------------------------
async def check_nats(settings, inst: dict | None, timeout: float) -> list[dict]:
    url = status.nats_url(settings, inst)
    if not url:
        return [finding("ok", "nats", "managed by `marketprism run` (not running now)")]
    n = await status.nats_info(settings, url, timeout)
    if not n["up"]:
        return [finding("fail", "nats", f"{n['url']} unreachable: {n['error']}",
                        "start NATS (`docker compose up -d nats`, or `marketprism run` for the managed one); "
                        "check MARKETPRISM_NATS_URL and the credentials")]
    out = [finding("ok", "nats", f"{n['url']}: nats-server {n['version']}")]
    for err in n["errors"]:
        out.append(finding("fail", "nats", err, "create streams and consumers: `marketprism init --streams`"))
    for name, s in n["streams"].items():
        full = s["bytes"] / s["max_bytes"] if s.get("max_bytes", 0) > 0 else 0
        level = "warn" if full >= STREAM_FULL_WARN else "ok"
        out.append(finding(level, f"stream {name}", f"{s['messages']} messages, {s['bytes'] >> 20} MiB "
                           f"({full:.0%} of its limit), {s['consumers']} consumer(s)",
                           "the stream discards new messages when full: make storage-hot catch up" if level != "ok"
                           else ""))
    for name, c in n["consumers"].items():
        backlog = c["pending"] + c["ack_pending"]
        if backlog >= BACKLOG_WARN:
            level, action = "warn", ("storage-hot is behind: is it running (`marketprism health`)? "
                                     "are inserts failing (insert_errors)?")
        elif c["redelivered"]:
            level, action = "warn", "messages are being redelivered: look for failing inserts in storage-hot's log"
        else:
            level, action = "ok", ""
        out.append(finding(level, f"consumer {name}", f"backlog {backlog} (pending {c['pending']}, ack pending "
                           f"{c['ack_pending']}), redelivered {c['redelivered']}, {c['waiting_pulls']} waiting pulls",
                           action))
    return out


def check_clickhouse(settings, inst: dict | None, timeout: float) -> list[dict]:
    ch = status.clickhouse_info(settings, inst, timeout)
    url = settings.store_url
    if ch["up"]:
        if not int(ch.get("hot_tables") or 0):
            return [finding("fail", "clickhouse", f"{ch['url']}: no marketprism_hot tables",
                            "apply the schema: `marketprism init --schema`")]
        return [finding("ok", "clickhouse", f"{ch['url']}: ClickHouse {ch.get('version')}, "
                        f"{ch.get('hot_rows') or 0} hot rows, {ch.get('cold_rows') or 0} cold rows")]
    if url.startswith("chdb://") and not Path(url[len("chdb://"):]).exists():
        return [finding("warn", "clickhouse", f"{ch['url']}: {ch['error']}")]
    if ch.get("held_by"):
        pid = ch["held_by"]
        return [finding("fail", "clickhouse", f"{ch['url']} is open in pid {pid} ({status.cmdline(pid)})",
                        "chDB allows one process per directory: stop that process; a running `marketprism "
                        "run` is reached through its health port instead")]
    return [finding("fail", "clickhouse", f"{ch['url']}: {ch['error']}",
                    "check MARKETPRISM_CLICKHOUSE_URL, the credentials and that the server is up")]


def data_dirs(settings) -> list[str]:
    dirs = [settings.data_dir]
    if not settings.nats_url:
        dirs.append(str(Path(settings.data_dir, "nats")))
    if settings.store_url.startswith("chdb://"):
        dirs.append(settings.store_url[len("chdb://"):])
    if settings.record_dir:
        dirs.append(settings.record_dir)
    if settings.log_file:
        dirs.append(str(Path(settings.log_file).parent))
    return dirs


def check_disk(settings) -> list[dict]:
    out, seen = [], set()
    for d in data_dirs(settings):
        probe = Path(d).resolve()
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            dev = probe.stat().st_dev
            usage = shutil.disk_usage(probe)
        except OSError as e:
            out.append(finding("warn", f"disk {d}", f"cannot inspect: {e.strerror}"))
            continue
        if dev in seen:
            continue
        seen.add(dev)
        share = usage.free / usage.total if usage.total else 0
        level = ("fail" if share < DISK_FAIL[0] or usage.free < DISK_FAIL[1] else
                 "warn" if share < DISK_WARN[0] or usage.free < DISK_WARN[1] else "ok")
        out.append(finding(level, f"disk {d}", f"{usage.free / (1 << 30):.1f} GiB free ({share:.0%})",
                           "" if level == "ok" else "free space: lower MARKETPRISM_HOT_TTL_DAYS, archive to the cold "
                           "tier, or move MARKETPRISM_DATA_DIR to a larger disk"))
    return out


# ---- what the running roles report -------------------------------------------------------------------
def check_roles(settings, timeout: float) -> list[dict]:
    out, answered = [], 0
    for name, url in status.endpoints(settings):
        code, body, err = status.fetch_health(url, timeout)
        if body is None:
            out.append(finding("warn", name, f"not answering at {url} ({err})",
                               f"start it (`marketprism {name}` or `docker compose up -d`) if it should run here"))
            continue
        answered += 1
        level = {"healthy": "ok", "starting": "ok", "degraded": "warn"}.get(body.get("status"), "fail")
        out.append(finding(level, name, f"{body.get('status')} (pid {body.get('pid')})",
                           "" if level == "ok" else "details: `marketprism health`"))
        for sec in (v for v in body.values() if isinstance(v, dict)):
            for feed, reason in sec.get("blocked", {}).items():
                out.append(finding("warn", f"feed {feed}", f"blocked by the exchange: {reason}",
                                   "the venue refuses this location (HTTP 451/403): run the collector where the "
                                   "venue is permitted, or remove the feed from MARKETPRISM_FEEDS"))
            for key, c in sec.get("coverage", {}).items():
                if c.get("status") != "healthy":
                    out.append(finding("warn", f"stream {key}", f"no data for {status.age(c.get('age_s'))} "
                                       f"(stale after {status.age(c.get('stale_after_s'))})",
                                       "look for this feed in the collector log (reconnects, parse errors)"))
    if not answered and out:
        return [finding("warn", "roles", "no marketprism role is running",
                        "start `marketprism run`, or `docker compose up -d`")]
    return out


async def check_clocks(settings, timeout: float) -> list[dict]:
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        out = list(await asyncio.gather(*(clock_offset(session, settings, feed) for feed in settings.feeds)))
    if out and not any(f["subject"].startswith("clock") for f in out):
        out.append(finding("fail", "exchanges", "no exchange answered from here",
                           "the collector cannot collect: fix the network path, or point the feeds at "
                           "`marketprism simulate` (MARKETPRISM_<FEED>_REST_URL/_WS_URL); --offline skips this"))
    return out


async def clock_offset(session: aiohttp.ClientSession, settings, feed: str) -> dict:
    path, server_ms = SERVER_TIME[feed]
    url = settings.rest_url(feed) + path
    subject = f"clock vs {feed}"
    try:
        t0 = time.time() * 1000
        async with session.get(url) as resp:
            body = await resp.json(content_type=None)
            t1 = time.time() * 1000
            if resp.status in (403, 451):
                return finding("warn", feed, f"blocked by the exchange: HTTP {resp.status} on {path}",
                               "the venue refuses this location: collect from where it is permitted")
            if resp.status != 200:
                return finding("warn", subject, f"HTTP {resp.status} from {redact(url)}")
            offset = server_ms(body) - (t0 + t1) / 2
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return finding("warn", feed, f"unreachable: {redact(url)}: {e or type(e).__name__}",
                       "check the network path (DNS, proxy, firewall); the collector keeps retrying")
    except (KeyError, IndexError, TypeError, ValueError) as e:
        return finding("warn", subject, f"unexpected server-time answer from {redact(url)}: {e!r}")
    rtt = t1 - t0
    sure = abs(offset) - rtt / 2  # the server read its clock somewhere inside the round trip
    level = "fail" if sure > CLOCK_FAIL_MS else "warn" if sure > CLOCK_WARN_MS else "ok"
    return finding(level, subject, f"local clock {round(-offset):+d} ms against the exchange (round trip {rtt:.0f} ms)",
                   "" if level == "ok" else "sync the clock (chrony / systemd-timesyncd: `timedatectl status`); "
                   "latency figures and receipt times are off by this much")
