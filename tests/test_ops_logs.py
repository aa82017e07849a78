"""Logs: one line per event with the bound context as key=value, the level from settings, size rotation."""

from __future__ import annotations

import sys

import pytest
from loguru import logger

from marketprism.ops import logs


@pytest.fixture
def restore_logger():
    yield
    logger.remove()
    logger.add(sys.stderr)


def test_one_line_per_event_with_context(tmp_path, restore_logger):
    path = tmp_path / "log" / "mp.log"
    logs.setup("info", str(path), 50)
    logger.debug("not at INFO")
    logger.bind(exchange="okx", symbol="BTC-USDT", data_type="trade", feed="okx").warning("gap {}\nnext", "sequence")
    try:
        raise ValueError("bad frame")
    except ValueError:
        logger.exception("parse failed")
    with logger.contextualize(feed="deribit"):
        logger.info('reason "quoted" {braces}')
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(" WARNING test_ops_logs: gap sequence\\nnext feed=okx exchange=okx symbol=BTC-USDT "
                             "data_type=trade")
    assert lines[0][:24].endswith("Z") and lines[0][10] == "T"
    assert lines[1].endswith(' ERROR   test_ops_logs: parse failed error="ValueError: bad frame"')
    assert lines[2].endswith(' INFO    test_ops_logs: reason "quoted" {braces} feed=deribit')


def test_the_file_rotates_by_size(tmp_path, restore_logger):
    path = tmp_path / "mp.log"
    logs.setup("INFO", str(path), 1)
    for i in range(1500):
        logger.info("{} {}", i, "x" * 1000)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) >= 2 and "mp.log" in files
    assert all(p.stat().st_size <= 1_100_000 for p in tmp_path.iterdir())
