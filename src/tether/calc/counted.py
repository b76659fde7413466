"""Elements that several objects may each contribute (a route two blocks need, a hairpin address two
services share), counted per contributor, so one object's change adds or removes its own part in
O(its part) and an element goes only when no contributor is left (calc.host's remote routes,
calc.services' map elements, calc.policy's selector members)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable


def add(counts: dict, item: Hashable) -> None:
    """One more contributor gives `item`."""
    counts[item] = counts.get(item, 0) + 1


def drop(counts: dict, item: Hashable) -> None:
    """One contributor of `item` less; with none left, `item` leaves `counts`."""
    n = counts[item] - 1
    if n:
        counts[item] = n
    else:
        del counts[item]


def count_in(part: Iterable[Iterable[Hashable]], counts: Iterable[dict]) -> None:
    """Add one contributor's part: its n-th tuple of elements to the n-th counter."""
    for items, counted in zip(part, counts, strict=True):
        for item in items:
            add(counted, item)


def count_out(part: Iterable[Iterable[Hashable]], counts: Iterable[dict]) -> None:
    """Take one contributor's part away; an element nobody else gives leaves its counter."""
    for items, counted in zip(part, counts, strict=True):
        for item in items:
            drop(counted, item)
