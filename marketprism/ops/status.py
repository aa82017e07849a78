"""`marketprism status` (one table: every role, NATS, ClickHouse) and `marketprism health` (every role's
health and the coverage table; exit 0 only when healthy). Also where things run: the instance lock of
the embedded `run`, the roles' health endpoints, which process listens on a port (from /proc)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from marketprism.bus.server import port_free
from marketprism.ops.lock import InstanceLock
from marketprism.settings import ROLE_HEALTH_PORTS, redact

ROLES = ("collector", "storage-hot", "storage-cold")
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per probe (default 3)")
    parser.add_argument("--role", action="append", choices=("run", *ROLES),
                        help="only this role (repeatable); default: the running `run`, else every role")


def main(args, settings) -> int:
    if args.command == "health":
        return health_command(args, settings)
    return status_command(args, settings)


# ---- where things run ------------------------------------------------------------------------------
def flock_holder(path: Path) -> int | None:
    """pid holding a flock on path, None if nobody does. Read from /proc/locks, so the lock itself is never
    touched (probing it could make a `run` starting at that moment fail); OSError when that is unreadable."""
    st = path.stat()
    table = Path("/proc/locks").read_text()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev:
            return int(fields[4])
    return None


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def lock_state(data_dir: str) -> dict:
    """The embedded instance lock: who it names, whether a live process holds it, whether it is stale."""
    lock = InstanceLock(Path(data_dir))
    state = {"path": str(lock.path), "exists": lock.path.exists(), "holder": lock.holder(), "held_by": None}
    if state["exists"]:
        try:
            state["held_by"] = flock_holder(lock.path)
        except OSError:  # no /proc/locks: trust a live pid
            pid = state["holder"].get("pid")
            state["held_by"] = pid if isinstance(pid, int) and pid_alive(pid) else None
    state["stale"] = bool(state["holder"].get("pid")) and state["held_by"] is None
    return state


def listening_inodes(port: int) -> set[int] | None:
    """Inodes of sockets listening on port (any address), None when /proc/net is not readable."""
    found, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(f[9]))
    return found if readable else None


def socket_owner(inodes: set[int]) -> int | None:
    targets = {f"socket:[{i}]" for i in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(proc.name)
        except OSError:  # gone, or another user's process
            continue
    return None


def cmdline(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
    text = " ".join(text.split())
    return text[:120] + ("..." if len(text) > 120 else "")


def nats_store_dir(pid: int) -> Path | None:
    """The -sd directory of a nats-server process (relative ones resolved against its working directory)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        store = Path(args[args.index("-sd") + 1])
        return (store if store.is_absolute() else Path(os.readlink(f"/proc/{pid}/cwd")) / store).resolve()
    except (OSError, ValueError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def port_holder(port: int) -> tuple[bool, int | None]:
    """(taken, pid or None when unknown)."""
    inodes = listening_inodes(port)
    if inodes is None:
        return not port_free(port), None
    return bool(inodes), socket_owner(inodes) if inodes else None


def live_instance(settings) -> dict | None:
    """{"pid", "port"} of the embedded `run` holding this data dir, None when none is running."""
    state = lock_state(settings.data_dir)
    port = state["holder"].get("port")
    return {"pid": state["held_by"], "port": port} if state["held_by"] and port else None


def client_host(host: str) -> str:
    host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def endpoints(settings, only: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, health url) of what should be running: the embedded run if one holds the data dir, else the
    roles. Roles sharing one port (MARKETPRISM_HEALTH_PORT set for all) are one endpoint."""
    host = client_host(settings.health_host)
    inst = live_instance(settings)
    if inst and (not only or "run" in only):
        return [("run", f"http://{host}:{inst['port']}/health")]
    names = only or ROLES
    by_port: dict[int, str] = {}
    for name in names:
        by_port.setdefault(settings.health_port or ROLE_HEALTH_PORTS[name], name)
    return [(name, f"http://{host}:{port}/health") for port, name in by_port.items()]


def fetch_health(url: str, timeout: float) -> tuple[int, dict | None, str]:
    """(HTTP status, body, error): 503 still carries a body; 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), ""
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read()), ""
        except ValueError:
            return e.code, None, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return 0, None, str(getattr(e, "reason", e))


async def nats_info(settings, url: str, timeout: float) -> dict:
    import nats

    from marketprism.bus import streams
    opts = dict(name="marketprism-status", connect_timeout=timeout, allow_reconnect=False, max_reconnect_attempts=0)
    opts.update(streams.client_options(settings))
    try:
        nc = await asyncio.wait_for(nats.connect(url, **opts), timeout * 2)
        await streams.require_tls(nc, url, opts.get("tls"))
    except Exception as e:  # noqa: BLE001 - nats-py raises many types for "not reachable"
        return {"up": False, "url": redact(url), "error": str(e) or type(e).__name__}
    out = {"up": True, "url": redact(url), "version": nc._server_info.get("version", "?"), "streams": {},
           "consumers": {}, "errors": []}
    js = nc.jetstream(timeout=timeout)
    try:
        for cfg in streams.stream_configs():
            try:
                s = await js.stream_info(cfg.name)
                out["streams"][cfg.name] = {"messages": s.state.messages, "bytes": s.state.bytes,
                                            "max_bytes": s.config.max_bytes, "consumers": s.state.consumer_count}
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"stream {cfg.name}: {e or type(e).__name__}")
        for stream, cfg in streams.consumer_configs():
            try:
                c = await js.consumer_info(stream, cfg.durable_name)
                out["consumers"][f"{stream}/{cfg.durable_name}"] = {
                    "pending": c.num_pending or 0, "ack_pending": c.num_ack_pending or 0,
                    "redelivered": c.num_redelivered or 0, "waiting_pulls": c.num_waiting or 0}
            except Exception as e:  # noqa: BLE001
                out["errors"].append(f"consumer {stream}/{cfg.durable_name}: {e or type(e).__name__}")
    finally:
        await nc.close()
    return out


def nats_url(settings, inst: dict | None) -> str | None:
    if settings.nats_url:
        return settings.nats_url
    return f"nats://127.0.0.1:{settings.embedded_nats_port}" if inst else None


CLICKHOUSE_SQL = ("SELECT version() AS version, uptime() AS uptime_s, "
                  "(SELECT count() FROM system.tables WHERE database = 'marketprism_hot') AS hot_tables, "
                  "(SELECT sum(rows) FROM system.parts WHERE active AND database = 'marketprism_hot') AS hot_rows, "
                  "(SELECT sum(rows) FROM system.parts WHERE active AND database = 'marketprism_cold') AS cold_rows, "
                  "(SELECT sum(bytes_on_disk) FROM system.parts WHERE active AND database LIKE 'marketprism%') "
                  "AS bytes_on_disk")


def clickhouse_info(settings, inst: dict | None, timeout: float, sql: str = CLICKHOUSE_SQL) -> dict:
    """One row of `sql` as a dict, through the running `run` when it holds chDB, else directly (read-only)."""
    url = settings.store_url
    out: dict = {"url": redact(url)}
    try:
        if inst and url.startswith("chdb://"):
            host = client_host(settings.health_host)
            req = urllib.request.Request(f"http://{host}:{inst['port']}/query", data=sql.encode(), method="POST")
            with urllib.request.urlopen(req, timeout=max(timeout, 10)) as resp:
                lines = resp.read().decode().splitlines()
            row = dict(zip(lines[0].split("\t"), lines[1].split("\t"))) if len(lines) > 1 else {}
        else:
            if url.startswith("chdb://"):
                path = Path(url[len("chdb://"):])
                if not path.exists():
                    return {**out, "up": False, "error": "no store yet (`marketprism init --schema` or `run` creates it)"}
                try:
                    holder = flock_holder(path / "status") if (path / "status").exists() else None
                except OSError:
                    holder = None
                if holder:  # chDB allows one process per directory: opening it here would only fail
                    return {**out, "up": False, "held_by": holder, "error": f"the directory is open in pid {holder}"}
            from marketprism.store.client import Store, connect
            store = Store(connect(url, readonly=True, settings=settings))
            try:
                res = store.query(sql)
                row = dict(zip(res.column_names, res.result_rows[0]))
            finally:
                store.close()
    except urllib.error.HTTPError as e:
        return {**out, "up": False, "error": e.read().decode(errors="replace").strip()[:300]}
    except Exception as e:  # noqa: BLE001 - unreachable, refused, held by another process: one line
        return {**out, "up": False, "error": (str(getattr(e, "reason", "")) or str(e)).strip().splitlines()[0][:300]}
    return {**out, "up": True, **row}


# ---- rendering -----------------------------------------------------------------------------------------
def age(seconds) -> str:
    if seconds is None or seconds == "":
        return "-"
    s = int(float(seconds))
    if s < 60:
        return f"{float(seconds):.1f}s" if float(seconds) < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def section_summary(name: str, sec: dict) -> str:
    if "coverage" in sec:
        cov = sec["coverage"].values()
        fresh = sum(1 for c in cov if c.get("status") == "healthy")
        parts = [f"streams {fresh}/{len(cov)} fresh", f"{sec.get('connections', 0)} connections",
                 f"{sec.get('published_acked', 0)} published", f"{sec.get('publish_pending', 0)} unacked"]
        if sec.get("blocked"):
            parts.append("blocked: " + ", ".join(sec["blocked"]))
        return ", ".join(parts)
    if "inserted" in sec:
        backlog = sum(c.get("pending", 0) + c.get("ack_pending", 0) for c in sec.get("consumers", {}).values())
        last = [now_age(ts) for ts in sec.get("last_insert", {}).values()]
        return (f"{sec['inserted']} inserted, backlog {backlog}, {sec.get('insert_errors_per_min', 0)} errors/min, "
                f"last insert {age(min(last)) if last else '-'} ago")
    scalars = [f"{k} {v}" for k, v in sec.items() if k != "status" and isinstance(v, (int, float, str, bool))]
    return ", ".join(scalars[:6])


def now_age(ts: float) -> float:
    return max(0.0, time.time() - ts)


def _sections(body: dict) -> dict[str, dict]:
    return {k: v for k, v in body.items() if isinstance(v, dict)}


def status_command(args, settings) -> int:
    inst = live_instance(settings)
    rows, ok = [], True
    for name, url in endpoints(settings, args.role):
        code, body, err = fetch_health(url, args.timeout)
        if body is None:
            ok = False
            rows.append({"component": name, "state": "down", "version": "", "uptime": "", "details": f"{url}: {err}"})
            continue
        pid = f"pid {body.get('pid')}, " if body.get("pid") else ""
        rows.append({"component": name, "state": body.get("status", "?"), "version": body.get("version", ""),
                     "uptime": age(body.get("uptime_s")), "details": f"{pid}{url}"})
        for sec_name, sec in _sections(body).items():
            rows.append({"component": f"  {sec_name}", "state": sec.get("status", "?"), "version": "", "uptime": "",
                         "details": section_summary(sec_name, sec)})
    url = nats_url(settings, inst)
    if url:
        n = asyncio.run(nats_info(settings, url, args.timeout))
        ok &= n["up"]
        details = n["url"] if not n["up"] else n["url"] + "".join(
            f", {s} {v['messages']} msgs {v['bytes'] // 1024} KiB" for s, v in n["streams"].items())
        rows.append({"component": "nats", "state": "up" if n["up"] else "down", "version": n.get("version", ""),
                     "uptime": "", "details": details if n["up"] else f"{details}: {n['error']}"})
    else:
        rows.append({"component": "nats", "state": "-", "version": "", "uptime": "",
                     "details": "no MARKETPRISM_NATS_URL and no `run` holding the data dir"})
    ch = clickhouse_info(settings, inst, args.timeout)
    ok &= ch["up"]
    details = (f"{ch['url']}, hot rows {ch.get('hot_rows') or 0}, cold rows {ch.get('cold_rows') or 0}"
               if ch["up"] else f"{ch['url']}: {ch['error']}")
    rows.append({"component": "clickhouse", "state": "up" if ch["up"] else "down", "version": ch.get("version", ""),
                 "uptime": age(ch.get("uptime_s")) if ch["up"] else "", "details": details})
    if args.json:
        print(json.dumps({"ok": ok, "components": rows}, indent=2))
    else:
        head = ["COMPONENT", "STATE", "VERSION", "UPTIME", "DETAILS"]
        print(table([head] + [[r["component"], r["state"], r["version"], r["uptime"], r["details"]] for r in rows]))
    return 0 if ok else 1


def coverage_rows(sec: dict) -> list[list[str]]:
    rows = [["DATA TYPE", "EXCHANGE", "MARKET", "AGE", "STALE AFTER", "STATUS"]]
    for key, c in sec.get("coverage", {}).items():
        dt, ex, mt = (key.split("/") + ["", ""])[:3]
        rows.append([dt, ex, mt, age(c.get("age_s")), age(c.get("stale_after_s")), c.get("status", "?")])
    return rows


def print_health(name: str, url: str, code: int, body: dict | None, err: str) -> None:
    if body is None:
        print(f"{name}: DOWN ({url}: {err})")
        return
    grace = body.get("collector", {}).get("grace_remaining_s")
    extra = f", grace {age(grace)} left" if body.get("status") == "starting" and grace else ""
    print(f"{name}: {body.get('status')} (HTTP {code}, pid {body.get('pid')}, up {age(body.get('uptime_s'))}{extra})")
    for sec_name, sec in _sections(body).items():
        print(f"  {sec_name}: {sec.get('status', '?')} - {section_summary(sec_name, sec)}")
        if sec.get("coverage"):
            print("\n".join("    " + line for line in table(coverage_rows(sec)).splitlines()))
        for feed, reason in sec.get("blocked", {}).items():
            print(f"    blocked: {feed} - {reason}")
        for consumer, c in sec.get("consumers", {}).items():
            print(f"    consumer {consumer}: pending {c['pending']}, ack pending {c['ack_pending']}, "
                  f"redelivered {c['redelivered']}")
        for table_name, ts in sec.get("last_insert", {}).items():
            print(f"    last insert {table_name}: {age(now_age(ts))} ago")


def health_command(args, settings) -> int:
    results = {}
    for name, url in endpoints(settings, args.role):
        code, body, err = fetch_health(url, args.timeout)
        results[name] = {"url": url, "http_status": code, "body": body, "error": err}
    healthy = all(r["body"] is not None and r["body"].get("status") == "healthy" for r in results.values())
    if args.json:
        print(json.dumps({"healthy": healthy, "endpoints": results}, indent=2))
    else:
        for name, r in results.items():
            print_health(name, r["url"], r["http_status"], r["body"], r["error"])
        if not healthy:
            print("not healthy: exit 1", file=sys.stderr)
    return 0 if healthy else 1
