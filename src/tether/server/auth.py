"""Bearer-token authentication: a token made at first start, kept in a 0600 file."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets

OPEN_PATHS = {"/", "/healthz", "/metrics"}


def load_or_create_token(state_dir: str) -> str:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "token")
    if os.path.exists(path):
        with open(path) as f:
            token = f.read().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def token_ok(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[7:].strip().encode(), token.encode())


def request_token_ok(headers, token: str) -> bool:
    """`Authorization: Bearer <token>`, or `X-Auth-Token: <token>` as Neutron clients send it."""
    if token_ok(headers.get("authorization"), token):
        return True
    x = headers.get("x-auth-token")
    return bool(x) and hmac.compare_digest(x.strip().encode(), token.encode())


def is_local_listen(addr: str) -> bool:
    """True for unix sockets and loopback TCP addresses (the only ones --insecure may serve)."""
    if addr.startswith("unix://"):
        return True
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
