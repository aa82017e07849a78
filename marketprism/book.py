"""An L2 order book that keeps the exchange's own price and quantity strings.

Levels are ordered by float price for ordering only; the strings the exchange sent are what is emitted,
so no value is ever rounded on its way to the store. Those strings must be plain non-negative decimals
(digits and points): float() alone would let `1e5`, `nan`, ` 1` or `1_0` into the book, and from there
into every record of it until the level changes.

Each side is two parallel Python lists sorted so that the best level is the *last* element: the top N
levels are then one slice (a few microseconds for 400 levels, where a sorted mapping walks N keys and
looks each one up), and the frequent changes near the touch move only the few elements behind them. The
key list ends with +inf, past every real key, so that a lookup never needs a bounds check. The level
tuples the caller passes in are the ones stored and emitted (no copy per level).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import chain

from marketprism.records import Level

_END = float("inf")  # the last key of each side: greater than every price key

def _plain(rows) -> bool:
    """Every field of these rows is digits and points: one scan over the whole side, not one per string."""
    text = "".join(chain.from_iterable(rows)).replace(".", "")
    return not text or (text.isascii() and text.isdigit())


def _apply(keys: list[float], levels: list[Level], rows, sign: float) -> None:
    """Absolute levels onto one side: quantity zero removes the level. key = sign * price, ascending, and
    keys[-1] is the +inf sentinel (so keys[i] always exists)."""
    for row in rows:
        price, qty = row
        key = sign * float(price)
        i = bisect_left(keys, key)
        if float(qty):
            if keys[i] == key:
                levels[i] = row
            else:
                keys.insert(i, key)
                levels.insert(i, row)
        elif keys[i] == key:
            del keys[i], levels[i]


class Book:
    __slots__ = ("_bid_keys", "_bids", "_ask_keys", "_asks")

    def __init__(self) -> None:
        # bids ascend by price (best = highest = last); asks ascend by -price (best = lowest = last)
        self._bid_keys: list[float] = [_END]
        self._bids: list[Level] = []
        self._ask_keys: list[float] = [_END]
        self._asks: list[Level] = []

    def clear(self) -> None:
        self._bid_keys[:] = [_END]
        self._bids.clear()
        self._ask_keys[:] = [_END]
        self._asks.clear()

    def load(self, bids, asks) -> None:
        self.clear()
        self.update(bids, asks)

    def update(self, bids: list[Level], asks: list[Level], plain: bool = False) -> None:
        """Apply absolute levels, (price, quantity) tuples: quantity zero removes the level. A string that
        is not made of digits and points raises ValueError before anything is applied; plain=True says the
        caller has established that (binance.py scans the raw JSON bytes instead, which is cheaper). Any
        other refusal (`1.2.3`, a price beyond float range) raises ValueError part way: the caller must then
        reset the book, as every feed does (an `invalid` gap and a new snapshot)."""
        if not (plain or (_plain(bids) and _plain(asks))):
            raise ValueError("a book level that is not a plain decimal")
        try:
            if bids:
                _apply(self._bid_keys, self._bids, bids, 1.0)
            if asks:
                _apply(self._ask_keys, self._asks, asks, -1.0)
        except IndexError:  # a price float() takes to inf met the sentinel
            raise ValueError("a book price out of range") from None

    def top(self, depth: int) -> tuple[list[Level], list[Level]]:
        """The best `depth` levels per side, best first."""
        if depth <= 0:
            return [], []
        bids, asks = self._bids[-depth:], self._asks[-depth:]  # a forward slice and an in-place reverse are
        bids.reverse()  # cheaper than one slice with step -1
        asks.reverse()
        return bids, asks

    def crossed(self) -> bool:
        return bool(self._bids and self._asks) and self._bid_keys[-2] >= -self._ask_keys[-2]

    def __len__(self) -> int:
        return len(self._bids) + len(self._asks)


class SyncedBook:
    """One instrument's book as a feed keeps it in sync: live from a snapshot until the venue's sequence
    breaks, then dark (emitting nothing) until a new snapshot, with one resubscribe asked per break."""
    __slots__ = ("book", "live", "sequence", "last_time", "resubscribing")

    def __init__(self) -> None:
        self.book = Book()
        self.live = False
        self.sequence = 0  # the venue's sequence of the last applied message
        self.last_time = 0  # its exchange time (ms)
        self.resubscribing = False

    def reset(self) -> None:
        self.book.clear()
        self.live = False
