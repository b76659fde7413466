"""Issue 23: every server on one store serves a certificate from one cluster CA, with no file copied
by hand: the first server's CA certificate goes into the store, its key stays on that server, and
the other servers get their certificates signed through signing requests in the store. An agent
that trusts the CA of server 1 (/ca.crt) fails over to server 2."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
from collections.abc import Iterator

import httpx
import pytest

from tests.fixtures.etcd import EtcdProc, free_port, start_etcd
from tests.fixtures.server import ServerProc, start_server
from tether.client import TetherClient
from tether.model import Network, Subnet
from tether.server.tls import CLUSTER_CA, CSR_PREFIX, join_cluster_ca, sign_requests
from tether.store import open_store

LISTEN = ["127.0.0.1:7443"]


def pem(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def verifies(cert_path, ca_path) -> bool:
    from cryptography import x509

    try:
        x509.load_pem_x509_certificate(pem(cert_path)).verify_directly_issued_by(
            x509.load_pem_x509_certificate(pem(ca_path)))
        return True
    except Exception:  # noqa: BLE001 - any failure: not signed by it
        return False


async def test_the_first_server_publishes_its_ca_and_a_second_gets_its_certificate_signed_through_the_store(
        tmp_path) -> None:
    store = open_store(f"sqlite://{tmp_path}/tether.db")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    try:
        assert await join_cluster_ca(store, a, LISTEN, []) is True  # made the CA, holds its key
        assert (await store.get(CLUSTER_CA)).value == pem(f"{a}/ca.crt")
        signer = asyncio.create_task(sign_requests(store, a))
        try:
            assert await join_cluster_ca(store, b, LISTEN, ["b.example"], wait=20) is False
        finally:
            signer.cancel()
        assert pem(f"{b}/ca.crt") == pem(f"{a}/ca.crt")
        assert not os.path.exists(f"{b}/ca.key"), "the CA key must not travel"
        assert verifies(f"{b}/server.crt", f"{a}/ca.crt")
        assert oct(os.stat(f"{b}/server.key").st_mode & 0o777) == "0o600"
        assert (await store.list(CSR_PREFIX)).items == []
        assert b"PRIVATE KEY" not in b"".join(kv.value for kv in (await store.list("/tether/auth/")).items)
        # the next start finds its certificate valid and asks for nothing
        assert await join_cluster_ca(store, b, LISTEN, ["b.example"], wait=0) is False
    finally:
        await store.close()


async def test_without_a_signer_a_new_server_stops_with_what_to_do(tmp_path) -> None:
    store = open_store(f"sqlite://{tmp_path}/tether.db")
    try:
        await join_cluster_ca(store, str(tmp_path / "a"), LISTEN, [])
        with pytest.raises(SystemExit, match="start the server whose state dir has ca.key"):
            await join_cluster_ca(store, str(tmp_path / "b"), LISTEN, [], wait=1)
    finally:
        await store.close()


async def test_a_state_dir_of_another_clusters_ca_is_refused_not_silently_swapped(tmp_path) -> None:
    one = open_store(f"sqlite://{tmp_path}/one.db")
    two = open_store(f"sqlite://{tmp_path}/two.db")
    try:
        await join_cluster_ca(one, str(tmp_path / "a"), LISTEN, [])
        await join_cluster_ca(two, str(tmp_path / "b"), LISTEN, [])
        with pytest.raises(SystemExit, match="is not the CA of the servers on this store"):
            await join_cluster_ca(two, str(tmp_path / "a"), LISTEN, [])
    finally:
        await one.close()
        await two.close()


@pytest.fixture
def etcd(tmp_path) -> Iterator[EtcdProc]:
    e = start_etcd(str(tmp_path))
    try:
        yield e
    finally:
        e.stop(signal.SIGKILL)


def https_server(etcd: EtcdProc, state_dir: str) -> tuple[ServerProc, str]:
    port = free_port()
    return start_server(etcd.url, state_dir, "--listen", f"https://127.0.0.1:{port}"), f"https://127.0.0.1:{port}"


def test_an_agent_trusting_server_1s_ca_fails_over_to_server_2_on_the_same_etcd(etcd, tmp_path) -> None:
    s1, url1 = https_server(etcd, str(tmp_path / "s1"))
    s2 = None
    try:
        s2, url2 = https_server(etcd, str(tmp_path / "s2"))  # its state dir is empty: no file copied
        ca = tmp_path / "agent-ca.crt"
        ca.write_bytes(httpx.get(url1 + "/ca.crt", verify=False).content)  # what `tether host join` pins
        assert httpx.get(url2 + "/ca.crt", verify=False).content == ca.read_bytes()
        client = TetherClient(f"{url1},{url2}", s1.token, ca_file=str(ca))
        client.create_network(Network(name="blue", subnets=[Subnet(cidr="10.9.0.0/24")]))
        assert client.servers[client.current] == url1
        s1.stop()
        assert [n.name for n in client.list("Network")] == ["blue"]
        assert client.servers[client.current] == url2
        # server 2's certificate verifies against server 1's CA
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as h:
            assert h.get(url2 + "/healthz").status_code == 200
    finally:
        s1.stop()
        if s2 is not None:
            s2.stop()
