"""An L2 order book that keeps the exchange's own price and quantity strings.

Levels are ordered by float price for ordering only; the strings the exchange sent are what is emitted,
so no value is ever rounded on its way to the store. Those strings must be plain non-negative decimals
(digits and points): float() alone would let `1e5`, `nan`, ` 1` or `1_0` into the book, and from there
into every record of it until the level changes.

Each side is two parallel Python lists sorted so that the best level is the *last* element: the top N
levels are then one slice (a few microseconds for 400 levels, where a sorted mapping walks N keys and
looks each one up), and the frequent changes near the touch move only the few elements behind them.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import chain

from marketprism.records import Level


def _plain(rows) -> bool:
    """Every field of these rows is digits and points: one scan over the whole side, not one per string."""
    text = "".join(chain.from_iterable(rows)).replace(".", "")
    return not text or (text.isascii() and text.isdigit())


def _apply(keys: list[float], levels: list[Level], rows, sign: float) -> None:
    """Absolute levels onto one side: quantity zero removes the level. key = sign * price, ascending."""
    for row in rows:
        price, qty = row[0], row[1]
        key = sign * float(price)
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            if float(qty) == 0.0:
                del keys[i], levels[i]
            else:
                levels[i] = (price, qty)
        elif float(qty) != 0.0:
            keys.insert(i, key)
            levels.insert(i, (price, qty))


class Book:
    __slots__ = ("_bid_keys", "_bids", "_ask_keys", "_asks")

    def __init__(self) -> None:
        # bids ascend by price (best = highest = last); asks ascend by -price (best = lowest = last)
        self._bid_keys: list[float] = []
        self._bids: list[Level] = []
        self._ask_keys: list[float] = []
        self._asks: list[Level] = []

    def clear(self) -> None:
        self._bid_keys.clear()
        self._bids.clear()
        self._ask_keys.clear()
        self._asks.clear()

    def load(self, bids, asks) -> None:
        self.clear()
        self.update(bids, asks)

    def update(self, bids, asks) -> None:
        """Apply absolute levels (rows of price, quantity, ...): quantity zero removes the level. A field
        that is not a plain decimal string raises ValueError before anything is applied."""
        if not (_plain(bids) and _plain(asks)):
            raise ValueError("a book level that is not a plain decimal")
        if bids:
            _apply(self._bid_keys, self._bids, bids, 1.0)
        if asks:
            _apply(self._ask_keys, self._asks, asks, -1.0)

    def top(self, depth: int) -> tuple[list[Level], list[Level]]:
        """The best `depth` levels per side, best first."""
        if depth <= 0:
            return [], []
        return self._bids[:-depth - 1:-1], self._asks[:-depth - 1:-1]  # one reversed slice each (clamped)

    def crossed(self) -> bool:
        return bool(self._bids and self._asks) and self._bid_keys[-1] >= -self._ask_keys[-1]

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
