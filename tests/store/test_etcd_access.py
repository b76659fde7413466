"""Issue 23: Tether talks to an etcd that requires client TLS (--client-cert-auth) and/or etcd
user authentication, and a wrong CA, a refused certificate, a wrong password or a user without
permission on Tether's keys stops `tether server` at start with one line and exit code 78."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fixtures.etcd import EtcdProc, EtcdTlsFiles, free_port, make_etcd_tls, start_etcd
from tests.fixtures.server import start_server
from tether.model import Network, Subnet
from tether.store.etcd import EXIT_CONFIG, EtcdAccess, EtcdRefused, EtcdStore

PASSWORD = "s3cret-etcd-pw"


@pytest.fixture
def tls_etcd(tmp_path) -> Iterator[tuple[EtcdProc, EtcdTlsFiles]]:
    """etcd serving clients only over TLS, and only to certificates from its CA."""
    tls = make_etcd_tls(str(tmp_path / "certs"))
    e = start_etcd(str(tmp_path), tls=tls)
    try:
        yield e, tls
    finally:
        e.stop(signal.SIGKILL)


def enable_auth(e: EtcdProc, *extra_roles: tuple[str, ...]) -> None:
    """etcd auth on: root, and a user `tether` whose role may read and write /tether/ only."""
    for cmd in (("user", "add", "root:rootpw"), ("user", "grant-role", "root", "root"), ("role", "add", "tether"),
                ("role", "grant-permission", "tether", "readwrite", "/tether/", "--prefix=true"),
                ("user", "add", f"tether:{PASSWORD}"), ("user", "grant-role", "tether", "tether"),
                *extra_roles, ("auth", "enable")):
        e.ctl(*cmd, check=True)
    e.ctl_auth = ("--user", "root:rootpw")


@pytest.fixture
def auth_etcd(tmp_path) -> Iterator[EtcdProc]:
    """Plain etcd with auth on and short-lived auth tokens (they expire after 2 s unused)."""
    e = start_etcd(str(tmp_path), "e0", "--auth-token", "simple", "--auth-token-ttl", "2")
    enable_auth(e, ("user", "add", "nobody:nobodypw"))
    try:
        yield e
    finally:
        e.stop(signal.SIGKILL)


async def round_trip(store: EtcdStore) -> None:
    """A write, a read, a watch event and a lease: what a server does with its store."""
    rev = await store.create("/tether/v1/networks/n1", b"{}")
    assert (await store.get("/tether/v1/networks/n1")).mod_revision == rev
    watch = store.watch("/tether/v1/", rev)
    await store.put("/tether/v1/networks/n2", b"{}")
    ev = await asyncio.wait_for(anext(watch), 10)
    assert ev.key == "/tether/v1/networks/n2"
    await watch.aclose()
    lease = await store.grant_lease(5)
    assert await store.keepalive(lease)
    assert await store.problems() == []


async def test_the_store_works_over_client_tls_with_a_client_certificate(tls_etcd) -> None:
    e, tls = tls_etcd
    store = EtcdStore([e.endpoint], access=EtcdAccess(tls.ca, tls.client_cert, tls.client_key))
    try:
        await round_trip(store)
    finally:
        await store.close()


async def test_with_auth_on_the_client_certificates_common_name_is_the_etcd_user(tls_etcd) -> None:
    e, tls = tls_etcd
    enable_auth(e)  # the client certificate's CN is "tether", a user whose role covers /tether/ only
    store = EtcdStore([e.endpoint], access=EtcdAccess(tls.ca, tls.client_cert, tls.client_key))
    try:
        await round_trip(store)
        with pytest.raises(EtcdRefused, match="readwrite on the prefix /tether/"):
            await store.put("/elsewhere", b"x")
    finally:
        await store.close()


@pytest.mark.parametrize("wrong", ["other CA", "no client certificate", "foreign client certificate"])
async def test_a_wrong_ca_or_client_certificate_is_refused_at_once_not_retried(tls_etcd, tmp_path, wrong) -> None:
    e, tls = tls_etcd
    other = make_etcd_tls(str(tmp_path / "other"))
    access = {"other CA": EtcdAccess(other.ca, tls.client_cert, tls.client_key),
              "no client certificate": EtcdAccess(tls.ca),
              "foreign client certificate": EtcdAccess(tls.ca, other.client_cert, other.client_key)}[wrong]
    store = EtcdStore([e.endpoint], access=access, retry_for=30)
    try:
        with pytest.raises(EtcdRefused) as err:
            await asyncio.wait_for(store.revision(), 10)  # not 30 s of retries: the answer will not change
    finally:
        await store.close()
    assert err.value.exit_code == EXIT_CONFIG
    assert ("--etcd-cacert" if wrong == "other CA" else "--etcd-cert") in str(err.value)


async def test_one_member_that_refuses_the_configuration_does_not_stop_the_store_using_another(
        tls_etcd, tmp_path) -> None:
    e, tls = tls_etcd
    other_tls = make_etcd_tls(str(tmp_path / "other"))
    other = start_etcd(str(tmp_path), "e1", tls=other_tls)  # its certificate is from another CA
    try:
        store = EtcdStore([other.endpoint, e.endpoint], access=EtcdAccess(tls.ca, tls.client_cert, tls.client_key))
        try:
            await store.put("/tether/v1/x", b"1")
            assert store.endpoints[store._current] == e.endpoint
        finally:
            await store.close()
    finally:
        other.stop(signal.SIGKILL)


async def test_the_store_works_as_an_etcd_user_and_authenticates_again_when_the_token_expires(auth_etcd) -> None:
    store = EtcdStore([auth_etcd.endpoint], access=EtcdAccess(user="tether", password=PASSWORD))
    try:
        await round_trip(store)
        await asyncio.sleep(4)  # the auth token (TTL 2 s) expired while unused
        assert await store.get("/tether/v1/networks/n1") is not None
        await store.put("/tether/v1/networks/n3", b"{}")
    finally:
        await store.close()


@pytest.mark.parametrize("user,password,says", [
    ("tether", "wrong", "check --etcd-user and --etcd-password-file"),
    (None, None, "needs a user"),
    ("nobody", "nobodypw", "grant the etcd user a role with readwrite on the prefix /tether/"),
])
async def test_a_wrong_password_no_user_or_no_permission_is_refused_with_what_to_fix(
        auth_etcd, user, password, says) -> None:
    store = EtcdStore([auth_etcd.endpoint], access=EtcdAccess(user=user, password=password), retry_for=30)
    try:
        with pytest.raises(EtcdRefused, match=says):
            await asyncio.wait_for(store.get("/tether/v1/networks/n1"), 10)
    finally:
        await store.close()


def run_server(store_url: str, state_dir: str, *flags: str, entry: str = "tether.server.main"
               ) -> subprocess.CompletedProcess:
    cmd = [entry] if entry == "tether.server.main" else [entry, "server"]
    return subprocess.run([sys.executable, "-m", *cmd, "--store", store_url, "--listen",
                           f"127.0.0.1:{free_port()}", "--state-dir", state_dir, *flags],
                          capture_output=True, text=True, timeout=60)


def test_server_serves_over_a_tls_etcd_with_auth_and_refuses_a_wrong_ca_or_password(tmp_path) -> None:
    """The whole path through `tether server`: client TLS and etcd auth together; each mistake is
    one line on stderr and exit code 78, no traceback, no endless wait."""
    tls = make_etcd_tls(str(tmp_path / "certs"))
    other = make_etcd_tls(str(tmp_path / "other"))
    e = start_etcd(str(tmp_path), tls=tls)
    try:
        enable_auth(e)
        pw = tmp_path / "etcd-password"
        pw.write_text(PASSWORD + "\n")
        bad_pw = tmp_path / "bad-password"
        bad_pw.write_text("nope\n")
        good = ("--etcd-cacert", tls.ca, "--etcd-cert", tls.client_cert, "--etcd-key", tls.client_key,
                "--etcd-user", "tether", "--etcd-password-file", str(pw))
        srv = start_server(e.url, str(tmp_path / "s1"), *good)
        try:
            srv.client().create_network(Network(name="blue", subnets=[Subnet(cidr="10.9.0.0/24")]))
            with srv.http() as c:
                assert c.get("/api/v1/networks/blue").status_code == 200
                assert c.get("/healthz").json()["ok"] is True
        finally:
            srv.stop()
        assert e.ctl("get", "--prefix", "--keys-only", "/tether/v1/networks/").stdout.strip()

        for name, flags, says in [
            ("wrong CA", ("--etcd-cacert", other.ca, *good[2:]), "is not signed by the CA of --etcd-cacert"),
            ("wrong password", (*good[:-1], str(bad_pw)), "check --etcd-user and --etcd-password-file"),
            ("no client certificate", ("--etcd-cacert", tls.ca, *good[6:]), "refused Tether's client certificate"),
            ("unreadable password file", (*good[:-1], str(tmp_path / "missing")), "No such file or directory"),
        ]:
            r = run_server(e.url, str(tmp_path / ("s-" + name.replace(" ", "-"))), *flags)
            assert r.returncode == EXIT_CONFIG, (name, r.stderr[-2000:])
            assert says in r.stderr, (name, r.stderr[-2000:])
            assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        # the same through `tether server` (the CLI command)
        r = run_server(e.url, str(tmp_path / "s-cli"), *good[:-1], str(bad_pw), entry="tether.cli.main")
        assert r.returncode == EXIT_CONFIG and "check --etcd-user" in r.stderr, r.stderr[-2000:]
    finally:
        e.stop(signal.SIGKILL)
    assert not os.path.exists(str(tmp_path / "s-wrong-CA" / "server.sock"))
