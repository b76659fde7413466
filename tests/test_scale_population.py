"""The scale lab's generated population (tether.lab.scale) and host count limits, without root."""

from __future__ import annotations

from collections import Counter

import pytest

from tether.lab.cluster import MAX_HOSTS, check_hosts
from tether.lab.scale import LARGE, SMALL, Size, objects


def test_the_same_size_gives_the_same_objects_so_two_runs_compare() -> None:
    a, b = objects(SMALL, ["h1", "h2"]), objects(SMALL, ["h1", "h2"])
    assert [e.model_dump(exclude={"id", "created_at"}) for e in a.endpoints] == \
        [e.model_dump(exclude={"id", "created_at"}) for e in b.endpoints]
    assert [p.spec for p in a.policies] == [p.spec for p in b.policies]


def test_endpoints_spread_evenly_over_the_hosts() -> None:
    hosts = [f"h{i}" for i in range(1, 101)]
    pop = objects(LARGE, hosts)
    assert len(pop.endpoints) == 10_000 and len(pop.policies) == 1_000 and len(pop.services) == 500
    assert set(Counter(e.host for e in pop.endpoints).values()) == {100}
    assert len({(e.namespace, e.name) for e in pop.endpoints}) == 10_000


def test_every_policy_and_service_selects_generated_endpoints_and_none_the_default_namespace() -> None:
    pop = objects(Size(10, 1000, 100, 50), [f"h{i}" for i in range(1, 11)])
    apps = {(e.namespace, e.labels["app"]) for e in pop.endpoints}
    for p in pop.policies:
        assert p.namespace != "default"
        assert (p.namespace, p.spec["podSelector"]["matchLabels"]["app"]) in apps
        peer = p.spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app"]
        assert (p.namespace, peer) in apps
    for s in pop.services:
        assert s.namespace != "default" and (s.namespace, s.selector["app"]) in apps


def test_a_lab_of_more_hosts_than_its_underlay_numbers_is_refused() -> None:
    check_hosts(MAX_HOSTS)
    with pytest.raises(ValueError, match=f"1 to {MAX_HOSTS}"):
        check_hosts(MAX_HOSTS + 1)


def test_a_big_lab_raises_the_shared_neighbour_table_limits_and_never_lowers_them(tmp_path, monkeypatch) -> None:
    from tether.lab import cluster

    for v in (4, 6):
        for n, value in ((2, 512), (3, 1024)):
            (tmp_path / f"v{v}n{n}").write_text(f"{value}\n")
    (tmp_path / "v6n3").write_text("100000\n")  # already above what 100 hosts need: left alone
    monkeypatch.setattr(cluster, "NEIGH_SYSCTL", str(tmp_path / "v{v}n{n}"))
    said: list[str] = []
    cluster.neighbour_room(10, said.append)
    assert said == [] and (tmp_path / "v4n3").read_text().strip() == "1024"
    cluster.neighbour_room(100, said.append)
    assert (tmp_path / "v4n3").read_text() == "24096" and (tmp_path / "v4n2").read_text() == "12048"
    assert (tmp_path / "v6n3").read_text().strip() == "100000" and (tmp_path / "v6n2").read_text().strip() == "512"
    assert len(said) == 1 and "shared by all namespaces" in said[0]
