"""Netlink sockets bound to another network namespace, without forking.

pyroute2's `IPRoute(netns=...)` forks a helper process; inside the agent's asyncio loop that child
inherits the loop's signal wake-up pipe, and its exit is read by the parent as SIGTERM. Instead the
calling (worker) thread enters the namespace just long enough to open the socket, then returns:
the socket stays in the namespace it was created in, and no other thread is affected.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_lock = threading.Lock()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_ipr(netns: str | None = None) -> IPRoute:
    """An IPRoute in `netns` (a path like /var/run/netns/x, or a name under it); None: this one."""
    if not netns:
        return IPRoute()
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    target = os.open(path, os.O_RDONLY)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return IPRoute()
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


@contextmanager
def ipr_in(netns: str | None = None) -> Iterator[IPRoute]:
    ipr = open_ipr(netns)
    try:
        yield ipr
    finally:
        ipr.close()


def socket_in(netns: str | None, family: int, type_: int):
    """A socket created inside `netns` (same trick as open_ipr: the thread enters and comes back)."""
    import socket

    if not netns:
        return socket.socket(family, type_)
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    target = os.open(path, os.O_RDONLY)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        with _lock:
            _setns(target)
            try:
                return socket.socket(family, type_)
            finally:
                _setns(own)
    finally:
        os.close(target)
        os.close(own)
