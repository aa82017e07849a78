"""Synthetic markets: a random-walk touch per instrument and an order book whose diffs chain.

Prices and sizes are integers (ticks and lots) so that every venue can print them exactly the way it
does on the wire; a float never decides what a client sees. The book keeps every bid inside
[top - width + 1, top] and every ask inside [top + 1, top + width], which is what keeps it uncrossed
and bounded without sorting on the hot path.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

BASE_PRICES = {"BTC": 60000.0, "ETH": 3000.0, "SOL": 150.0, "BNB": 600.0, "XRP": 0.6, "DOGE": 0.15}
BASE_SIZES = {"BTC": 0.05, "ETH": 0.8, "SOL": 20.0, "BNB": 4.0, "XRP": 3000.0, "DOGE": 15000.0}

Level = tuple[int, int]          # (tick, lots)
Change = tuple[int, int, int]    # (tick, lots now, lots before) ; lots now 0 = level removed


def base_price(base: str) -> float:
    return BASE_PRICES.get(base, 10.0)


def base_size(base: str) -> float:
    return BASE_SIZES.get(base, 100.0)


@dataclass(frozen=True)
class Spec:
    """How one venue quotes one instrument: decimals on the wire and increments in those units."""
    price_dp: int            # decimals printed for a price
    tick: int                # price increment, in units of 10**-price_dp
    qty_dp: int              # decimals printed for a size
    lot: int                 # size increment, in units of 10**-qty_dp
    fixed: bool = True       # "61837.63000000" (fixed) or "30243.5" (trailing zeros stripped)
    zero: str | None = None  # how a removed level's size is printed, when not like other sizes
    mean_size: float = 1.0   # typical order size in base units (contracts for contract venues)
    # Printing dominates the cost of a message; the same few thousand prices and sizes recur.
    _prices: dict = field(default_factory=dict, compare=False, repr=False)
    _sizes: dict = field(default_factory=dict, compare=False, repr=False)

    def price(self, tick: int) -> str:
        text = self._prices.get(tick)
        if text is None:
            if len(self._prices) > 50_000:
                self._prices.clear()
            text = self._prices[tick] = fmt(tick * self.tick, self.price_dp, self.fixed)
        return text

    def qty(self, lots: int) -> str:
        text = self._sizes.get(lots)
        if text is None:
            if len(self._sizes) > 50_000:
                self._sizes.clear()
            if lots == 0 and self.zero is not None:
                text = self.zero
            else:
                text = fmt(lots * self.lot, self.qty_dp, self.fixed)
            self._sizes[lots] = text
        return text

    def price_num(self, tick: int) -> float:
        return tick * self.tick / 10 ** self.price_dp

    def qty_num(self, lots: int) -> float:
        return lots * self.lot / 10 ** self.qty_dp

    def tick_of(self, price: float) -> int:
        return max(1, round(price * 10 ** self.price_dp / self.tick))

    def mean_lots(self) -> float:
        return max(1.0, self.mean_size * 10 ** self.qty_dp / self.lot)


def fmt(units: int, dp: int, fixed: bool = True) -> str:
    """Print an integer count of 10**-dp as a decimal string, exactly."""
    if dp == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    units = abs(units)
    scale = 10 ** dp
    text = f"{sign}{units // scale}.{units % scale:0{dp}d}"
    if not fixed:
        text = text.rstrip("0").rstrip(".")
    return text


def fmt_float(value: float, dp: int, fixed: bool = True) -> str:
    return fmt(round(value * 10 ** dp), dp, fixed)


def price_decimals(price: float, significant: int = 6) -> int:
    """Decimals that give a price about `significant` significant digits (fallback tick size)."""
    return max(0, significant - 1 - int(math.floor(math.log10(price))))


class Book:
    """One instrument's full book on one venue. Mutations are recorded until take_diff()."""

    def __init__(self, rng: random.Random, top: int, width: int, mean_lots: float):
        self.rng = rng
        self.top = max(top, width + 1)
        self.width = width
        self.mean_lots = mean_lots
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self._was_b: dict[int, int] = {}
        self._was_a: dict[int, int] = {}
        self._consume: list[tuple[bool, int]] = []
        for t in range(self.top - width + 1, self.top + 1):
            if t == self.top or rng.random() < 0.8:
                self.bids[t] = self._lots()
        for t in range(self.top + 1, self.top + width + 1):
            if t == self.top + 1 or rng.random() < 0.8:
                self.asks[t] = self._lots()

    def _lots(self) -> int:
        return 1 + int(self.rng.expovariate(1.0 / self.mean_lots))

    def _set_b(self, t: int, lots: int) -> None:
        if t not in self._was_b:
            self._was_b[t] = self.bids.get(t, 0)
        if lots:
            self.bids[t] = lots
        else:
            self.bids.pop(t, None)

    def _set_a(self, t: int, lots: int) -> None:
        if t not in self._was_a:
            self._was_a[t] = self.asks.get(t, 0)
        if lots:
            self.asks[t] = lots
        else:
            self.asks.pop(t, None)

    def best_bid(self) -> Level:
        for t in range(self.top, self.top - self.width, -1):
            lots = self.bids.get(t)
            if lots:
                return t, lots
        return self.top, 0

    def best_ask(self) -> Level:
        for t in range(self.top + 1, self.top + self.width + 1):
            lots = self.asks.get(t)
            if lots:
                return t, lots
        return self.top + 1, 0

    def consume(self, buy: bool, lots: int) -> None:
        """A trade took liquidity; applied at the next step so snapshots match the last diff sent."""
        self._consume.append((buy, lots))

    def step(self, new_top: int, churn: int) -> None:
        for buy, lots in self._consume:
            t, have = self.best_ask() if buy else self.best_bid()
            left = max(0, have - lots)
            (self._set_a if buy else self._set_b)(t, left)
        self._consume.clear()
        self._move(max(new_top, self.width + 1))
        for _ in range(churn):
            self._churn_one()
        if self.top not in self.bids:
            self._set_b(self.top, self._lots())
        if self.top + 1 not in self.asks:
            self._set_a(self.top + 1, self._lots())

    def _move(self, nt: int) -> None:
        ot, w, rng = self.top, self.width, self.rng
        if nt == ot:
            return
        self.top = nt
        # Ranges instead of scanning the sides: a move touches only the ticks that left or entered.
        if nt > ot:
            gone_b, gone_a = range(ot - w + 1, min(nt - w, ot) + 1), range(ot + 1, min(nt, ot + w) + 1)
            new_b, new_a = range(max(ot + 1, nt - w + 1), nt + 1), range(max(ot + w + 1, nt + 1), nt + w + 1)
        else:
            gone_b, gone_a = range(max(nt + 1, ot - w + 1), ot + 1), range(max(nt + w + 1, ot + 1), ot + w + 1)
            new_b, new_a = range(nt - w + 1, min(ot - w + 1, nt + 1)), range(nt + 1, min(ot + 1, nt + w + 1))
        for t in gone_b:
            if t in self.bids:
                self._set_b(t, 0)
        for t in gone_a:
            if t in self.asks:
                self._set_a(t, 0)
        for t in new_b:
            if rng.random() < 0.8:
                self._set_b(t, self._lots())
        for t in new_a:
            if rng.random() < 0.8:
                self._set_a(t, self._lots())

    def _churn_one(self) -> None:
        rng = self.rng
        dist = min(self.width - 1, int(rng.expovariate(0.1)))
        if rng.random() < 0.5:
            t, side, setter = self.top - dist, self.bids, self._set_b
        else:
            t, side, setter = self.top + 1 + dist, self.asks, self._set_a
        if t in side and dist > 0 and rng.random() < 0.3:
            setter(t, 0)
        else:
            setter(t, self._lots())

    def take_diff(self) -> tuple[list[Change], list[Change]]:
        """Levels whose size changed since the last call, best first, with their previous size."""
        bids, asks = self.bids, self.asks
        b = [(t, bids.get(t, 0), old) for t, old in self._was_b.items() if bids.get(t, 0) != old]
        a = [(t, asks.get(t, 0), old) for t, old in self._was_a.items() if asks.get(t, 0) != old]
        self._was_b.clear()
        self._was_a.clear()
        b.sort(reverse=True)
        a.sort()
        return b, a

    def levels(self, bid: bool, n: int) -> list[Level]:
        out: list[Level] = []
        if bid:
            side, ticks = self.bids, range(self.top, self.top - self.width, -1)
        else:
            side, ticks = self.asks, range(self.top + 1, self.top + self.width + 1)
        for t in ticks:
            lots = side.get(t)
            if lots:
                out.append((t, lots))
                if len(out) >= n:
                    break
        return out


class View:
    """What a depth-limited channel shows of a book (Bybit orderbook.1/50/200, REST limits).

    A view as deep as the book passes the book's diffs through; a shallower one diffs its own top
    levels, so levels entering or leaving the top N appear as inserts and deletes, as on the venue.
    `seq` and `cross` hold the venue's sequence numbers for this view.
    """

    def __init__(self, book: Book, depth: int):
        self.book = book
        self.depth = depth
        self.full = depth >= book.width
        self.seq = 0
        self.cross = 0
        self._b: dict[int, int] = {}
        self._a: dict[int, int] = {}
        if not self.full:
            self._b = dict(book.levels(True, depth))
            self._a = dict(book.levels(False, depth))

    def diff(self, book_diff: tuple[list[Change], list[Change]]) -> tuple[list[Change], list[Change]]:
        if self.full:
            return book_diff
        nb = dict(self.book.levels(True, self.depth))
        na = dict(self.book.levels(False, self.depth))
        b = _compare(self._b, nb, reverse=True)
        a = _compare(self._a, na, reverse=False)
        self._b, self._a = nb, na
        return b, a

    def levels(self, bid: bool, n: int | None = None) -> list[Level]:
        n = self.depth if n is None else min(n, self.depth)
        if self.full:
            return self.book.levels(bid, n)
        side = self._b if bid else self._a
        return sorted(side.items(), reverse=bid)[:n]


def _compare(old: dict[int, int], new: dict[int, int], reverse: bool) -> list[Change]:
    out = [(t, 0, lots) for t, lots in old.items() if t not in new]
    out += [(t, lots, old.get(t, 0)) for t, lots in new.items() if old.get(t) != lots]
    out.sort(reverse=reverse)
    return out


class Instrument:
    """One instrument of one feed: its touch walk, its book and views, its trade counter."""

    def __init__(self, venue_id: str, symbol: str, spec: Spec, rng: random.Random, width: int, kind: str):
        self.id = venue_id
        self.symbol = symbol
        self.base = symbol.split("-")[0]
        self.kind = kind                     # spot | swap
        self.spec = spec
        self.rng = rng
        self.top = spec.tick_of(base_price(self.base)) - 1
        self.book = Book(rng, self.top, width, spec.mean_lots())
        self.views: dict[int, View] = {}
        self.trade_id = rng.randrange(10 ** 8, 4 * 10 ** 9)
        self.agg_id = rng.randrange(10 ** 8, 2 * 10 ** 9)
        self.last_trade: tuple[bool, int, int] = (True, self.top + 1, 1)
        self.flip = False

    def view(self, depth: int) -> View:
        v = self.views.get(depth)
        if v is None:
            v = self.views[depth] = View(self.book, depth)
        return v

    def step(self) -> tuple[list[Change], list[Change]]:
        r = self.rng.random()
        if r < 0.3:
            self.top -= self.rng.randint(1, 3)
        elif r < 0.6:
            self.top += self.rng.randint(1, 3)
        self.book.step(self.top, 1 + self.rng.randrange(4))
        self.top = self.book.top
        return self.book.take_diff()

    def trade(self) -> tuple[bool, int, int, int]:
        """(taker buys, price tick, lots, trade id) at the touch."""
        buy = self.rng.random() < 0.5
        t, have = self.book.best_ask() if buy else self.book.best_bid()
        lots = max(1, min(have, int(self.rng.expovariate(2.0 / self.spec.mean_lots())) + 1))
        self.book.consume(buy, lots)
        self.trade_id += 1
        self.last_trade = (buy, t, lots)
        return buy, t, lots, self.trade_id

    def mid(self) -> float:
        return self.spec.price_num(self.top) + self.spec.price_num(1) / 2
