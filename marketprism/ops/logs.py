"""Logging: one line per event, bound context (feed, exchange, symbol, data_type ...) as key=value pairs,
to stderr and, when log_file is set, to a file rotated by size.

Context comes from loguru's own binding, e.g. `logger.bind(exchange="okx", symbol="BTC-USDT").warning(...)`
or `with logger.contextualize(feed=name):` around a connection loop (it follows the asyncio task).
"""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

CONTEXT_FIRST = ("role", "feed", "exchange", "market_type", "symbol", "data_type", "stream", "table")
ROTATED_FILES_KEPT = 5
_PREFIX = "_mp_"  # keys this module adds to a record while formatting it


def _value(v) -> str:
    text = str(v)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def _context(extra: dict) -> str:
    keys = [k for k in CONTEXT_FIRST if k in extra] + sorted(k for k in extra
                                                             if k not in CONTEXT_FIRST and not k.startswith(_PREFIX))
    return "".join(f" {k}={_value(extra[k])}" for k in keys)


def line_format(tracebacks: bool):
    """A loguru format function: message and context on one line; the traceback only when asked for."""
    def fmt(record) -> str:
        extra = record["extra"]
        extra[_PREFIX + "msg"] = record["message"].replace("\n", "\\n")
        extra[_PREFIX + "ctx"] = _context(extra)
        exc = record["exception"]
        extra[_PREFIX + "exc"] = (f" error={_value(f'{exc.type.__name__}: {exc.value}')}"
                                  if exc is not None and exc.type is not None else "")
        tail = "\n{exception}" if tracebacks and exc is not None else ""
        return ("{time:YYYY-MM-DDTHH:mm:ss.SSS!UTC}Z {level: <7} {name}: "
                f"{{extra[{_PREFIX}msg]}}{{extra[{_PREFIX}ctx]}}{{extra[{_PREFIX}exc]}}\n{tail}")
    return fmt


def setup(level: str = "INFO", log_file: str = "", rotation_mb: int = 50) -> None:
    """Replace loguru's default sink. Tracebacks are written only at DEBUG/TRACE: one line per event else."""
    level = level.upper()
    fmt = line_format(tracebacks=level in ("TRACE", "DEBUG"))
    logger.remove()
    logger.add(sys.stderr, level=level, format=fmt, backtrace=False, diagnose=False)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level=level, format=fmt, backtrace=False, diagnose=False, encoding="utf-8",
                   rotation=f"{rotation_mb} MB", retention=ROTATED_FILES_KEPT)
