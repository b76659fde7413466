"""The agent's replica of the desired state: a snapshot plus watch events, kept in memory and on disk.

The disk copy lets a restarted agent compute the same plan (and answer DNS) while the server is
down, so a restart never needs the server to keep the datapath as it was.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import BaseModel, ValidationError

from tether.model import (
    KINDS,
    Block,
    Endpoint,
    FloatingIP,
    Host,
    Namespace,
    Network,
    NetworkPolicy,
    Obj,
    Router,
    SecurityGroup,
    Service,
)


class Journal:
    """Which objects changed, in order: one (kind, store name) per write to a replica's objects,
    whoever writes (watch events, the agent's own CNI writes, tests). The planner reads the entries
    since its last plan and recomputes what they touch instead of the whole cluster (issue 29).
    Entries may name objects that did not change (only ever more work, never a wrong plan). Bounded:
    past LIMIT entries the older half is dropped and a reader that had not read them plans in full.
    Trimming and `lost` replace `entries` (never change it in place), so a view that holds the old
    list reads it undisturbed on another thread."""

    __slots__ = ("entries", "start", "origin")
    LIMIT = 4096

    def __init__(self, origin: tuple[Journal, list, int, int] | None = None) -> None:
        self.entries: list[tuple[str, str]] = []
        self.start = 0  # the position of entries[0]
        # a view's journal: (the replica's journal, its entries, start, end) when the view was taken
        self.origin = origin

    @property
    def end(self) -> int:
        return self.start + len(self.entries)

    def note(self, kind: str, name: str) -> None:
        entries = self.entries
        if len(entries) >= self.LIMIT:
            keep = entries[len(entries) // 2:]
            self.start += len(entries) - len(keep)
            self.entries = entries = keep
        entries.append((kind, name))

    def lost(self) -> None:
        """Everything may have changed (a snapshot loaded, a dict cleared): every reader plans in full."""
        self.start = self.end + 1
        self.entries = []

    def mark(self) -> tuple[Journal, list, int, int]:
        """(journal, entries, start, end) now: what a view reads its changes from."""
        return self, self.entries, self.start, self.end


class JournaledDict(dict):
    """A replica's objects of one kind: each write is noted in the replica's journal."""

    __slots__ = ("kind", "journal")

    def __init__(self, kind: str, journal: Journal, items: dict | None = None) -> None:
        super().__init__(items or {})
        self.kind, self.journal = kind, journal

    def __setitem__(self, key: str, value: Any) -> None:
        self.journal.note(self.kind, key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self.journal.note(self.kind, key)
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in self:
            self.journal.note(self.kind, key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        key, value = super().popitem()
        self.journal.note(self.kind, key)
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self.journal.note(self.kind, key)
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __ior__(self, other: Any) -> JournaledDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        self.journal.lost()
        super().clear()

    def __reduce__(self) -> Any:  # a copy elsewhere (pickle, deepcopy) is a plain dict: no journal
        return dict, (dict(self),)


def journaled(objects: dict[str, dict[str, Obj]], journal: Journal) -> dict[str, dict[str, Obj]]:
    return {k: JournaledDict(k, journal, objects.get(k)) for k in KINDS}


class Replica:
    def __init__(self) -> None:
        self.journal = Journal()
        self.objects: dict[str, dict[str, Obj]] = journaled({}, self.journal)
        self.revision = 0
        # the revision of the last change that is not a host's status report: the agent reports it
        # applied (Host.status.applied_revision) when this advances, never for status-only events,
        # or each host's report would make every other host report again, forever
        self.acted = 0
        self.synced = False
        # objects the model refused, (kind, store name, why): left out and reported, never fatal
        self.undecodable: list[tuple[str, str, str]] = []

    # --- feeding --------------------------------------------------------------------------------

    def load_snapshot(self, snap: dict[str, Any], consume: bool = False) -> None:
        """`consume`: empty `snap`'s list as its items are decoded (the agent: see below)."""
        # read and checked before anything is replaced: a malformed snapshot leaves the replica as it was
        revision, items = snap["revision"], snap["objects"]
        if not isinstance(revision, int) or not isinstance(items, list):
            raise TypeError("a snapshot is {'revision': <int>, 'objects': [...]}")
        objects: dict[str, dict[str, Obj]] = {k: {} for k in KINDS}
        undecodable = []
        for i, item in enumerate(items):
            # each parsed item is dropped once decoded: the models reuse its memory, instead of the
            # whole parsed snapshot (~4 KB an endpoint) living until the last model is built
            if consume:
                items[i] = None
            kind = item.get("kind") if isinstance(item, dict) else None
            if kind not in KINDS:
                continue
            obj, why = _decode(kind, item.get("object"))
            if obj is None:
                undecodable.append((kind, _raw_name(kind, item.get("object")), why))
                continue
            objects[obj.kind][obj.store_name()] = obj
        self.journal.lost()
        self.objects = journaled(objects, self.journal)
        self.undecodable = undecodable
        self.revision = self.acted = revision
        self.synced = True

    def apply_event(self, ev: dict[str, Any]) -> bool:
        """Apply one watch event; True if it changed something."""
        kind = ev.get("kind")
        if kind not in KINDS:
            self.revision = max(self.revision, ev.get("revision", 0))
            return False
        self.revision = max(self.revision, ev["revision"])
        store_name = ev["key"].split(f"/{_plural(kind)}/", 1)[1]
        before = len(self.undecodable)
        self.undecodable = [u for u in self.undecodable if (u[0], u[1]) != (kind, store_name)]
        forgot = len(self.undecodable) != before
        if ev["type"] == "delete":
            self.acted = max(self.acted, ev["revision"])
            return self.objects[kind].pop(store_name, None) is not None or forgot
        obj, why = _decode(kind, ev.get("object"))
        if obj is None:  # the model refuses it: the old version goes too (it was replaced), reported
            self.objects[kind].pop(store_name, None)
            self.undecodable.append((kind, store_name, why))
            self.acted = max(self.acted, ev["revision"])
            return True
        old = self.objects[kind].get(store_name)
        if old is not None and _unplanned_change(kind, old, obj):
            # no plan reads what changed: nothing to apply, and not journaled (every host reports
            # every few seconds, every pod added writes its block's allocations: the planner would
            # look at each host's endpoints again, every agent would plan every pod twice)
            dict.__setitem__(self.objects[kind], store_name, obj)
            return False
        self.acted = max(self.acted, ev["revision"])
        if old == obj:
            # the echo of a write this agent already put in its replica (a CNI ADD's endpoint):
            # nothing to plan again, and during a burst of ADDs that halves the agent's work
            return False
        self.objects[kind][store_name] = obj
        return True

    def view(self) -> Replica:
        """A copy to read on another thread while this one changes: the same objects (replaced,
        never changed in place) in dicts of its own."""
        r = Replica()
        # its changes are those of the replica's journal as it was when taken. Plain dicts (a
        # journaled copy of a dict with deleted entries takes ten times as long: 0.5 ms with
        # 10,000 endpoints): a view is read, not written (quarantine.without's copies of one
        # are not planned from with a planner's journal)
        r.journal = Journal(self.journal.mark())
        r.objects = {k: dict.copy(v) for k, v in self.objects.items()}
        r.undecodable = list(self.undecodable)
        r.revision, r.acted, r.synced = self.revision, self.acted, self.synced
        return r

    def encoded(self) -> str:
        """The replica as the JSON text `load` reads (see `encoded_parts`)."""
        return "".join(self.encoded_parts())

    def encoded_parts(self) -> Iterator[str]:
        """The replica's JSON text in pieces, one per object, each made by pydantic's serializer when
        asked (~4 us an object: 40-50 ms with 10,000 endpoints, at most once a second), so a writer
        never holds the whole text (~7 MB at 10,000 endpoints). Not kept per object: that copy of
        every object's text was ~10 MB of an agent's memory at 10,000 endpoints."""
        yield f'{{"revision": {self.revision}, "objects": ['
        sep = ""
        for kind, objs in self.objects.items():
            for obj in list(objs.values()):
                yield f'{sep}{{"kind": "{kind}", "object": {obj.model_dump_json()}}}'
                sep = ", "
        yield "]}"

    # --- views ----------------------------------------------------------------------------------

    @property
    def hosts(self) -> dict[str, Host]:
        return self.objects["Host"]  # type: ignore[return-value]

    @property
    def networks(self) -> dict[str, Network]:
        return self.objects["Network"]  # type: ignore[return-value]

    @property
    def blocks(self) -> Iterable[Block]:
        return self.objects["Block"].values()  # type: ignore[return-value]

    @property
    def endpoints(self) -> Iterable[Endpoint]:
        return self.objects["Endpoint"].values()  # type: ignore[return-value]

    @property
    def namespaces(self) -> Iterable[Namespace]:
        return self.objects["Namespace"].values()  # type: ignore[return-value]

    @property
    def policies(self) -> Iterable[NetworkPolicy]:
        return self.objects["NetworkPolicy"].values()  # type: ignore[return-value]

    @property
    def security_groups(self) -> Iterable[SecurityGroup]:
        return self.objects["SecurityGroup"].values()  # type: ignore[return-value]

    @property
    def services(self) -> Iterable[Service]:
        return self.objects["Service"].values()  # type: ignore[return-value]

    @property
    def routers(self) -> Iterable[Router]:
        return self.objects["Router"].values()  # type: ignore[return-value]

    @property
    def floating_ips(self) -> Iterable[FloatingIP]:
        return self.objects["FloatingIP"].values()  # type: ignore[return-value]

    def endpoint(self, ep_id: str) -> Endpoint | None:
        return self.objects["Endpoint"].get(ep_id)  # type: ignore[return-value]


# What a decoded object keeps, made smaller (issue 29: agent RSS at 10,000 endpoints), without a
# change to what it is: `_compact` returns an equal model of the same class.
# - pydantic gives every instance a set of the names of the fields it was given: decoded from the
#   server's JSON, that is every field, ~2.3 KB for an endpoint and 0.7 KB more for its owner. Equal
#   sets are shared (pydantic only ever adds names to them, and they hold every name already);
#   `exclude_unset`, which reads them, is not used on replica objects.
# - pydantic stores an instance's fields in a dict of its own (832 bytes for an endpoint's 26 fields);
#   copied from a dict that shares its keys (a plain object's attribute dict: `_KEYS`), they take
#   296 bytes, as a plain Python object's attributes do (a dict of shared keys holds room for 30
#   values: objects of fewer than `_SHARED_KEYS_FROM` fields keep their own dict, it is smaller).
# - names that repeat across objects (a network's, a host's, a namespace's, label keys and values)
#   are interned, and equal sub-objects made only of such values and numbers (an API endpoint's
#   owner) are one object: replica objects are replaced, never changed in place.
_FIELDS_SETS: dict[tuple[type, frozenset[str]], set[str]] = {}
_KEYS: dict[tuple[type, tuple[str, ...]], dict[str, Any]] = {}
_INTERNED_FIELDS = frozenset({"network", "host", "namespace", "status", "type", "protocol", "encap", "dns_domain"})
_SHARED_VALUES: dict[tuple, BaseModel] = {}
_SHARED_LIMIT = 1_000  # distinct shared sub-objects kept (a few: they hold only small values)
_SHARED_KEYS_FROM = 8


class _Attributes:
    """A plain object: its attribute dict shares its keys with its class's other instances."""


def _compact(model: BaseModel) -> BaseModel:
    cls = type(model)
    names = model.__pydantic_fields_set__
    fields = _FIELDS_SETS.setdefault((cls, frozenset(names)), names)
    values = {}
    for k, v in model.__dict__.items():
        if isinstance(v, str):
            if k in _INTERNED_FIELDS:
                v = sys.intern(v)
        elif isinstance(v, BaseModel):
            v = _shared(_compact(v))
        elif isinstance(v, list):
            if v and isinstance(v[0], BaseModel):
                v = [_shared(_compact(item)) for item in v]
        elif k == "labels" and isinstance(v, dict):
            v = {sys.intern(a): sys.intern(b) for a, b in v.items()}
        values[k] = v
    if len(values) >= _SHARED_KEYS_FROM:
        keys = (cls, tuple(values))
        template = _KEYS.get(keys)
        if template is None:
            holder = type(f"_{cls.__name__}Attributes", (_Attributes,), {})()  # a class of its own: its keys only
            for k in values:
                setattr(holder, k, None)
            template = _KEYS[keys] = holder.__dict__
        d = template.copy()  # shares the keys
        d.update(values)
        values = d
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", values)
    object.__setattr__(new, "__pydantic_fields_set__", fields)
    object.__setattr__(new, "__pydantic_extra__", model.__pydantic_extra__)
    object.__setattr__(new, "__pydantic_private__", model.__pydantic_private__)
    return new


def _shared(model: BaseModel) -> BaseModel:
    """One object for equal sub-objects that hold no id or free text (an API endpoint's owner: its
    type and nothing else); one with any other string (a CNI owner's container id) is its own."""
    if model.__pydantic_extra__ or model.__pydantic_private__ or not all(
            v is None or isinstance(v, (bool, int)) or (k in _INTERNED_FIELDS and isinstance(v, str))
            for k, v in model.__dict__.items()):
        return model
    key = (type(model), tuple(model.__dict__.values()))
    shared = _SHARED_VALUES.get(key)
    if shared is not None:
        return shared
    if len(_SHARED_VALUES) < _SHARED_LIMIT:
        _SHARED_VALUES[key] = model
    return model


def _decode(kind: str, raw: Any) -> tuple[Obj | None, str]:
    """The object, or None and why the model refuses it (one bad object never stops a replica)."""
    try:
        return _compact(KINDS[kind].model_validate(raw)), ""  # type: ignore[return-value]
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return None, f"cannot decode it: {where}: {first.get('msg', '')}"[:300]
    except Exception as e:  # noqa: BLE001 - a value that is not even a dict
        return None, f"cannot decode it: {type(e).__name__}: {e}"[:300]


def _raw_name(kind: str, raw: Any) -> str:
    """The store name of an object the model refuses, as far as its raw fields tell."""
    if not isinstance(raw, dict):
        return "?"
    if kind in ("Endpoint", "SecurityGroup", "Router", "FloatingIP"):
        return str(raw.get("id", "?"))[:200]
    if kind in ("NetworkPolicy", "Service"):
        return f"{raw.get('namespace', 'default')}/{raw.get('name', '?')}"[:200]
    return str(raw.get("name", "?"))[:200]


def _plural(kind: str) -> str:
    from tether.model import PLURALS

    return PLURALS[kind]


# per kind, the fields no plan reads: a host's status report, when it last registered (an agent
# that reconnects registers again: in a 100-host start every registration was a plan on every
# running agent); a block's allocations (the server's IPAM record: agents route whole blocks and
# read each endpoint's own addresses)
_NOT_PLANNED = {"Host": frozenset({"status", "revision", "heartbeat"}),
                "Block": frozenset({"allocations", "revision"})}


def _unplanned_change(kind: str, old: Obj, new: Obj) -> bool:
    """True when an event changes only fields that no plan reads (`_NOT_PLANNED`)."""
    skip = _NOT_PLANNED.get(kind)
    return (skip is not None and type(old) is type(new)
            and old.model_dump(exclude=skip) == new.model_dump(exclude=skip))
