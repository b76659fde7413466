"""One admin credential for every server on a store: the first server stores its token's SHA-256,
the others check requests against that hash, so a second server needs no file copied by hand.

The hash, not the token, goes into the store: whoever can read etcd learns nothing that opens the
API. The token itself stays in the first server's state dir (file 'token'), where operators find it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass

from tether.model import PREFIX
from tether.server.auth import load_or_create_token
from tether.store.base import Conflict, Store

log = logging.getLogger("tether.server")
ADMIN_TOKEN_KEY = PREFIX + "auth/admin-token-sha256"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def presented_token(headers) -> str | None:
    """`Authorization: Bearer <token>`, or `X-Auth-Token: <token>` as Neutron clients send it."""
    auth = headers.get("authorization") or ""
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    x = headers.get("x-auth-token")
    return x.strip() if x else None


@dataclass(frozen=True)
class AdminCredential:
    sha256: str

    @classmethod
    def of_token(cls, token: str) -> AdminCredential:
        return cls(digest(token))

    def ok(self, headers) -> bool:
        token = presented_token(headers)
        return token is not None and hmac.compare_digest(digest(token), self.sha256)


async def shared_credential(store: Store, state_dir: str) -> AdminCredential:
    """The cluster's admin credential: the one in the store, or (first server) this server's token,
    made now if it has none, and stored for the servers that come after."""
    path = os.path.join(state_dir, "token")
    for _ in range(3):
        kv = await store.get(ADMIN_TOKEN_KEY)
        if kv is not None:
            shared = AdminCredential(kv.value.decode())
            local = _read(path)
            if local is None:
                log.warning("admin token: the one shared through the store (set by the first server on it); this "
                            "server has no copy: use the first server's token (its state dir, file 'token')")
            elif digest(local) != shared.sha256:
                log.warning("the token in %s is not the cluster's admin token (shared through the store by the "
                            "first server): it is refused; use the first server's token, or delete %s", path, path)
            return shared
        token = load_or_create_token(state_dir)
        try:
            await store.create(ADMIN_TOKEN_KEY, digest(token).encode())
            return AdminCredential.of_token(token)
        except Conflict:  # another server stored its token first
            continue
    raise RuntimeError("could not agree on an admin token with the other servers")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
