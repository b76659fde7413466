"""The store interface: a revisioned key-value store with CAS transactions, watch and leases.

Both engines (SQLite, etcd v3) implement `Store` with the same semantics, and one test suite runs
against both. The semantics are etcd's:

- every successful write transaction bumps the store revision by exactly one; all its events carry
  that revision;
- a key's `mod_revision` is the revision of its last write, `create_revision` the one that created it;
- `Compare(key, mod_revision=0)` means "the key must not exist";
- `watch(prefix, after_revision)` yields every event with revision > after_revision, in revision
  order (and within one revision, in the order of the transaction's operations), then waits for
  more; if after_revision is older than the compaction point it raises `Compacted` and the caller
  must resync (list, then watch from the list's revision).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


class StoreError(Exception):
    """Base class of store errors."""


class Conflict(StoreError):
    """A compare in a transaction failed: someone else wrote first. Re-read and retry."""


class Compacted(StoreError):
    """The requested revision was compacted away; the caller must resync from a fresh list."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact revision {compact_revision}); resync")
        self.compact_revision = compact_revision


class Unavailable(StoreError):
    """The store cannot be reached."""


class StoreUnusable(StoreError):
    """The store cannot be used as configured (a corrupt or unwritable database, etcd refusing the
    credentials): the server cannot start. `exit_code` (sysexits.h) says which, for scripts."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """A change, or (type "progress", key "") the store's word that every event up to `revision`
    has been delivered: an engine may send one on a quiet stream (etcd does), none is required."""

    type: Literal["put", "delete", "progress"]
    key: str
    value: bytes | None  # None for delete and progress
    revision: int


@dataclass(frozen=True, slots=True)
class Compare:
    """Succeeds when `key`'s mod_revision equals `mod_revision` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class ListResult:
    items: list[KV] = field(default_factory=list)
    revision: int = 0  # the store revision the listing is consistent with


class Store(Protocol):
    async def get(self, key: str) -> KV | None: ...

    async def list(self, prefix: str) -> ListResult: ...

    async def txn(self, compares: list[Compare], ops: list[Op]) -> int:
        """Apply all ops atomically if every compare holds; return the new revision.

        Raises Conflict (nothing applied) when a compare fails. An empty `ops` list is allowed
        and returns the current revision without bumping it.
        """
        ...

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        """Put only if the key does not exist (Conflict otherwise)."""
        ...

    async def update(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int:
        """Put only if the key's mod_revision is still `mod_revision` (Conflict otherwise)."""
        ...

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Unconditional put."""
        ...

    async def delete(self, key: str, mod_revision: int | None = None) -> int:
        """Delete (only if mod_revision matches, when given). Deleting a missing key: Conflict
        when mod_revision is given, otherwise a no-op that returns the current revision."""
        ...

    def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        """Events with revision > after_revision under prefix, forever. Raises Compacted."""
        ...

    async def revision(self) -> int: ...

    async def compact(self, revision: int) -> None:
        """Forget history at and before `revision`; watches from older revisions get Compacted."""
        ...

    async def grant_lease(self, ttl: float) -> int:
        """A lease that expires `ttl` seconds after its last keepalive; keys attached to it are
        deleted (with delete events) when it expires or is revoked."""
        ...

    async def keepalive(self, lease: int) -> bool:
        """Refresh a lease; False if it has already expired."""
        ...

    async def revoke(self, lease: int) -> None: ...

    async def close(self) -> None: ...
