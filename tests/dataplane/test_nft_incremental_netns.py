"""Incremental nft updates against the real nft, each in throwaway namespaces: untouched chains keep
their rule handles, removed policies leave nothing behind, a restarted dataplane changes nothing, and
any sequence of plan changes leaves the same table as one fresh apply of the final plan."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from tether.calc.host import HostContext, compute_nft
from tether.calc.plan import NftChain, NftPlan, NftSet
from tether.calc.replica import Replica
from tether.dataplane.nft import NftDataplane, structure_hash
from tether.model import (
    Endpoint,
    Host,
    Namespace,
    Network,
    NetworkPolicy,
    SecurityGroup,
    SecurityGroupRule,
    Service,
    ServicePort,
    Subnet,
)

pytestmark = pytest.mark.root  # network namespaces

CTX = HostContext("b", "eth0", 1500)


def listing(ns: str) -> list[dict]:
    r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-a", "-j", "list", "table", "inet", "tether"],
                       capture_output=True, text=True, timeout=60, check=True)
    return [i for i in json.loads(r.stdout)["nftables"] if "metainfo" not in i]


def handles(ns: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for item in listing(ns):
        if "rule" in item:
            out.setdefault(item["rule"]["chain"], []).append(item["rule"]["handle"])
    return out


def content(ns: str) -> dict[str, Any]:
    """The table without handles or listing order: sets by name (elements sorted), chains by name
    with their rules in order."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "handle"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    sets: dict[str, Any] = {}
    chains: dict[str, Any] = {}
    rules: dict[str, list] = {}
    for item in strip(listing(ns)):
        for kind in ("set", "map"):
            if kind in item:
                body = dict(item[kind])
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
                sets[body["name"]] = (kind, body)
        if "chain" in item:
            chains[item["chain"]["name"]] = item["chain"]
        if "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
    return {"sets": sets, "chains": chains, "rules": rules}


# --- a bench-like model (bench/policy.py's shape, small) ---------------------------------------------

def model(n_pols: int = 12, n_eps: int = 30) -> Replica:
    r = Replica()
    r.objects["Host"]["b"] = Host(name="b", underlay_ip="198.18.0.1")
    r.objects["Network"]["n"] = Network(name="n", subnets=[Subnet(cidr="10.0.0.0/8")])
    r.objects["Network"]["m"] = Network(name="m", subnets=[Subnet(cidr="172.16.0.0/16")])
    for ns in ("bench", "other"):
        r.objects["Namespace"][ns] = Namespace(name=ns, labels={"team": ns})
    for i in range(n_eps):
        add_endpoint(r, i, n_pols)
    for j in range(n_pols):
        set_policy(r, j, n_pols, port=80)
    r.objects["SecurityGroup"]["g1"] = SecurityGroup(id="g1", name="web", rules=[
        SecurityGroupRule(id="r1", direction="ingress", protocol="tcp", port_range_min=80, port_range_max=81,
                          remote_group_id="g1")])
    return r


def add_endpoint(r: Replica, i: int, n_pols: int, host: str = "b") -> None:
    ep = Endpoint(id=f"e{i}", name=f"e{i}", network="n" if i % 7 else "m", host=host if i % 3 else "c",
                  namespace="bench", ips=[f"10.1.{i // 250}.{i % 250 + 2}"], mac=f"02:00:00:00:{i // 250:02x}:"
                  f"{i % 250:02x}", interface=f"tthb{i:08d}", labels={"app": f"a{i % n_pols}", "tier": "web"})
    r.objects["Endpoint"][ep.id] = ep


def set_policy(r: Replica, j: int, n_pols: int, port: int, egress: bool | None = None) -> None:
    spec: dict = {"podSelector": {"matchLabels": {"app": f"a{j}"}}, "ingress": [
        {"from": [{"podSelector": {"matchLabels": {"app": f"a{(j + 1) % n_pols}"}}},
                  {"namespaceSelector": {"matchLabels": {"team": "other"}}}],
         "ports": [{"port": 5201 + j % 3, "endPort": 5203}, {"port": port}]}]}
    if egress if egress is not None else j % 5 == 2:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["egress"] = [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]
    pol = NetworkPolicy(id=f"p{j}", name=f"p{j}", namespace="bench", spec=spec)
    r.objects["NetworkPolicy"][pol.store_name()] = pol


# --- tests -----------------------------------------------------------------------------------------

def test_a_policy_change_rewrites_only_its_chain(netns: Callable[[], str]) -> None:
    ns = netns()
    r = model()
    dp = NftDataplane(ns)
    assert dp.apply(compute_nft(r, CTX)).full
    before = handles(ns)
    set_policy(r, 4, 12, port=8080)  # p4 selects local endpoints (e4, e16, e28)
    report = dp.apply(compute_nft(r, CTX))
    assert not report.full and report.chains_replaced == ["npi-p4"], report
    assert not report.chains_added and not report.chains_removed and not report.sets_added
    after = handles(ns)
    assert set(after) == set(before)
    for chain, hs in before.items():
        if chain == "npi-p4":
            assert set(after[chain]).isdisjoint(hs)  # refilled
        else:
            assert after[chain] == hs, chain  # not rewritten
    fresh = netns()
    NftDataplane(fresh).apply(compute_nft(r, CTX))
    assert content(ns) == content(fresh)


def test_a_removed_policy_leaves_no_chain_or_set_and_a_restart_changes_nothing(netns: Callable[[], str]) -> None:
    ns = netns()
    r = model()
    dp = NftDataplane(ns)
    old = compute_nft(r, CTX)
    dp.apply(old)
    del r.objects["NetworkPolicy"]["bench/p2"]  # p2 has an egress chain and its own selector set
    new = compute_nft(r, CTX)
    gone_chains = {c.name for c in old.chains} - {c.name for c in new.chains}
    gone_sets = {s.name for s in old.sets} - {s.name for s in new.sets}
    assert {"npi-p2", "npe-p2"} <= gone_chains and any(s.startswith("sel-") for s in gone_sets)
    report = dp.apply(new)
    assert not report.full and set(report.chains_removed) == gone_chains and set(report.sets_removed) == gone_sets
    kernel = content(ns)
    assert not gone_chains & set(kernel["chains"]) and not gone_sets & set(kernel["sets"])

    snapshot = listing(ns)
    again = NftDataplane(ns)  # an agent restart with the same plan
    assert again.apply(new).changed == 0
    assert listing(ns) == snapshot  # handles included
    assert again.verify(new)
    # the restarted dataplane continues incrementally
    set_policy(r, 5, 12, port=9090)
    assert not again.apply(compute_nft(r, CTX)).full


def test_a_refused_batch_falls_back_to_a_full_replace(netns: Callable[[], str]) -> None:
    ns = netns()
    r = model()
    dp = NftDataplane(ns)
    plan = compute_nft(r, CTX)
    dp.apply(plan)
    marker = structure_hash(plan)  # drift: the marker chain vanishes, so renaming it fails
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "chain", "inet", "tether", marker], check=True,
                   timeout=30)
    set_policy(r, 4, 12, port=7070)
    report = dp.apply(compute_nft(r, CTX))
    assert report.full and report.changes == ["table replaced (incremental update failed)"]
    fresh = netns()
    NftDataplane(fresh).apply(compute_nft(r, CTX))
    assert content(ns) == content(fresh)


def test_the_first_service_adds_the_nat_chains_in_place_and_the_last_one_removes_them(
        netns: Callable[[], str]) -> None:
    """No service and no masquerading network: no nat base chain (calc.host.needs_nat). The
    switch is an incremental batch, not a table replace (which would judge every connection again)."""
    nat = {"prerouting_nat", "output_nat", "postrouting_nat", "svc_postrouting"}
    ns = netns()
    r = model()
    dp = NftDataplane(ns)
    dp.apply(compute_nft(r, CTX))
    assert not nat & set(content(ns)["chains"])
    r.objects["Service"]["bench/s"] = Service(name="s", namespace="bench", cluster_ip="10.96.0.10",
                                              selector={"app": "a1"}, ports=[ServicePort(port=80)])
    report = dp.apply(compute_nft(r, CTX))
    assert not report.full and nat <= set(report.chains_added), report
    fresh = netns()
    NftDataplane(fresh).apply(compute_nft(r, CTX))
    assert content(ns) == content(fresh)
    del r.objects["Service"]["bench/s"]
    report = dp.apply(compute_nft(r, CTX))
    assert not report.full and nat <= set(report.chains_removed), report
    assert not nat & set(content(ns)["chains"])


def mutate(r: Replica, rng: random.Random, step: int, n_pols: int, next_ep: list[int]) -> str:
    pols = sorted(r.objects["NetworkPolicy"])
    eps = sorted(r.objects["Endpoint"])
    kind = rng.choice(["port", "port", "egress", "add_policy", "delete_policy", "label", "add_ep", "delete_ep",
                       "group", "namespace"])
    if kind == "port" and pols:
        j = int(rng.choice(pols).split("/p")[1])
        set_policy(r, j, n_pols, port=1000 + step)
    elif kind == "egress" and pols:
        j = int(rng.choice(pols).split("/p")[1])
        has = "Egress" in r.objects["NetworkPolicy"][f"bench/p{j}"].spec.get("policyTypes", [])
        set_policy(r, j, n_pols, port=80, egress=not has)
    elif kind == "add_policy":
        set_policy(r, rng.randrange(n_pols + 5), n_pols, port=80 + step)
    elif kind == "delete_policy" and pols:
        del r.objects["NetworkPolicy"][rng.choice(pols)]
    elif kind == "label" and eps:
        key = rng.choice(eps)
        ep = r.objects["Endpoint"][key]
        r.objects["Endpoint"][key] = ep.model_copy(update={"labels": {**ep.labels,
                                                                      "app": f"a{rng.randrange(n_pols)}"}})
    elif kind == "add_ep":
        add_endpoint(r, next_ep[0], n_pols)
        next_ep[0] += 1
    elif kind == "delete_ep" and eps:
        del r.objects["Endpoint"][rng.choice(eps)]
    elif kind == "group" and eps:
        key = rng.choice(eps)
        ep = r.objects["Endpoint"][key]
        r.objects["Endpoint"][key] = ep.model_copy(update={"security_groups": [] if ep.security_groups
                                                           else ["g1"]})
    elif kind == "namespace":
        ns = r.objects["Namespace"]["other"]
        r.objects["Namespace"]["other"] = ns.model_copy(update={"labels": {"team": rng.choice(["other", "x"])}})
    return kind


def twist(plan: NftPlan, rng: random.Random) -> tuple[NftPlan, str]:
    """Changes no compiler makes today but the dataplane must handle: a base chain's priority or
    policy, a set's definition (with rules that name it unchanged), an extra chain or set."""
    kind = rng.choice(["none", "none", "none", "base_chain", "redefine_set", "extra"])
    if kind == "base_chain":
        chains = tuple(replace(c, priority=-299) if c.name == "raw_output" else c for c in plan.chains)
        return replace(plan, chains=chains), kind
    if kind == "redefine_set":
        sets = tuple(replace(s, flags=("interval",)) if s.name == "stateful" else s for s in plan.sets)
        return replace(plan, sets=sets), kind
    if kind == "extra":
        return replace(plan, sets=(*plan.sets, NftSet("zz_extra", "ipv4_addr", elements=frozenset({"10.9.9.9"}))),
                       chains=(*plan.chains, NftChain("zz_extra", ()))), kind
    return plan, kind


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_changes_leave_the_table_a_fresh_apply_would_build(netns: Callable[[], str], seed: int) -> None:
    rng = random.Random(seed)
    n_pols = 12
    r = model(n_pols)
    ns, fresh = netns(), netns()
    dp = NftDataplane(ns)
    dp.apply(compute_nft(r, CTX))
    next_ep = [100]
    history = []
    for step in range(14):
        kinds = [mutate(r, rng, step, n_pols, next_ep) for _ in range(rng.choice([1, 1, 2, 3]))]
        plan, extra = twist(compute_nft(r, CTX), rng)
        history.append((kinds, extra))
        report = dp.apply(plan)
        assert not report.full, (history, report.changes)
        NftDataplane(fresh).apply(plan)  # a fresh dataplane: a full replace
        assert content(ns) == content(fresh), history
    assert NftDataplane(ns).apply(plan).changed == 0


def test_drop_counters_read_without_set_elements_count_what_the_full_listing_counts(
        netns: Callable[[], str]) -> None:
    """The drop metrics' reading (every few seconds while scraped) leaves the sets' elements out:
    nearly all of the table's JSON with many endpoints; the counters are the same."""
    from tether.dataplane.nft import counters, list_table

    ns = netns()
    NftDataplane(ns).apply(compute_nft(model(), CTX))
    full = list_table(ns)
    assert full is not None and any(item.get("set", item.get("map", {})).get("elem") for item in full)
    terse = list_table(ns, terse=True)
    assert terse is not None and not any(item.get("set", item.get("map", {})).get("elem") for item in terse)
    want: dict[str, int] = {}
    for item in full:
        r = item.get("rule")
        if r and r.get("comment"):
            for st in r.get("expr", []):
                if isinstance(st.get("counter"), dict):
                    key = f"{r['chain']}/{r['comment']}"
                    want[key] = want.get(key, 0) + st["counter"].get("packets", 0)
    assert want and counters(ns) == want
