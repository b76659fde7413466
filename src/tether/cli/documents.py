"""`tether apply -f`: each document is compared with what is stored and written only when it says
something new, so the output of `tether get -o yaml` applied again changes nothing.

A field counts as said when the document sets it (a hand-written document with only a few fields
changes only those); fields the system owns (revision, created_at, status) never count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from tether.client import ApiError, path_of
from tether.model import KINDS, Obj

SYSTEM = {"id", "revision", "created_at", "status", "heartbeat", "lease_id"}  # the server's, not the user's
REFUSED = {
    "Block": "blocks are IPAM's own: they change when endpoints get or release addresses; "
             "create or delete endpoints instead",
    "Host": "a host is registered by its agent (`tether agent`); only its labels can be changed here",
}


def adopt_ids(desired: Obj, stored: dict[str, Any]) -> None:
    """List items a document gives without an id (a subnet, a rule) that are stored already keep
    the stored id: otherwise every apply would make new ones, and Neutron clients would see their
    subnets replaced."""
    for name in desired.model_fields_set:
        value, before = getattr(desired, name), stored.get(name)
        if not isinstance(value, list) or not isinstance(before, list):
            continue
        for item in value:
            if isinstance(item, BaseModel) and "id" in type(item).model_fields and "id" not in item.model_fields_set:
                mine = item.model_dump(mode="json", exclude={"id"})
                same = next((b for b in before if isinstance(b, dict) and {k: v for k, v in b.items() if k != "id"}
                             == mine), None)
                if same is not None:
                    item.id = same["id"]


def changed_fields(desired: Obj, stored: dict[str, Any]) -> dict[str, Any]:
    """The fields the document sets to something other than what is stored."""
    adopt_ids(desired, stored)
    want = desired.model_dump(mode="json")
    return {k: want[k] for k in sorted(desired.model_fields_set - SYSTEM) if want[k] != stored.get(k)}


def find_stored(c: Any, obj: Obj) -> dict[str, Any] | None:
    """The stored object a document means: by key, or for endpoints and security groups (keyed by a
    server-made id) by id when the document gives one, else by name."""
    if obj.kind in ("Endpoint", "SecurityGroup") and "id" not in obj.model_fields_set:
        if obj.kind == "Endpoint":
            found = c.list_raw("Endpoint", network=obj.network, namespace=obj.namespace, name=obj.name)
        else:
            found = [g for g in c.list_raw("SecurityGroup") if g["name"] == obj.name]
        if len(found) > 1:
            raise ApiError(409, f"{len(found)} {obj.kind} objects are named {obj.name!r}; give metadata.id")
        return found[0] if found else None
    if obj.kind == "Block":  # no route for one block
        return next((b for b in c.list_raw("Block", network=obj.network) if b["name"] == obj.name), None)
    try:
        return c.request("GET", path_of(obj.kind, obj.store_name()))
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def write(c: Any, obj: Obj, stored: dict[str, Any] | None, changes: dict[str, Any]) -> None:
    body = obj.model_dump_json(exclude={"revision"})
    if obj.kind in REFUSED and stored is None:
        raise ApiError(400, f"{obj.kind} {obj.name!r} does not exist and cannot be created by apply: "
                            f"{REFUSED[obj.kind]}")
    if obj.kind == "Block" or (obj.kind == "Host" and set(changes) - {"labels"}):
        raise ApiError(400, f"{obj.kind} {obj.name!r}: cannot change {', '.join(changes)}: {REFUSED[obj.kind]}")
    if obj.kind == "Host":
        assert stored is not None
        host = {k: v for k, v in stored.items() if k not in ("alive", "revision")} | {"labels": obj.labels}
        c.request("PUT", path_of("Host", obj.name), json=host)
    elif obj.kind == "Endpoint":
        if stored is None:
            c.request("POST", path_of("Endpoint"), content=body)
        else:
            c.request("PATCH", path_of("Endpoint", stored["id"]), json=changes)
    elif obj.kind == "SecurityGroup":
        if stored is None:
            c.request("POST", path_of("SecurityGroup"), content=body)
        else:
            c.request("PUT", path_of("SecurityGroup", stored["id"]),
                      content=obj.model_copy(update={"id": stored["id"]}).model_dump_json(exclude={"revision"}))
    else:
        c.request("PUT", path_of(obj.kind, obj.store_name()), content=body)


def apply_objects(c: Any, objs: list[Obj], say: Callable[[str], None]) -> None:
    """Create what does not exist, update what the document changes, leave the rest alone."""
    for obj in objs:
        stored = find_stored(c, obj)
        changes = changed_fields(obj, stored) if stored is not None else {}
        what = f"{obj.kind.lower()}/{obj.name if obj.kind in ('Endpoint', 'SecurityGroup') else obj.store_name()}"
        if stored is not None and not changes:
            say(f"{what} unchanged")
            continue
        write(c, obj, stored, changes)
        say(f"{what} {'created' if stored is None else 'configured (' + ', '.join(changes) + ')'}")


def stored_ref(kind: str, stored: dict[str, Any]) -> str:
    """The key part of a stored object, as the API routes take it."""
    if kind in ("Endpoint", "SecurityGroup"):
        return stored["id"]
    if KINDS[kind].namespaced:
        return f"{stored['namespace']}/{stored['name']}"
    return stored["name"]


def find_named(c: Any, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    """One object by a name the user typed: namespace/name (or -n) for namespaced kinds, a name or
    an id for endpoints and security groups (exact matches only), the name otherwise."""
    if kind in ("Endpoint", "SecurityGroup"):
        listed = c.list_raw(kind) if kind == "SecurityGroup" else c.list_raw(kind, namespace=namespace)
        found = [o for o in listed if name in (o["id"], o["name"])]
        if len(found) > 1:
            raise ApiError(409, f"{len(found)} {kind} objects are named {name!r}; give the id")
        return found[0] if found else None
    if kind == "Block":
        return next((b for b in c.list_raw("Block") if b["name"] == name), None)
    ref = name if not KINDS[kind].namespaced or "/" in name else f"{namespace}/{name}"
    try:
        return c.request("GET", path_of(kind, ref))
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def delete_objects(c: Any, objs: list[Obj], say: Callable[[str], None],
                   one: tuple[str, str, str] | None = None) -> list[str]:
    """Delete what the documents (last first, so dependents go before what they use) or `one`
    (kind, name, namespace) name; returns what did not exist."""
    targets: list[tuple[str, str, dict[str, Any] | None]] = []
    if one is not None:
        kind, name, namespace = one
        targets.append((kind, name, find_named(c, kind, name, namespace)))
    for obj in reversed(objs):
        shown = obj.name if obj.kind in ("Endpoint", "SecurityGroup") else obj.store_name()
        targets.append((obj.kind, shown, find_stored(c, obj)))
    missing = []
    for kind, shown, stored in targets:
        what = f"{kind.lower()}/{shown}"
        if stored is None:
            say(f"{what} not found")
            missing.append(what)
            continue
        c.delete(kind, stored_ref(kind, stored))
        say(f"{what} deleted")
    return missing
