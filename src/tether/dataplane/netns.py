"""Netlink sockets bound to another network namespace, without forking.

pyroute2's `IPRoute(netns=...)` forks a helper process; inside the agent's asyncio loop that child
inherits the loop's signal wake-up pipe, and its exit is read by the parent as SIGTERM. Instead the
calling (worker) thread enters the namespace just long enough to open the socket, then returns:
the socket stays in the namespace it was created in, and no other thread is affected.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pyroute2.iproute import IPRoute

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def opened_in(netns: str, make: Callable[[], T]) -> T:
    """What `make()` opens (a socket), opened inside `netns` (a path like /var/run/netns/x, or a
    name under it): this thread enters the namespace for the call and comes back."""
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    target = os.open(path, os.O_RDONLY)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            return make()
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def open_ipr(netns: str | None = None) -> IPRoute:
    """An IPRoute in `netns` (a path, or a name under /var/run/netns); None: this thread's."""
    return opened_in(netns, IPRoute) if netns else IPRoute()


@contextmanager
def ipr_in(netns: str | None = None) -> Iterator[IPRoute]:
    ipr = open_ipr(netns)
    try:
        yield ipr
    finally:
        ipr.close()


def socket_in(netns: str | None, family: int, type_: int) -> socket.socket:
    """A socket created inside `netns` (None: this thread's namespace)."""
    return opened_in(netns, lambda: socket.socket(family, type_)) if netns else socket.socket(family, type_)
