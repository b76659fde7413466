"""Docker networks as a Docker user expects them, with the agents' own host credentials (no admin
token): `docker network create` once makes the network on every Docker host; without Tether's IPAM it
is refused with the command to use; `docker network rm` removes what Docker made and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fixtures.lab import make_lab, unique
from tether.client import ApiError
from tether.lab.cluster import Lab, wait_for
from tether.lab.dockerd import IMAGE, Dockerd, available
from tether.model import Network, Subnet

pytestmark = [pytest.mark.lab, pytest.mark.client]

GREEN, ADOPTED = "10.87.0.0/16", "10.88.0.0/16"


@dataclass
class Env:
    lab: Lab
    d: dict[str, Dockerd]

    def names(self, host: str) -> list[str]:
        return self.d[host].docker("network", "ls", "--format", "{{.Name}}").stdout.split()

    def ping_by_ip(self, host: str, name: str, ip: str, within: float = 15) -> bool:
        def ok() -> bool:
            return self.d[host].docker("exec", name, "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0
        try:
            wait_for(ok, within, f"{name} on {host} to reach {ip}")
            return True
        except Exception:  # noqa: BLE001 - the caller asserts
            return False


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[Env]:
    why = available()
    if why:
        pytest.skip(why)
    lab = make_lab(hosts=3)  # agents hold their host credentials; h3's dockerd starts late
    d: dict[str, Dockerd] = {}
    root = tmp_path_factory.mktemp("dockernets")
    try:
        for h in ("h1", "h2", "h3"):
            d[h] = Dockerd(lab.host(h).ns, root / h, lab.docker_plugin_dir(h), lab.docker_socket(h))
        for h in ("h1", "h2"):
            d[h].start()
            d[h].import_busybox()
        yield Env(lab, d)
    finally:
        for x in d.values():
            x.cleanup()
        lab.down()


def test_a_network_created_once_is_usable_on_every_docker_host_and_rm_leaves_nothing(env: Env) -> None:
    green = unique("green")
    env.d["h1"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", GREEN, green)
    wait_for(lambda: green in env.names("h2"), 30, "the network created on h1 to appear on h2")
    net = env.lab.client().get("Network", green)
    assert net.labels == {"tether.io/created-by": "docker"}  # made with h1's own credential
    a, b = unique("a"), unique("b")
    env.d["h1"].docker("run", "-d", "--name", a, "--network", green, IMAGE, "sleep", "100000")
    env.d["h2"].docker("run", "-d", "--name", b, "--network", green, IMAGE, "sleep", "100000")
    fmt = f"{{{{(index .NetworkSettings.Networks \"{green}\").IPAddress}}}}"
    ip_b = env.d["h2"].docker("inspect", "-f", fmt, b).stdout.strip()
    assert ip_b.startswith("10.87.")
    assert env.ping_by_ip("h1", a, ip_b)
    # no --dns nor --dns-search: Docker's embedded resolver forwards `b` to the agent's DNS (the
    # daemon's --dns), which answers it in a's network
    wait_for(lambda: ip_b in env.d["h1"].docker("exec", a, "nslookup", b, check=False).stdout, 20,
             f"{b} (on h2) to resolve by its bare name in {a} (on h1)")
    assert env.ping_by_ip("h1", a, b)
    env.d["h1"].docker("rm", "-f", a)
    wait_for(lambda: len(env.lab.client().list("Endpoint", network=green)) == 1, 20, "a's endpoint to go")
    # b on h2 still uses it: dockerd drops h1's copy anyway (libnetwork ignores a driver's refusal
    # here), the Tether network stays and h1's agent puts its copy back
    env.d["h1"].docker("network", "rm", green, check=False)
    assert env.lab.client().get("Network", green).subnets[0].cidr == GREEN
    wait_for(lambda: green in env.names("h1"), 30, "h1's copy to come back")
    env.d["h2"].docker("rm", "-f", b)
    wait_for(lambda: not env.lab.client().list("Endpoint", network=green), 20, "the containers' endpoints to go")
    env.d["h1"].docker("network", "rm", green)
    with pytest.raises(ApiError) as e:
        env.lab.client().get("Network", green)
    assert e.value.status == 404
    wait_for(lambda: green not in env.names("h2"), 30, "h2's copy of the network to go")


def test_docker_network_create_without_tether_ipam_is_refused_with_the_command_to_use(env: Env) -> None:
    name = unique("noipam")
    r = env.d["h1"].docker("network", "create", "-d", "tether", name, check=False)
    assert r.returncode != 0 and "--ipam-driver tether" in r.stderr, r.stderr
    assert name not in env.names("h1")
    assert name not in {n.name for n in env.lab.client().list("Network")}


def test_docker_network_rm_keeps_a_tether_network_it_adopted(env: Env) -> None:
    name = unique("adm")
    env.lab.client().create_network(Network(name=name, subnets=[Subnet(cidr=ADOPTED)]))
    try:
        env.d["h1"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", ADOPTED, name)
        assert name not in env.names("h2")  # not Docker's: not copied
        env.d["h1"].docker("network", "rm", name)
        assert env.lab.client().get("Network", name).subnets[0].cidr == ADOPTED
    finally:
        env.lab.client().delete("Network", name)


def test_a_dockerd_started_later_gets_the_networks_made_before(env: Env) -> None:
    early = unique("early")
    env.d["h1"].docker("network", "create", "-d", "tether", "--ipam-driver", "tether", "--subnet", "10.89.0.0/16",
                       early)
    wait_for(lambda: early in env.names("h2"), 30, "the network on h2")
    try:
        env.d["h3"].start()  # nothing changes in the cluster meanwhile: the agent's periodic copy brings it
        wait_for(lambda: early in env.names("h3"), 40, "the network in h3's dockerd, started after it was made")
    finally:
        env.d["h1"].docker("network", "rm", early)
    wait_for(lambda: early not in env.names("h3") and early not in env.names("h2"), 40, "the copies to go")
