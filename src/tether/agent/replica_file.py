"""The agent's copy of its replica on disk, so a restarted agent that cannot reach the server
programs the kernel from what it last knew (the calculation itself, `tether.calc.replica`, does no I/O)."""

from __future__ import annotations

import json
import os
import tempfile

from tether.calc.replica import Replica


def save(rep: Replica, path: str) -> None:
    """Write the replica atomically (a temporary file renamed over the old one)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".replica.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(rep.encoded())
    os.replace(tmp, path)


def load(rep: Replica, path: str) -> bool:
    """Fill `rep` from the file; False (and `rep` untouched) when there is none or it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            rep.load_snapshot(json.load(f), consume=True)
    except (OSError, ValueError, KeyError):
        return False
    rep.synced = False  # usable for the datapath, but not a fresh sync
    return True
