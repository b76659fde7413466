"""Desired vs kernel, for one kind of kernel object (routes, neighbours, FDB entries, interfaces).

The dataplane keeps one tracker per kind: its kernel side is what the kernel holds as far as this
process knows, keyed by what identifies the object, with a value for the settings that can differ.
An apply compares the plan (the desired side, given whole each time) with it and writes only the
difference, recording each write or delete that succeeded. A full resync is the same apply after
`reload` has filled the kernel side from a dump: there is one apply path, and the per-event pass
(kernel side remembered from the previous apply) differs from the periodic reconcile only in where
the kernel side came from. Set operations on dict views keep the comparison in C: a host with
thousands of routes compares them on every pod event.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from collections.abc import Set as AbstractSet
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V", bound=Hashable)


class DeltaTracker(Generic[K, V]):
    """The kernel side of one object kind, and the difference to a desired side."""

    __slots__ = ("kernel",)

    def __init__(self, kernel: Mapping[K, V] | None = None) -> None:
        self.kernel: dict[K, V] = dict(kernel or {})

    def copy(self) -> DeltaTracker[K, V]:
        return DeltaTracker(self.kernel)

    def reload(self, kernel: Mapping[K, V]) -> None:
        """A full resync: forget what was remembered, take what the kernel was just read to hold."""
        self.kernel = dict(kernel)

    def pending(self, desired: Mapping[K, V]) -> tuple[list[tuple[K, V]], list[K]]:
        """(key, value) to write, missing or with another value in the kernel; keys to delete,
        held by the kernel and not desired. Each sorted by key, so passes are reproducible."""
        writes = sorted(desired.items() - self.kernel.items(), key=_first)
        deletes = sorted(self.kernel.keys() - desired.keys())  # type: ignore[type-var]
        return writes, deletes

    def pending_keys(self, desired: AbstractSet[K]) -> tuple[list[K], list[K]]:
        """`pending` for a kind whose objects are their key (routes, FDB entries): keys to write, keys
        to delete. Set and dict operations that reuse the hashes the sets and dicts hold: a Route's
        own hash is Python code, and a host compares thousands of them on every pod event."""
        writes = sorted(frozenset(desired).difference(self.kernel))  # type: ignore[type-var]
        deletes = sorted(set(self.kernel).difference(desired))  # type: ignore[type-var]
        return writes, deletes

    def wrote(self, key: K, value: V = None) -> None:  # type: ignore[assignment]
        self.kernel[key] = value

    def deleted(self, key: K) -> None:
        self.kernel.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self.kernel

    def __len__(self) -> int:
        return len(self.kernel)


def _first(item: tuple) -> object:
    return item[0]
