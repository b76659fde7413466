"""The agent's copy of its replica on disk, so a restarted agent that cannot reach the server
programs the kernel from what it last knew (the calculation itself, `tether.calc.replica`, does no I/O).

A base and a log, as etcd's snapshot + WAL: writing the whole replica is O(objects) (~48 ms of CPU
at 10,000 endpoints), too much per change, so between full writes only the watch events applied
since are appended to the log next to the base (one JSON line per event, O(change)):

- `replica.json`: the replica in full (`Replica.encoded_parts`), written after a list (the events
  before it are not in any log), when compacting, and at stop when the log is long;
- `replica.log`: a first line `{"base_revision": N}` naming the base it follows, then the events as
  `Replica.apply_event` took them. Compacted (base rewritten, log emptied) once it outgrows the base,
  so its replay never costs more than the base's parse and its writes add up to O(1) per change.

Loading reads the base, then replays the log through `apply_event`. A torn or unreadable line (a crash
mid-write) ends the replay and the load still succeeds (the agent then watches from the revision it
reached); a log whose first line names another base (a crash between the base's rename and the log's
reset) is ignored. Either way the next save writes everything, so no event goes after a broken line.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

import pydantic_core

from tether.calc.replica import Replica

COMPACT_AT = 1.0  # compact when the log (written and waiting) is larger than this share of the base
FINAL_COMPACT_AT = 0.25  # at stop: a shorter log is worth folding in, the restart replays less


def log_path(path: str) -> str:
    """The log that goes with the base at `path` (replica.json -> replica.log)."""
    return os.path.splitext(path)[0] + ".log"


def _write_atomic(path: str, parts: Iterable[str]) -> int:
    """Write a temporary file renamed over `path` (never half a file at `path`); the bytes written."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".replica.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(parts)
            f.flush()
            size = os.fstat(f.fileno()).st_size
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size


def _header(revision: int) -> str:
    return json.dumps({"base_revision": revision}) + "\n"


class DiskCopy:
    """The base + log pair of one agent: `record` each applied watch event, `save` now and then."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.log_path = log_path(path)
        self._pending: list[str] = []  # event lines recorded since the last save
        self._pending_bytes = 0
        self._log_bytes = 0  # the log on disk, its first line included
        self._base_bytes = 0
        # the next save writes the base: nothing on disk is known to lead to the replica
        self._full = True
        self.full_writes = 0  # counted for tests and benchmarks
        self.appends = 0

    @property
    def pending_bytes(self) -> int:
        """The bytes of the events recorded and not yet written."""
        return self._pending_bytes

    def record(self, ev: dict[str, Any]) -> None:
        """Note a watch event the replica has just applied (exactly the dict given to `apply_event`)."""
        if self._full:
            return  # the next save writes the replica whole, this event included
        line = json.dumps(ev, separators=(",", ":")) + "\n"  # ASCII: its length is its size
        self._pending.append(line)
        self._pending_bytes += len(line)

    def relisted(self) -> None:
        """The replica was loaded from a snapshot (a re-list): no log leads there, write it whole."""
        self._full = True
        self._pending.clear()
        self._pending_bytes = 0

    def save(self, rep: Replica, compact_at: float = COMPACT_AT) -> None:
        """Append the recorded events, or write the base anew when the log would outgrow
        `compact_at` times the base (or nothing on disk leads to the replica)."""
        if self._full or self._log_bytes + self._pending_bytes > compact_at * self._base_bytes:
            self.save_full(rep)
        elif self._pending:
            self._full = True  # until the lines are all written: a failure leaves a torn log
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.writelines(self._pending)
            self._log_bytes += self._pending_bytes
            self._pending.clear()
            self._pending_bytes = 0
            self._full = False
            self.appends += 1

    def save_full(self, rep: Replica) -> None:
        """Write the base, then a log holding only its first line. A crash in between leaves the old
        log, which names the old base: ignored at load."""
        self._full = True
        self._pending.clear()
        self._pending_bytes = 0
        self._base_bytes = _write_atomic(self.path, rep.encoded_parts())
        self._log_bytes = _write_atomic(self.log_path, [_header(rep.revision)])
        self._full = False
        self.full_writes += 1

    def load(self, rep: Replica) -> bool:
        """Fill `rep` from the base and the log; False (and `rep` untouched) when there is no base or
        it is unreadable. The next save appends when the log was whole and followed the base."""
        # pydantic's JSON parser keeps one copy of each distinct short string (names, labels) for the
        # whole file, where `json` made one per occurrence: 10 MB less at the peak with 10,000 endpoints
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            rep.load_snapshot(pydantic_core.from_json(data), consume=True)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self._base_bytes = len(data)
        del data
        rep.synced = False  # usable for the datapath, but not a fresh sync
        self._full = not self._replay(rep)
        return True

    def _replay(self, rep: Replica) -> bool:
        """Apply the log's events; True when it followed the base and every line was whole."""
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return False
        *whole, torn = lines  # the text after the last newline: empty unless a write was cut short
        try:
            first = json.loads(whole[0]) if whole else None
        except ValueError:
            return False
        if not isinstance(first, dict) or first.get("base_revision") != rep.revision:
            return False  # a log of another base
        size = len(whole[0]) + 1
        for line in whole[1:]:
            try:
                rep.apply_event(json.loads(line))
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                return False  # a crash mid-write: what came before it stands
            size += len(line) + 1
        self._log_bytes = size
        return not torn


def save(rep: Replica, path: str) -> None:
    """Write the replica whole (the base, with an empty log): for a copy made outside an agent."""
    DiskCopy(path).save_full(rep)


def load(rep: Replica, path: str) -> bool:
    """Fill `rep` from the base at `path` and its log (see `DiskCopy.load`)."""
    return DiskCopy(path).load(rep)
