"""The agent's copy of its replica on disk, so a restarted agent that cannot reach the server
programs the kernel from what it last knew (the calculation itself, `tether.calc.replica`, does no I/O)."""

from __future__ import annotations

import os
import tempfile

import pydantic_core

from tether.calc.replica import Replica


def save(rep: Replica, path: str) -> None:
    """Write the replica atomically (a temporary file renamed over the old one)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".replica.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(rep.encoded_parts())
    os.replace(tmp, path)


def load(rep: Replica, path: str) -> bool:
    """Fill `rep` from the file; False (and `rep` untouched) when there is none or it is unreadable."""
    # pydantic's JSON parser keeps one copy of each distinct short string (names, labels) for the
    # whole file, where `json` made one per occurrence: 10 MB less at the peak with 10,000 endpoints
    try:
        with open(path, "rb") as f:
            rep.load_snapshot(pydantic_core.from_json(f.read()), consume=True)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    rep.synced = False  # usable for the datapath, but not a fresh sync
    return True
