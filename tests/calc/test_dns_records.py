"""DNS answers are a pure function of the replica's objects and the query bytes."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.rrset

from tether.agent.dns import ForwardCache
from tether.calc.dns_records import NEGATIVE_TTL, TTL, RecordBuilder, answer, answer_bare, build, docker_search
from tether.model import Endpoint, Network, Owner, Service, ServicePort, Subnet

NET = Network(name="blue", subnets=[Subnet(cidr="10.1.0.0/16"), Subnet(cidr="fd00:1::/64")])
EPS = [Endpoint(name="web", network="blue", ips=["10.1.0.5", "10.1.0.6", "10.1.0.7", "fd00:1::5"]),
       Endpoint(name="db", network="blue", ips=["10.1.0.9"])]
SVC = Service(name="api", namespace="prod", cluster_ip="10.96.0.10",
              ports=[ServicePort(name="http", port=80), ServicePort(name="dns", port=53, protocol="UDP")])
REC = build(EPS, [SVC], [NET], serial=7)


def ask(name: str, rtype: str) -> dns.message.Message | None:
    wire = answer(REC, dns.message.make_query(name, rtype).to_wire())
    return None if wire is None else dns.message.from_wire(wire)


def rdata(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


def test_endpoint_a_and_aaaa_with_the_cluster_ttl() -> None:
    a = ask("web.blue.tether.local", "A")
    assert a is not None and a.rcode() == dns.rcode.NOERROR and a.flags & dns.flags.AA
    assert sorted(rdata(a)) == ["10.1.0.5", "10.1.0.6", "10.1.0.7"]
    assert a.answer[0].ttl == TTL
    aaaa = ask("web.blue.tether.local", "AAAA")
    assert aaaa is not None and rdata(aaaa) == ["fd00:1::5"]


def test_several_addresses_come_in_shuffled_order() -> None:
    orders = set()
    for _ in range(60):
        wire = answer(REC, dns.message.make_query("web.blue.tether.local", "A").to_wire())
        assert wire is not None
        msg = dns.message.from_wire(wire)
        orders.add(tuple(rd.to_text() for rd in msg.answer[0]))
    # dnspython keeps wire order inside one rrset: several orders means the server shuffled
    assert len(orders) >= 3


def test_service_a_srv_and_named_port_srv() -> None:
    a = ask("api.prod.svc.tether.local", "A")
    assert a is not None and rdata(a) == ["10.96.0.10"]
    srv = ask("_http._tcp.api.prod.svc.tether.local", "SRV")
    assert srv is not None and rdata(srv) == ["0 100 80 api.prod.svc.tether.local."]
    both = ask("api.prod.svc.tether.local", "SRV")
    assert both is not None and sorted(rdata(both)) == ["0 100 53 api.prod.svc.tether.local.",
                                                         "0 100 80 api.prod.svc.tether.local."]


def test_ptr_for_endpoint_and_service_addresses() -> None:
    for ip, name in (("10.1.0.9", "db.blue.tether.local."), ("10.96.0.10", "api.prod.svc.tether.local."),
                     ("fd00:1::5", "web.blue.tether.local.")):
        msg = ask(dns.reversename.from_address(ip).to_text(), "PTR")
        assert msg is not None and rdata(msg) == [name], ip


def test_nxdomain_and_nodata_are_told_apart_with_the_negative_ttl() -> None:
    nx = ask("nobody.blue.tether.local", "A")
    assert nx is not None and nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.authority and nx.authority[0].rdtype == dns.rdatatype.SOA and nx.authority[0].ttl == NEGATIVE_TTL
    for name, rtype in (("db.blue.tether.local", "AAAA"), ("web.blue.tether.local", "MX"),
                        ("blue.tether.local", "A"), ("prod.svc.tether.local", "A"), ("tether.local", "A")):
        msg = ask(name, rtype)
        assert msg is not None and msg.rcode() == dns.rcode.NOERROR and not msg.answer, (name, rtype)
        assert msg.authority[0].rdtype == dns.rdatatype.SOA
    unknown_ptr = ask(dns.reversename.from_address("10.1.200.200").to_text(), "PTR")
    assert unknown_ptr is not None and unknown_ptr.rcode() == dns.rcode.NXDOMAIN


def test_names_outside_the_cluster_are_forwarded() -> None:
    assert ask("example.test", "A") is None
    assert ask(dns.reversename.from_address("8.8.8.8").to_text(), "PTR") is None


def test_question_case_is_echoed_and_matching_is_case_insensitive() -> None:
    msg = ask("WeB.Blue.Tether.Local", "A")
    assert msg is not None and msg.question[0].name.to_text() == "WeB.Blue.Tether.Local."
    assert len(rdata(msg)) == 3


def test_garbage_gets_formerr_or_nothing() -> None:
    assert answer(REC, b"\x12\x34") is None
    bad = answer(REC, b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 6 + b"\x00\x00\x01\x00\x01")
    assert bad is not None and dns.message.from_wire(bad).rcode() == dns.rcode.FORMERR


def test_forward_cache_counts_ttls_down_and_caches_negative_answers() -> None:
    cache = ForwardCache()
    q = dns.message.make_query("example.test", "A")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("example.test.", 100, "IN", "A", "198.19.255.80"))
    cache.put(("example.test.", 1, 1), r, now=1000.0)
    out = cache.get(("example.test.", 1, 1), 4242, now=1030.0)
    assert out is not None
    msg = dns.message.from_wire(out)
    assert msg.id == 4242 and msg.answer[0].ttl == 70
    assert cache.get(("example.test.", 1, 1), 1, now=1101.0) is None
    nx = dns.message.make_response(dns.message.make_query("nope.test", "A"))
    nx.set_rcode(dns.rcode.NXDOMAIN)
    nx.authority.append(dns.rrset.from_text("test.", 300, "IN", "SOA", "ns. host. 1 2 3 4 20"))
    cache.put(("nope.test.", 1, 1), nx, now=0.0)
    assert cache.entries[("nope.test.", 1, 1)].expires == 20.0


def test_memoised_answers_equal_fresh_ones_and_keep_shuffling() -> None:
    from tether.calc.dns_records import respond

    rec = build(EPS, [SVC], [NET])
    for name, rtype in (("api.prod.svc.tether.local", "A"), ("nobody.blue.tether.local", "A"),
                        ("db.blue.tether.local", "AAAA")):
        q = dns.message.make_query(name, rtype)
        first, again = respond(rec, q.to_wire()), respond(rec, q.to_wire())
        assert first == again == answer(rec, q.to_wire())
        q.id = (q.id + 1) % 65536
        out = respond(rec, q.to_wire())
        assert out is not None and dns.message.from_wire(out).id == q.id
    orders = set()
    for _ in range(60):
        out = respond(rec, dns.message.make_query("web.blue.tether.local", "A").to_wire())
        assert out is not None
        orders.add(tuple(rd.to_text() for rd in dns.message.from_wire(out).answer[0]))
    assert len(orders) >= 3
    assert respond(rec, dns.message.make_query("example.test", "A").to_wire()) is None


def test_records_are_built_off_the_event_loop_and_installed_in_one_step() -> None:
    """The agent builds the records on its apply thread (`prepare`, from its copy of the replica)
    and installs them on the event loop: until then the server answers from the old records."""
    from tether.agent.dns import DnsServer
    from tether.calc.replica import Replica

    server = DnsServer("127.0.0.1", 0, [])
    rep = Replica()
    rep.objects["Network"][NET.name] = NET
    for ep in EPS:
        rep.objects["Endpoint"][ep.name] = ep
    rep.revision = 3
    install = server.prepare(rep.view())
    assert install is not None and "web.blue.tether.local." not in server.records.existing
    install()
    assert "web.blue.tether.local." in server.records.existing and server.records.serial == 3
    assert server.prepare(rep.view()) is None  # the same revision: nothing to rebuild
    del rep.objects["Endpoint"]["web"]
    rep.revision = 4
    server.update(rep)  # prepare and install at once (the agent's start, before any apply)
    assert "web.blue.tether.local." not in server.records.existing and server.records.serial == 4


def test_rebuild_follows_every_change_of_an_endpoint_or_its_zone():
    """What an endpoint contributes is kept from one build to the next (by object): a replaced
    endpoint, a removed one, or another DNS domain must give exactly the records of a first build."""

    web, db = EPS
    renamed = web.model_copy(update={"name": "www", "ips": ["10.1.0.50", "fd00:1::50"]})
    other_domain = NET.model_copy(update={"dns_domain": "example.internal"})
    steps = (([web, db], [NET]), ([renamed, db], [NET]), ([db], [NET]), ([renamed, db], [other_domain]),
             ([renamed, db], [NET]))
    builder = RecordBuilder()
    for endpoints, nets in steps:
        builder.update(endpoints, [SVC], nets, serial=9)  # reuses the parts of the step before
        again = builder.records()
        expected = build(endpoints, [SVC], nets, serial=9)  # cold
        assert again.rrs == expected.rrs and again.existing == expected.existing
    assert "www.blue.tether.local." in again.existing and "web.blue.tether.local." not in again.existing
    assert "10.in-addr.arpa." in again.existing  # an empty non-terminal of an endpoint's PTR


def test_a_bare_name_forwarded_by_dockers_embedded_resolver_is_answered_in_the_containers_network() -> None:
    """Docker's 127.0.0.11 forwards `db` unchanged, from the container's address: the agent answers
    it through that container's search path, owned by the name asked."""
    box = Endpoint(name="box", network="blue", ips=["10.1.0.20"], owner=Owner(type="docker"))
    pod = Endpoint(name="pod", network="blue", ips=["10.1.0.21"])
    search = docker_search([box, pod], {"blue": NET})
    assert list(search) == ["10.1.0.20"]  # only Docker containers' queries arrive without search domains
    wire = answer_bare(REC, dns.message.make_query("db", "A").to_wire(), search["10.1.0.20"])
    assert wire is not None
    msg = dns.message.from_wire(wire)
    assert msg.rcode() == dns.rcode.NOERROR and rdata(msg) == ["10.1.0.9"] and msg.answer[0].name.to_text() == "db."
    assert answer_bare(REC, dns.message.make_query("nope", "A").to_wire(), search["10.1.0.20"]) is None
    assert answer_bare(REC, dns.message.make_query("db", "A").to_wire(), None) is None  # not a container
    assert answer_bare(REC, dns.message.make_query("db.example", "A").to_wire(), search["10.1.0.20"]) is None
def test_a_neutron_dns_name_resolves_to_the_ports_addresses_and_ptr_keeps_its_name() -> None:
    port = Endpoint(name="port-1a2b3c4d", network="blue", ips=["10.1.0.20"], dns_name="www1")
    rec = build([*EPS, port], [], [NET], serial=1)
    wire = answer(rec, dns.message.make_query("www1.blue.tether.local", "A").to_wire())
    assert wire is not None and rdata(dns.message.from_wire(wire)) == ["10.1.0.20"]
    ptr = answer(rec, dns.message.make_query(dns.reversename.from_address("10.1.0.20"), "PTR").to_wire())
    assert ptr is not None and rdata(dns.message.from_wire(ptr)) == ["port-1a2b3c4d.blue.tether.local."]


def server_with_one_endpoint():
    """A DNS extra (no worker started) that has sent the records of one endpoint on NET."""
    from tether.agent.dns import DnsServer
    from tether.calc.replica import Replica

    server = DnsServer("127.0.0.1", 0, [])
    rep = Replica()
    rep.objects["Network"][NET.name] = NET
    rep.objects["Endpoint"][EPS[0].id] = EPS[0]
    rep.revision = 1
    server.update(rep.view())
    return server, rep


def test_records_kept_change_by_change_are_checked_against_a_cold_build_and_replaced_when_they_differ(
        caplog) -> None:
    """The oracle runs in the agent too: every FULL_CHECK_S the kept records are compared with a cold
    build; a difference (a defect) is logged and the cold build is what the server answers from."""
    server, rep = server_with_one_endpoint()
    server._builder.counts["ghost.blue.tether.local."] = 1  # a defect: a name no object makes
    server.records.existing.add("ghost.blue.tether.local.")
    rep.objects["Endpoint"][EPS[1].id] = EPS[1]
    rep.revision = 2
    server.update(rep.view())
    assert "ghost.blue.tether.local." in server.records.existing  # not checked yet
    assert not [r for r in caplog.records if "differ from a cold build" in r.getMessage()]
    server._checked_at -= 3600
    rep.revision = 3
    server.update(rep.view())
    assert [r for r in caplog.records if "differ from a cold build" in r.getMessage()]
    cold = build(EPS, [], [NET], serial=3)
    assert server.records.rrs == cold.rrs and server.records.existing == cold.existing


def test_a_change_dns_does_not_show_leaves_the_records_and_the_workers_answer_memo() -> None:
    """A policy (or a host) changes the replica's revision but no name: nothing goes to the worker,
    whose memo of answers stays, and the SOA serial stays that of the last change of names."""
    from tether.model import NetworkPolicy

    server, rep = server_with_one_endpoint()
    records, generation = server.records, server.records.generation
    server.records.memo[b"q"] = (b"a",)
    rep.objects["NetworkPolicy"]["default/p"] = NetworkPolicy(name="p", spec={"podSelector": {}})
    rep.revision = 2
    install = server.prepare(rep.view())
    assert install is not None
    install()
    assert server.records is records and records.generation == generation and records.serial == 1
    assert records.memo == {b"q": (b"a",)}
    assert server.prepare(rep.view()) is None  # revision 2 is done


def test_the_agents_records_follow_the_replicas_journal_and_equal_a_cold_build(monkeypatch) -> None:
    """The DNS extra reads what changed from the replica's journal (as the planner does), not by a
    pass over every endpoint; a view the journal cannot vouch for (a snapshot loaded) falls back to
    the pass. Either way the records equal a cold build."""
    from tether.agent.dns import DnsServer
    from tether.calc import dns_records
    from tether.calc.replica import Replica

    passes = []
    real = dns_records._changed
    monkeypatch.setattr(dns_records, "_changed", lambda last, now: passes.append(1) or real(last, now))
    server = DnsServer("127.0.0.1", 0, [])
    rep = Replica()
    rep.objects["Network"][NET.name] = NET
    rep.objects["Endpoint"][EPS[0].id] = EPS[0]
    rep.revision = 1
    server.update(rep.view())  # the first: a full set
    passes.clear()
    for revision, change in enumerate((lambda: rep.objects["Endpoint"].__setitem__(EPS[1].id, EPS[1]),
                                       lambda: rep.objects["Endpoint"].pop(EPS[0].id)), start=2):
        change()
        rep.revision = revision
        server.update(rep.view())
        assert not passes, "the journal told what changed"
        cold = build(list(rep.objects["Endpoint"].values()), [], [NET], serial=revision)
        assert server.records.rrs == cold.rrs and server.records.existing == cold.existing
        passes.clear()  # the cold build's
    rep.journal.lost()  # as a snapshot loaded
    rep.objects["Endpoint"][EPS[0].id] = EPS[0]
    rep.revision = 4
    server.update(rep.view())
    assert passes, "a journal that lost track: a pass over every object"
    cold = build(list(rep.objects["Endpoint"].values()), [], [NET], serial=4)
    assert server.records.rrs == cold.rrs and server.records.existing == cold.existing
