"""`marketprism` command line: one entry point, one sub-command per role or task."""

from __future__ import annotations

import argparse
import asyncio
import sys
import urllib.error
import urllib.request
from importlib import import_module

from marketprism import settings as settings_mod
from marketprism.settings import FEEDS, ConfigError
from marketprism.ops.args import positive_int

ROLES = ("collector", "storage-hot", "storage-cold")
# Sub-commands that live in their own module: module.add_arguments(parser) and module.main(args, settings) -> int.
COMMANDS = {
    "storage-cold": ("marketprism.store.cold", "the storage-cold role: archive closed hot windows into cold, verified"),
    "integrity": ("marketprism.ops.integrity", "is the data whole? coverage, duplicates, gaps, schema; exit 0 only if so"),
    "repair": ("marketprism.ops.repair", "re-copy failed cold windows and backfill gaps from exchange history"),
    "record": ("marketprism.record", "run the collector and write the raw traffic it receives"),
    "status": ("marketprism.ops.status", "one table: every role, NATS, ClickHouse: up/down, version, key numbers"),
    "health": ("marketprism.ops.status", "every role's health and coverage; exit 0 only when healthy"),
    "diagnose": ("marketprism.ops.diagnose", "what is wrong and what to do about it"),
    "bench": ("marketprism.bench", "measure parse and end-to-end throughput, latency, memory"),
    "demo": ("marketprism.demo", "simulator + embedded pipeline: row counts per table x exchange"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")



def build() -> argparse.ArgumentParser:
    p = Parser(prog="marketprism", description="Crypto market data: exchanges -> NATS JetStream -> ClickHouse")
    p.add_argument("--config", help="YAML settings file (also MARKETPRISM_CONFIG)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    sub.add_parser("run", help="all roles in one process (managed nats-server, chDB)")
    for role in ("collector", "storage-hot"):
        r = sub.add_parser(role, help=f"the {role} role")
        r.add_argument("--check", action="store_true", help="exit 0 if this role's /health says it is up")
    i = sub.add_parser("init", help="create/update NATS streams and the ClickHouse schema (idempotent)")
    i.add_argument("--streams", action="store_true", help="only the NATS streams and consumers")
    i.add_argument("--schema", action="store_true", help="only the ClickHouse schema")
    r = sub.add_parser("replay", help="raw recordings -> normalized JSON Lines on stdout")
    r.add_argument("--exchange", required=True, choices=FEEDS, metavar="FEED", help=f"one of {', '.join(FEEDS)}")
    r.add_argument("--depth", type=positive_int, default=400, help="order book levels per side (default 400)")
    r.add_argument("--publish", action="store_true",
                   help="publish the records to JetStream (MARKETPRISM_NATS_URL) instead of printing them")
    r.add_argument("files", nargs="+", metavar="FILE")
    q = sub.add_parser("query", help="run a read-only SQL query against the store")
    q.add_argument("sql")
    from marketprism import sim
    sim.add_arguments(sub.add_parser("simulate", help="local exchange simulator speaking each venue's protocol"))
    for name, (module, text) in COMMANDS.items():
        try:
            mod = import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not part of this build
        c = sub.add_parser(name, help=text)
        if name in ROLES:
            c.add_argument("--check", action="store_true", help="exit 0 if this role's /health says it is up")
        mod.add_arguments(c)
    return p


def _setup_logging(level: str, log_file: str = "", rotation_mb: int = 50) -> None:
    from marketprism.ops import logs
    logs.setup(level, log_file, rotation_mb)


def _check(settings, role: str) -> int:
    """Docker healthcheck: 0 while the role's /health answers 200 (healthy, starting or degraded)."""
    from marketprism.ops.status import client_host
    url = f"http://{client_host(settings.health_host)}:{settings.port_for(role)}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # within compose's 5 s healthcheck timeout
            return 0 if resp.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(f"marketprism: {role} is unhealthy: {url} answered HTTP {e.code}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"marketprism: {role} health at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1


def _query(settings, sql: str) -> int:

    from marketprism.ops.status import live_instance
    from marketprism.store.client import Store, connect
    # only a live holder (not a lock left by a dead process) can answer for the chDB directory
    holder = (live_instance(settings) or {}) if settings.store_url.startswith("chdb://") else {}
    if holder.get("port"):  # the embedded run holds chDB: ask it
        req = urllib.request.Request(f"http://127.0.0.1:{holder['port']}/query", data=sql.encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                sys.stdout.buffer.write(resp.read())
                return 0
        except urllib.error.HTTPError as e:
            print(f"marketprism: query failed: {e.read().decode().strip()}", file=sys.stderr)
            return 1
    store = Store(connect(settings.store_url, readonly=True, settings=settings))
    try:
        sys.stdout.buffer.write(store.raw_query(sql))
    except Exception as e:  # noqa: BLE001 - one line for the operator
        print(f"marketprism: query failed: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def dispatch(args, settings) -> int:
    from marketprism.ops import roles
    cmd = args.command
    if cmd == "replay":
        from marketprism import replay
        return replay.main(args, settings)
    if cmd == "query":
        return _query(settings, args.sql)
    long_running = cmd in ("run", "record", *ROLES)  # only they write the log file: one writer rotates it
    _setup_logging(settings.log_level, settings.log_file if long_running else "", settings.log_rotation_mb)
    if cmd in ROLES and args.check:
        return _check(settings, cmd)
    if cmd == "init":
        both = not (args.streams or args.schema)
        for line in asyncio.run(roles.init(settings, both or args.streams, both or args.schema)):
            print(line)
        return 0
    if cmd in COMMANDS:
        return import_module(COMMANDS[cmd][0]).main(args, settings)
    if cmd == "simulate":
        from marketprism import sim
        asyncio.run(sim.serve(args))
        return 0
    runner = {"run": roles.run_embedded, "collector": roles.run_collector, "storage-hot": roles.run_storage_hot}[cmd]
    asyncio.run(runner(settings))
    return 0


def _setting_of(settings, e: Exception) -> str:
    """The setting an error is about, so its one line can name it ("" when not known)."""
    from pathlib import Path

    from marketprism.store.client import StoreError
    if settings is None:
        return ""
    if isinstance(e, StoreError):
        for key in ("clickhouse_url", "cold_clickhouse_url"):
            if getattr(settings, key) and e.url == getattr(settings, key):
                return key
        return "data_dir" if e.url and e.url == settings.store_url else ""  # the default chdb://<data_dir>/...
    if isinstance(e, OSError) and e.filename:  # a directory or file the settings name, e.g. data_dir unwritable
        path = Path(str(e.filename)).resolve()
        named = {key: Path(getattr(settings, key)).resolve() for key in ("log_file", "record_dir", "data_dir")
                 if getattr(settings, key)}
        for related in (lambda v: path == v,  # the setting's own file or directory
                        lambda v: path in v.parents,  # a directory on the way to it that cannot be created
                        lambda v: v in path.parents):  # something inside it, e.g. the instance lock
            for key, value in named.items():
                if related(value):
                    return key
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build().parse_args(argv)
    settings = None
    try:
        settings = settings_mod.load(args.config)
        return dispatch(args, settings)
    except ConfigError as e:
        print(f"marketprism: configuration error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        key = _setting_of(settings, e)
        print(f"marketprism: {key + ': ' if key else ''}{e.filename or e}: {e.strerror or 'not found'}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - roles raise one-line errors; never a traceback for the operator
        from marketprism.ops.lock import LockedError
        from marketprism.store.client import StoreError
        if isinstance(e, (StoreError, LockedError, ConnectionError, OSError, ValueError)):
            key = _setting_of(settings, e)
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"marketprism: {key + ': ' if key and not text.startswith(key + ':') else ''}{text}", file=sys.stderr)
            return 1
        raise
