"""Incremental nft updates without a kernel: given the plan applied last and a new plan, the batch
holds only the commands for what differs, in an order nft accepts (see `tether.dataplane.nft`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tether.calc.nft import rule
from tether.calc.plan import ElementDelta, NftChain, NftPlan, NftSet, new_token
from tether.dataplane import nft, nft_netlink
from tether.dataplane.nft import NftDataplane, NftError


def jump(target: str) -> str:
    return rule({"jump": {"target": target}})


def uses(set_name: str, comment: str = "") -> str:
    return rule({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                           "right": "@" + set_name}}, {"accept": None}, comment=comment or None)


def base_plan() -> NftPlan:
    return NftPlan(
        sets=(NftSet("ep_in", "ifname", map_type="verdict",
                     elements=frozenset({("tth1", "goto in-a"), ("tth2", "goto in-b")})),
              NftSet("sel-1", "ipv4_addr", elements=frozenset({"10.0.0.1"})),
              NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2"})),
              NftSet("stateful", "ipv4_addr", elements=frozenset({"10.0.0.9"}))),
        chains=(NftChain("forward", (rule({"vmap": {"key": {"meta": {"key": "oifname"}}, "data": "@ep_in"}}),),
                         hook="forward", type="filter", priority=0, policy="accept"),
                NftChain("raw", (uses("stateful"),), hook="prerouting", type="filter", priority=-300,
                         policy="accept"),
                NftChain("in-a", (jump("npi-1"), rule({"accept": None}))),
                NftChain("in-b", (jump("npi-2"), rule({"accept": None}))),
                NftChain("npi-1", (uses("sel-1", "p1"),)),
                NftChain("npi-2", (uses("sel-2", "p2"),))),
    )


def with_chain(plan: NftPlan, chain: NftChain) -> NftPlan:
    chains = {c.name: c for c in plan.chains}
    chains[chain.name] = chain
    return replace(plan, chains=tuple(sorted(chains.values(), key=lambda c: c.name)))


def with_set(plan: NftPlan, s: NftSet) -> NftPlan:
    sets = {x.name: x for x in plan.sets}
    sets[s.name] = s
    return replace(plan, sets=tuple(sorted(sets.values(), key=lambda x: x.name)))


def without(plan: NftPlan, chains: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> NftPlan:
    return NftPlan(sets=tuple(s for s in plan.sets if s.name not in sets),
                   chains=tuple(c for c in plan.chains if c.name not in chains))


class FakeKernel:
    """Records batches instead of running nft; `fail` makes the next n batches fail. An element
    batch sent over netlink is recorded as the nft commands it stands for (`add|delete element`).
    `gen`: the ruleset generation, which each recorded batch moves on by `commits` (1: a batch is
    one transaction; 0: a batch that changed nothing; 2: another process committed meanwhile)."""

    def __init__(self) -> None:
        self.batches: list[list[dict]] = []
        self.fail = 0
        self.gen = 100
        self.commits = 1

    def run(self, commands: list[dict], netns: str | None = None) -> None:
        if not commands:
            return
        if self.fail:
            self.fail -= 1
            raise NftError("nft failed: simulated")
        self.batches.append(commands)
        self.gen += self.commits

    def run_elements(self, sock: object, batch: nft_netlink.Batch) -> None:
        self.run([{"add" if c.add else "delete": {"element": {"family": "inet", "table": "tether", "name": c.set_name,
                                                              "elem": list(c.elements)}}} for c in batch.changes])


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    k = FakeKernel()
    monkeypatch.setattr(nft, "run_nft", k.run)
    monkeypatch.setattr(nft, "run_elements", k.run_elements)
    monkeypatch.setattr(nft, "list_table", lambda netns=None: None)
    monkeypatch.setattr(nft, "read_generation", lambda sock: k.gen)
    yield k


def applied(old: NftPlan, kernel: FakeKernel) -> NftDataplane:
    dp = NftDataplane("nowhere")
    assert dp.apply(old).full
    kernel.batches.clear()
    return dp


def ops(batch: list[dict]) -> list[str]:
    """Each command as "verb kind name" (rules: "add rule <chain>")."""
    out = []
    for cmd in batch:
        (verb, body), = cmd.items()
        (kind, obj), = body.items()
        name = obj.get("chain") or obj.get("name")
        if verb == "rename" and name.startswith("plan-"):
            out.append("rename marker")
        elif verb == "add" and kind in ("set", "map") and "elem" in obj:
            out.append(f"fill {kind} {name}")  # add set|map with elements: adds them
        else:
            out.append(f"{verb} {kind} {name}")
    return out


def test_one_chain_whose_rules_changed_is_flushed_and_refilled_alone(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    new = with_chain(old, NftChain("npi-1", (uses("sel-1", "p1 port 8080"),)))
    report = dp.apply(new)
    batch, = kernel.batches
    assert ops(batch) == ["flush chain npi-1", "add rule npi-1", "rename marker"]
    assert batch[1]["add"]["rule"]["comment"] == "p1 port 8080"
    assert not report.full and report.chains_replaced == ["npi-1"] and report.structure_commands == 3
    assert report.changes == ["chains replaced: npi-1"]


def test_unchanged_plan_issues_nothing_and_element_changes_are_element_commands(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    assert dp.apply(old).changed == 0 and kernel.batches == []
    new = with_set(old, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2", "10.0.0.3"})))
    report = dp.apply(new)
    assert ops(kernel.batches[0]) == ["add element sel-2"]  # over netlink
    assert kernel.batches[0][0]["add"]["element"]["elem"] == ["10.0.0.3"]
    assert report.element_commands == 1 and report.structure_commands == 0 and not report.full


def test_only_changed_elements_are_compared_unless_two_normalise_alike(kernel: FakeKernel) -> None:
    """The element diff normalises only the plan elements that changed; written differently but
    equal for the kernel (an address and its /32) is no change, and a set whose elements collide
    that way is compared in full, so losing one spelling keeps the address."""
    old = base_plan()
    dp = applied(old, kernel)
    respelled = with_set(old, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2/32"})))
    assert dp.apply(respelled).changed == 0 and kernel.batches == []
    both = with_set(old, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2", "10.0.0.2/32", "10.0.0.5"})))
    dp.apply(both)
    assert ops(kernel.batches[-1]) == ["add element sel-2"]
    assert kernel.batches[-1][0]["add"]["element"]["elem"] == ["10.0.0.5"]
    one = with_set(old, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2/32", "10.0.0.5"})))
    kernel.batches.clear()
    assert dp.apply(one).changed == 0 and kernel.batches == []
    gone = with_set(old, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.2/32"})))
    dp.apply(gone)
    assert ops(kernel.batches[-1]) == ["delete element sel-2"]
    assert kernel.batches[-1][0]["delete"]["element"]["elem"] == ["10.0.0.5"]


def test_element_only_changes_of_plain_sets_are_element_deletes_and_adds_over_netlink(kernel: FakeKernel) -> None:
    """Not a flush and refill of the set: over netlink a delete costs one element, whatever the set's
    size (through nft 1.0.6 a refill cost in proportion to the set, bench/nft_apply.py)."""
    big = NftSet("sel-1", "ipv4_addr", elements=frozenset(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500)))
    old = with_set(base_plan(), big)
    dp = applied(old, kernel)
    # a map entry whose verdict changes and a large selector losing a member
    new = with_set(old, NftSet("ep_in", "ifname", map_type="verdict",
                               elements=frozenset({("tth1", "goto in-b"), ("tth2", "goto in-b")})))
    new = with_set(new, replace(big, elements=big.elements - {"10.0.0.1"}))
    report = dp.apply(new)
    assert ops(kernel.batches[0]) == ["delete element ep_in", "delete element sel-1", "add element ep_in"]
    assert kernel.batches[0][0]["delete"]["element"]["elem"] == ["tth1"]  # the key whose value changed
    assert kernel.batches[0][1]["delete"]["element"]["elem"] == ["10.0.0.1"]
    assert kernel.batches[0][2]["add"]["element"]["elem"] == [("tth1", "goto in-b")]
    assert report.element_commands == 3 and not report.full


def test_a_set_with_a_delta_from_the_elements_applied_last_is_changed_by_that_delta(kernel: FakeKernel) -> None:
    """The planner's delta (calc.plan.ElementDelta) is the change when its base is the token applied
    last; with another base the whole set is compared. A failure half way (not an nft error) leaves
    no memory of the elements, so the next apply replaces the table rather than trust it."""
    big = NftSet("sel-1", "ipv4_addr", elements=frozenset(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(500)),
                 token=new_token())
    dp = applied(with_set(base_plan(), big), kernel)
    grown = replace(big, elements=big.elements | {"10.9.0.1"}, token=new_token(),
                    delta=ElementDelta(big.token, frozenset({"10.9.0.1"}), frozenset()))
    assert dp.apply(with_set(base_plan(), grown)).changes == ["sel-1: +1 -0"]
    assert kernel.batches[-1][0]["add"]["element"]["elem"] == ["10.9.0.1"]
    # a delta from elsewhere (its base is not what was applied): compared whole, still exact
    other = replace(grown, elements=big.elements - {"10.0.0.1"}, token=new_token(),
                    delta=ElementDelta(big.token, frozenset(), frozenset({"10.0.0.1"})))
    assert dp.apply(with_set(base_plan(), other)).changes == ["sel-1: +0 -2"]
    assert dp._elements is not None and dp._elements["sel-1"] == set(other.elements)
    shrunk = replace(other, elements=other.elements - {"10.0.0.2"}, token=new_token(),
                     delta=ElementDelta(other.token, frozenset(), frozenset({"10.0.0.2"})))

    def broken(sock: object, batch: nft_netlink.Batch) -> None:
        raise RuntimeError("not an nft error")

    kernel_send = nft.run_elements
    nft.run_elements = broken  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError):
            dp.apply(with_set(base_plan(), shrunk))
    finally:
        nft.run_elements = kernel_send  # type: ignore[assignment]
    assert dp._elements is None
    assert dp.apply(with_set(base_plan(), shrunk)).full


def test_an_interval_set_change_goes_through_nft_with_element_deletes(kernel: FakeKernel) -> None:
    old = with_set(base_plan(), NftSet("nets", "ipv4_addr", ("interval",), elements=frozenset({"10.1.0.0/16",
                                                                                               "10.2.0.0/16"})))
    dp = applied(old, kernel)
    # an interval set shrinks: nft fetches elements anyway, so deletes are element deletes
    newer = with_set(old, NftSet("nets", "ipv4_addr", ("interval",), elements=frozenset({"10.1.0.0/16"})))
    newer = with_set(newer, NftSet("sel-2", "ipv4_addr", elements=frozenset({"10.0.0.4"})))
    dp.apply(newer)
    assert ops(kernel.batches[0]) == ["delete element nets", "delete element sel-2", "fill set sel-2"]
    assert kernel.batches[0][0]["delete"]["element"]["elem"] == [{"prefix": {"addr": "10.2.0.0", "len": 16}}]


def test_through_nft_only_small_shrinking_sets_are_flushed_and_refilled() -> None:
    """In an nft batch (a structure change, an interval set) a `delete element` makes nft 1.0.6 fetch
    the table's chains and sets first; refilling a few elements costs less, refilling a large set
    more."""
    def changed(n: int) -> nft.Changed:
        s = NftSet("sel-1", "ipv4_addr", elements=frozenset(f"10.0.{i // 250}.{i % 250 + 1}" for i in range(n)))
        return nft.Changed(s, s.elements, {"10.9.9.9"}, [])

    deletes, adds = nft.element_commands([changed(3)])
    assert ops(deletes + adds) == ["flush set sel-1", "fill set sel-1"] and len(adds[0]["add"]["set"]["elem"]) == 3
    deletes, adds = nft.element_commands([changed(nft.REFILL_LIMIT + 1)])
    assert ops(deletes + adds) == ["delete element sel-1"] and deletes[0]["delete"]["element"]["elem"] == ["10.9.9.9"]


def test_a_new_chain_exists_before_the_rule_and_the_map_entry_that_jump_to_it(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    new = with_chain(old, NftChain("in-b", (jump("npi-2"), jump("npi-3"), rule({"accept": None}))))
    new = with_chain(new, NftChain("npi-3", (uses("sel-3"),)))
    new = with_chain(new, NftChain("in-c", (rule({"accept": None}),)))
    new = with_set(new, NftSet("sel-3", "ipv4_addr", elements=frozenset({"10.0.0.3"})))
    new = with_set(new, NftSet("ep_in", "ifname", map_type="verdict",
                               elements=frozenset({("tth1", "goto in-a"), ("tth2", "goto in-b"),
                                                   ("tth3", "goto in-c")})))
    report = dp.apply(new)
    o = ops(kernel.batches[0])
    assert o == ["flush chain in-b",
                 "add chain in-c", "add chain npi-3", "add set sel-3",
                 "fill set sel-3", "fill map ep_in",
                 "add rule in-b", "add rule in-b", "add rule in-b", "add rule in-c", "add rule npi-3",
                 "rename marker"]
    assert report.chains_added == ["in-c", "npi-3"] and report.sets_added == ["sel-3"]
    assert report.chains_replaced == ["in-b"]
    assert report.changes == ["chains replaced: in-b", "chains added: in-c, npi-3", "sets added: sel-3",
                              "ep_in: +1 -0"]


def test_a_removed_chain_is_flushed_unreferenced_and_only_then_deleted(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    # in-b goes (with its map entry), npi-2 and its selector set go with it
    new = without(old, chains=("in-b", "npi-2"), sets=("sel-2",))
    new = with_set(new, NftSet("ep_in", "ifname", map_type="verdict", elements=frozenset({("tth1", "goto in-a")})))
    report = dp.apply(new)
    o = ops(kernel.batches[0])
    assert o == ["flush map ep_in", "flush chain in-b", "flush chain npi-2", "delete set sel-2",
                 "delete chain in-b", "delete chain npi-2", "fill map ep_in", "rename marker"]
    assert report.chains_removed == ["in-b", "npi-2"] and report.sets_removed == ["sel-2"]
    assert not report.chains_replaced and not report.full


def test_a_chain_moving_its_jump_to_another_chain(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    # in-a now jumps to a new npi-9 instead of npi-1, which goes away
    new = without(old, chains=("npi-1",), sets=("sel-1",))
    new = with_chain(new, NftChain("in-a", (jump("npi-9"), rule({"accept": None}))))
    new = with_chain(new, NftChain("npi-9", (uses("sel-2", "p9"),)))
    dp.apply(new)
    o = ops(kernel.batches[0])
    flush_a, flush_1 = o.index("flush chain in-a"), o.index("flush chain npi-1")
    assert o.index("delete chain npi-1") > max(flush_a, flush_1)
    assert o.index("delete set sel-1") > max(flush_a, flush_1)
    assert o.index("add chain npi-9") < o.index("add rule in-a")
    assert "flush chain in-b" not in o and "flush chain npi-2" not in o and "flush chain forward" not in o


def test_a_base_chain_whose_hook_settings_changed_is_recreated(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    fwd = old.chain("forward")
    assert fwd is not None
    report = dp.apply(with_chain(old, replace(fwd, priority=10, policy="drop")))
    o = ops(kernel.batches[0])
    assert o == ["flush chain forward", "delete chain forward", "add chain forward", "add rule forward",
                 "rename marker"]
    assert kernel.batches[0][2]["add"]["chain"]["prio"] == 10
    assert report.chains_replaced == ["forward"]


def test_a_redefined_set_is_recreated_after_the_rules_naming_it_are_flushed(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    # raw's rules are unchanged but name @stateful, whose flags change
    report = dp.apply(with_set(old, NftSet("stateful", "ipv4_addr", ("interval",),
                                           elements=frozenset({"10.0.0.0/24"}))))
    o = ops(kernel.batches[0])
    assert o == ["flush chain raw", "delete set stateful", "add set stateful", "fill set stateful",
                 "add rule raw", "rename marker"]
    assert report.sets_redefined == ["stateful"] and report.chains_replaced == ["raw"]
    # a set turning into a map keeps its name but is deleted as what it was
    dp.apply(with_set(old, NftSet("sel-1", "ipv4_addr", map_type="verdict")))
    o = ops(kernel.batches[1])
    assert o.index("flush chain npi-1") < o.index("delete set sel-1") < o.index("add map sel-1")


def test_a_failed_incremental_batch_falls_back_to_a_full_replace(kernel: FakeKernel,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    new = with_chain(old, NftChain("npi-1", (uses("sel-1", "changed"),)))
    kernel.fail = 1
    report = dp.apply(new)
    assert report.full and "incremental update failed" in report.changes[0]
    assert "replacing the whole table" in caplog.text
    batch, = kernel.batches
    assert ops(batch)[:3] == ["add table tether", "delete table tether", "add table tether"]
    kernel.batches.clear()
    assert dp.apply(new).changed == 0 and kernel.batches == []  # and it remembers the full apply


def test_a_failed_element_update_falls_back_too(kernel: FakeKernel) -> None:
    old = base_plan()
    dp = applied(old, kernel)
    kernel.fail = 1
    report = dp.apply(with_set(old, NftSet("sel-1", "ipv4_addr", elements=frozenset({"10.0.0.7"}))))
    assert report.full and len(kernel.batches) == 1


def test_restart_with_the_same_structure_adopts_the_kernel_and_issues_nothing(
        kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = base_plan()
    listed = [{"chain": {"name": nft.structure_hash(plan)}},
              {"map": {"name": "ep_in", "elem": [["tth1", {"goto": {"target": "in-a"}}],
                                                 ["tth2", {"goto": {"target": "in-b"}}]]}},
              {"set": {"name": "sel-1", "elem": ["10.0.0.1"]}}, {"set": {"name": "sel-2", "elem": ["10.0.0.2"]}},
              {"set": {"name": "stateful", "elem": ["10.0.0.9"]}}]
    listed += [{"chain": {"name": c.name}} for c in plan.chains]
    listed += [{"rule": {"chain": c.name}} for c in plan.chains for _ in c.rules]
    monkeypatch.setattr(nft, "list_table", lambda netns=None: listed)
    dp = NftDataplane("nowhere")
    assert dp.apply(plan).changed == 0 and kernel.batches == []
    # a chain more than the plan's (the marker would not show it): not adopted but replaced
    monkeypatch.setattr(nft, "list_table", lambda netns=None: [*listed, {"chain": {"name": "ing-stale"}}])
    assert NftDataplane("nowhere").apply(plan).full
    kernel.batches.clear()
    # and then it updates incrementally from what it adopted
    report = dp.apply(with_chain(plan, NftChain("npi-2", ())))
    assert ops(kernel.batches[0])[:1] == ["flush chain npi-2"] and not report.full


def test_restart_with_another_structure_replaces_the_table(kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(nft, "list_table", lambda netns=None: [{"chain": {"name": "plan-x"}}])
    assert NftDataplane("nowhere").apply(base_plan()).full


def test_the_marker_depends_on_structure_not_elements() -> None:
    a = base_plan()
    b = with_set(a, NftSet("sel-1", "ipv4_addr", elements=frozenset({"10.9.9.9"})))
    c = with_chain(a, NftChain("npi-1", (uses("sel-1", "other"),)))
    assert nft.structure_hash(a) == nft.structure_hash(b) != nft.structure_hash(c)


def test_full_commands_are_unchanged_in_shape() -> None:
    cmds = nft.full_commands(base_plan())
    o = ops(cmds)
    assert o[:4] == ["add table tether", "delete table tether", "add table tether",
                     f"add chain {nft.structure_hash(base_plan())}"]
    first_rule = next(i for i, x in enumerate(o) if x.startswith("add rule"))
    assert all(not x.startswith("add chain") for x in o[first_rule:])
    assert json.dumps(cmds)  # JSON-able
