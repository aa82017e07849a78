"""An L2 order book that keeps the exchange's own price and quantity strings.

Levels are keyed by float price for ordering only; the strings the exchange sent are what is emitted,
so no value is ever rounded on its way to the store.
"""

from __future__ import annotations

from sortedcontainers import SortedDict

from marketprism.records import Level


class Book:
    __slots__ = ("bids", "asks")

    def __init__(self) -> None:
        self.bids: SortedDict = SortedDict()  # key -price: iteration is best (highest) first
        self.asks: SortedDict = SortedDict()

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()

    def load(self, bids, asks) -> None:
        self.clear()
        self.update(bids, asks)

    def update(self, bids, asks) -> None:
        """Apply absolute levels: quantity zero removes the level."""
        side = self.bids
        for price, qty, *_ in bids:
            key = -float(price)
            if float(qty) == 0.0:
                side.pop(key, None)
            else:
                side[key] = (price, qty)
        side = self.asks
        for price, qty, *_ in asks:
            key = float(price)
            if float(qty) == 0.0:
                side.pop(key, None)
            else:
                side[key] = (price, qty)

    def top(self, depth: int) -> tuple[list[Level], list[Level]]:
        return list(self.bids.values()[:depth]), list(self.asks.values()[:depth])

    def crossed(self) -> bool:
        return bool(self.bids and self.asks) and -self.bids.keys()[0] >= self.asks.keys()[0]

    def __len__(self) -> int:
        return len(self.bids) + len(self.asks)
