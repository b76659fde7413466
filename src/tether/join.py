"""Joining a host, as kubeadm does: a short-lived bootstrap token (made by the admin with `tether
host token create`) is exchanged once for the host's own credential, kept on the host in a 0600 file.

Trust in the server comes first: the CA file given (`--ca-file`), or the server's CA fetched over an
unverified connection and accepted only if the hash of its public key equals the pin the admin
handed out with the token (`--ca-hash sha256:...`), so a man in the middle cannot pose as the server.
"""

from __future__ import annotations

import os

CREDENTIAL_FILE = "credential"
CA_FILE = "ca.crt"


class JoinError(Exception):
    pass


def write_private(path: str, data: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def fetch_pinned_ca(servers: list[str], pin: str) -> bytes:
    """The server's CA, trusted only if its public key hashes to `pin`."""
    import httpx

    from tether.trust import ca_hash

    if not pin.startswith("sha256:"):
        raise JoinError(f"--ca-hash {pin!r} must look like sha256:<64 hex digits> (tether host token create prints it)")
    problems = []
    for s in servers:
        if not s.startswith("https://"):
            continue
        try:
            r = httpx.get(s.rstrip("/") + "/ca.crt", verify=False, timeout=10)  # checked against the pin below
        except httpx.HTTPError as e:
            problems.append(f"{s}: {e}")
            continue
        if r.status_code != 200:
            problems.append(f"{s}: HTTP {r.status_code}")
            continue
        got = ca_hash(r.content)
        if got != pin.lower():
            raise JoinError(f"the CA served by {s} hashes to {got}, not the pinned {pin}: this is not your cluster's "
                            "server (or the pin is wrong); nothing was sent to it")
        return r.content
    raise JoinError("could not fetch the CA from any https:// server (" + ("; ".join(problems) or "none given") + ")")


def join(servers: list[str], bootstrap_token: str, host: str, state_dir: str, ca_file: str | None = None,
         ca_pin: str | None = None) -> tuple[str, str | None]:
    """Exchange the bootstrap token for this host's credential; returns (credential path, CA path)."""
    from tether.client import TetherClient

    https = any(s.startswith("https://") for s in servers)
    if https and not ca_file:
        if not ca_pin:
            raise JoinError("joining over https needs the cluster CA: --ca-hash sha256:... (printed by `tether host "
                            "token create`) or --ca-file PATH")
        ca_path = os.path.join(state_dir, CA_FILE)
        pem = fetch_pinned_ca(servers, ca_pin)
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        with open(ca_path + ".tmp", "wb") as f:
            f.write(pem)
        os.replace(ca_path + ".tmp", ca_path)
        ca_file = ca_path
    c = TetherClient(servers, bootstrap_token, ca_file=ca_file)
    try:
        answer = c.request("POST", "/api/v1/join", json={"host": host})
    finally:
        c.close()
    path = os.path.join(state_dir, CREDENTIAL_FILE)
    write_private(path, answer["credential"] + "\n")
    return path, ca_file
