"""Continuity beyond one connection: restart gaps from the saved stream state, and backpressure gaps for
records dropped while the bus backlog is at its bound."""

from __future__ import annotations

from conftest import fixture_lines
from marketprism.collector.service import Collector
from marketprism.exchanges.binance import BinanceSpotFeed
from marketprism.records import Gap, Trade, decode
from marketprism.replay import replay
from marketprism.settings import load

TRADES = list(replay(BinanceSpotFeed(), fixture_lines("binance_spot/trade_ws_BTCUSDT_2024-08-08_hftbacktest.jsonl"),
                     received_at=5))


def collector(tmp_path, room, unacked=None):
    """A collector whose publishes the bus acknowledges at once, except those whose trade id is in
    `unacked` (they stay waiting, as with NATS down)."""
    sent, waiting = [], []

    async def publish(subject, payload, msg_id, token):
        rec = decode(payload)
        sent.append(rec)
        if unacked and getattr(rec, "trade_id", None) in unacked:
            waiting.append(token)
        else:
            c.state.acked(token)

    c = Collector(load(environ={"MARKETPRISM_FEEDS": "binance_spot"}), publish, has_room=lambda: room[0],
                  state_path=tmp_path / "collector-state.json")
    c.state.unacked = lambda: waiting
    return c, sent


async def saved_after(tmp_path, trades, unacked=None) -> None:
    """A collector that emitted `trades` and saved its stream state."""
    c, _ = collector(tmp_path, [True], unacked)
    await c.emit(c.feeds["binance_spot"], trades)
    c.state.save()


async def test_full_backlog_drops_into_one_gap_per_stream(tmp_path):
    room = [True]
    c, sent = collector(tmp_path, room)
    feed = c.feeds["binance_spot"]
    await c.emit(feed, TRADES[:10])
    room[0] = False
    await c.emit(feed, TRADES[10:40])  # dropped: nothing published, nothing lost silently
    assert len(sent) == 10 and c.overflow.total == 30
    room[0] = True
    await c.emit(feed, TRADES[40:])
    gaps = [r for r in sent if isinstance(r, Gap)]
    assert len(gaps) == 1
    g = gaps[0]
    assert (g.stream_type, g.reason, g.from_sequence, g.to_sequence) == (
        "trade", "backpressure", int(TRADES[10].trade_id), int(TRADES[39].trade_id))
    assert (g.started_at, g.ended_at) == (TRADES[10].timestamp, TRADES[39].timestamp)
    assert [r.trade_id for r in sent if isinstance(r, Trade)] == [t.trade_id for t in TRADES[:10] + TRADES[40:]]


async def test_restart_gap_from_the_saved_state(tmp_path):
    await saved_after(tmp_path, TRADES[:50])
    again, _ = collector(tmp_path, [True])
    gaps = again.state.restart_gaps(now_ms=TRADES[49].timestamp + 60_000)
    assert len(gaps) == 1
    g = gaps[0]
    assert (g.exchange, g.market_type, g.symbol, g.instrument, g.stream_type, g.reason) == (
        "binance", "spot", "BTC-USDT", "BTCUSDT", "trade", "restart")
    assert (g.from_sequence, g.to_sequence) == (int(TRADES[49].trade_id) + 1, None)
    assert (g.started_at, g.ended_at) == (TRADES[49].timestamp, TRADES[49].timestamp + 60_000)


async def test_restart_gap_starts_at_the_oldest_unacknowledged_record(tmp_path):
    """A kill loses what the bus has not acknowledged: the hole starts there, not after the last publish."""
    await saved_after(tmp_path, TRADES[:50], unacked={t.trade_id for t in TRADES[30:50]})
    gaps = collector(tmp_path, [True])[0].state.restart_gaps(now_ms=TRADES[49].timestamp + 60_000)
    assert [(g.reason, g.from_sequence, g.started_at) for g in gaps] == [
        ("restart", int(TRADES[30].trade_id), TRADES[30].timestamp)]


async def test_unacknowledged_gap_keeps_its_start_for_the_next_restart(tmp_path):
    """Restart gaps not acknowledged before another kill: the next restart's gap covers both outages."""
    await saved_after(tmp_path, TRADES[:50])
    again, _ = collector(tmp_path, [True])
    gaps = again.state.restart_gaps(now_ms=TRADES[49].timestamp + 60_000)
    waiting = [again.state.gap_token(g) for g in gaps]  # published, never acknowledged
    again.state.unacked = lambda: waiting
    again.state.save()
    third = collector(tmp_path, [True])[0].state.restart_gaps(now_ms=TRADES[49].timestamp + 120_000)
    assert [(g.from_sequence, g.started_at, g.ended_at) for g in third] == [
        (int(TRADES[49].trade_id) + 1, TRADES[49].timestamp, TRADES[49].timestamp + 120_000)]


def test_no_state_file_means_no_restart_gap(tmp_path):
    from marketprism.collector.continuity import StreamState
    assert StreamState(tmp_path / "none.json").restart_gaps(1) == []
    (tmp_path / "bad.json").write_text("{not json")
    assert StreamState(tmp_path / "bad.json").restart_gaps(1) == []
