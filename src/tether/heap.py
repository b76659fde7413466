"""The cyclic garbage collector's settings for Tether's long-running processes (agent, server)."""

from __future__ import annotations

import gc
from typing import Any

# Net new container objects (allocated minus freed) that set off a collection of the youngest
# generation; Python's default is 700
YOUNG_THRESHOLD = 50_000


def settle() -> None:
    """Call once start-up is done.

    What start-up created (modules, classes, functions: ~60,000 objects) lives as long as the
    process: frozen out of the collector's sight, a full collection takes 0.6 ms instead of 20 ms, a
    pause that otherwise lands on a CNI or DNS answer every few seconds under load.

    The youngest generation is collected after YOUNG_THRESHOLD new objects instead of 700. Nearly
    everything Tether allocates is freed by reference counting, but a plan with a few hundred
    endpoints holds more than 700 temporaries at its peak, so each plan set off several collections
    that examined them, found nothing to free, and pushed them into older generations to be examined
    again: in the agent, 4 ms of CPU per pod added with 500 pods present (bench/cni.py), 0.3 ms with
    none. Cyclic garbage still goes, at most 50,000 objects later."""
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 10, 10)


def trim() -> None:
    """Hand the heap's free memory back to the system. glibc keeps what a big transient freed (the
    agent's parse of a 10,000-object snapshot: ~40 MB of dicts, dropped once the models are built),
    so without this the agent's RSS stays at that peak for its whole life."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None  # glibc's malloc_trim once looked up, False: there is none
