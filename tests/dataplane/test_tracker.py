"""The desired-vs-kernel tracker every object kind of the link apply uses (dataplane.tracker)."""

from __future__ import annotations

from tether.dataplane.tracker import DeltaTracker


def test_pending_lists_missing_changed_and_unwanted_objects_sorted() -> None:
    t = DeltaTracker({"b": 1, "c": 2, "z": 9})
    writes, deletes = t.pending({"a": 0, "b": 1, "c": 3})
    assert writes == [("a", 0), ("c", 3)] and deletes == ["z"]


def test_recorded_writes_and_deletes_leave_nothing_pending() -> None:
    t: DeltaTracker[str, int] = DeltaTracker()
    desired = {"a": 1, "b": 2}
    writes, _ = t.pending(desired)
    for key, value in writes:
        t.wrote(key, value)
    t.wrote("old", 0)
    _, deletes = t.pending(desired)
    for key in deletes:
        t.deleted(key)
    assert t.pending(desired) == ([], []) and "a" in t and len(t) == 2


def test_a_reload_replaces_what_was_remembered_and_a_copy_is_independent() -> None:
    t = DeltaTracker({"a": 1})
    c = t.copy()
    t.reload({"b": None})
    assert c.kernel == {"a": 1} and t.pending({"b": 2}) == ([("b", 2)], [])


def test_a_kind_whose_objects_are_their_keys_compares_keys_only() -> None:
    t: DeltaTracker[tuple[str, str], None] = DeltaTracker(dict.fromkeys([("m1", "d1"), ("m2", "d2")]))
    assert t.pending_keys(frozenset({("m2", "d2"), ("m3", "d3")})) == ([("m3", "d3")], [("m1", "d1")])
    t.wrote(("m3", "d3"))
    t.deleted(("m1", "d1"))
    assert t.pending_keys({("m2", "d2"), ("m3", "d3")}) == ([], [])
