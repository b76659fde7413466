"""The UDP worker process: answers cluster names from the records the agent sends it, hands misses
back to the agent's event loop, picks up new records, is replaced when it dies, and exits with the
agent. On 127.0.0.1 with a kernel-chosen port; no upstream, so a forwarded query answers SERVFAIL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import dns.flags
import dns.message
import dns.query
import dns.rcode

from tether.agent.dns import DnsServer
from tether.calc.dns_records import build
from tether.model import Endpoint, Network, Service, ServiceBackend, Subnet

NET = Network(name="blue", subnets=[Subnet(cidr="10.1.0.0/16")])
WEB = Endpoint(name="web", network="blue", ips=["10.1.0.5"])
DB = Endpoint(name="db", network="blue", ips=["10.1.0.9"])


async def ask(port: int, name: str, rtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, rtype)
    return await asyncio.to_thread(dns.query.udp, q, "127.0.0.1", timeout=2, port=port)


async def eventually(port: int, name: str, within: float = 10) -> dns.message.Message:
    deadline = time.monotonic() + within
    while True:
        try:
            r = await ask(port, name)
            if r.rcode() == dns.rcode.NOERROR and r.answer:
                return r
        except dns.exception.Timeout:
            pass
        assert time.monotonic() < deadline, f"no answer for {name}"
        await asyncio.sleep(0.1)


def test_worker_answers_forwards_reloads_restarts_and_exits() -> None:
    async def main() -> None:
        server = DnsServer("127.0.0.1", 0, [], records=build([WEB], [], [NET], serial=1))
        await server.start()
        worker = server._worker
        assert worker is not None
        try:
            r = await eventually(server.port, "web.blue.tether.local")
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10.1.0.5"]
            nx = await ask(server.port, "nope.blue.tether.local")
            assert nx.rcode() == dns.rcode.NXDOMAIN
            fwd = await ask(server.port, "example.com")  # a miss: through the agent's loop, no upstream
            assert fwd.rcode() == dns.rcode.SERVFAIL and server.forwarded == 1

            server.update(SimpleNamespace(revision=2, endpoints=[WEB, DB], services=[], networks={"blue": NET}))
            r = await eventually(server.port, "db.blue.tether.local")
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10.1.0.9"]

            os.kill(worker.pid, signal.SIGKILL)  # our own child
            r = await eventually(server.port, "db.blue.tether.local")
            assert server.worker_starts == 2 and server._worker is not None and server._worker.pid != worker.pid
            assert worker.poll() is not None
        finally:
            second = server._worker
            await server.close()
        assert second is not None and second.poll() is not None  # the worker exits with the agent

    asyncio.run(main())


# a headless service of 40 backends: ~700 bytes of A records
BIG = Service(name="big", headless=True, backends=[ServiceBackend(ip=f"10.1.1.{i}") for i in range(1, 41)])


def test_answers_too_big_for_udp_are_truncated_and_whole_over_tcp_bare_docker_names_included() -> None:
    async def main() -> None:
        server = DnsServer("127.0.0.1", 0, [], records=build([WEB], [BIG], [NET], serial=1))
        server.docker_search = {"127.0.0.1": ("blue.tether.local",)}  # as if we were a Docker container
        await server.start()
        try:
            await eventually(server.port, "web.blue.tether.local")
            name = "big.default.svc.tether.local"
            plain = await ask(server.port, name)  # no EDNS: 512 bytes at most
            assert plain.flags & dns.flags.TC and not plain.answer
            q = dns.message.make_query(name, "A", use_edns=0, payload=4096)
            edns = await asyncio.to_thread(dns.query.udp, q, "127.0.0.1", timeout=2, port=server.port)
            assert not edns.flags & dns.flags.TC and len(edns.answer[0]) == 40
            q = dns.message.make_query(name, "A")
            whole = await asyncio.to_thread(dns.query.tcp, q, "127.0.0.1", timeout=2, port=server.port)
            assert not whole.flags & dns.flags.TC and len(whole.answer[0]) == 40
            # "web": a bare name, answered through the asking container's search path over TCP as over UDP
            q = dns.message.make_query("web", "A")
            r = await asyncio.to_thread(dns.query.tcp, q, "127.0.0.1", timeout=2, port=server.port)
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10.1.0.5"]
        finally:
            await server.close()

    asyncio.run(main())


def test_the_worker_gets_deltas_and_after_a_gap_all_the_records_again() -> None:
    """After its start the worker gets only what changed; a delta that does not follow its
    generation (a lost change) makes it ask for all the records, and it answers the newest names."""
    import dataclasses

    from tether.agent.dns import DELTA, _frame
    from tether.calc.dns_records import RecordBuilder
    from tether.calc.replica import Replica

    async def main() -> None:
        rep = Replica()
        rep.objects["Network"]["blue"] = NET
        rep.objects["Endpoint"][WEB.id] = WEB
        rep.revision = 1
        server = DnsServer("127.0.0.1", 0, [])
        server.update(rep.view())
        await server.start()
        try:
            await eventually(server.port, "web.blue.tether.local")
            rep.objects["Endpoint"][DB.id] = DB
            rep.revision = 2
            install = server.prepare(rep.view())
            assert install is not None
            install()
            await eventually(server.port, "db.blue.tether.local")
            assert server.full_sends == 1  # the start's; the change went as a delta

            elsewhere = RecordBuilder()  # a delta made from a generation the worker never had
            elsewhere.update({}, {}, [NET], serial=1)
            lost = elsewhere.update({DB.id: DB}, {}, [NET], serial=2)
            server._send(_frame(DELTA, dataclasses.replace(lost, base=7, generation=8)))
            deadline = time.monotonic() + 10
            while server.full_sends < 2:  # the worker reported the gap
                assert time.monotonic() < deadline, "the worker did not ask for all the records after a gap"
                await asyncio.sleep(0.05)
            other = Endpoint(name="cache", network="blue", ips=["10.1.0.12"])
            rep.objects["Endpoint"][other.id] = other
            rep.revision = 3
            server.update(rep.view())  # a delta again, from the generation of the full set
            r = await eventually(server.port, "cache.blue.tether.local")
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10.1.0.12"]
            assert server.full_sends == 2
            assert (await ask(server.port, "web.blue.tether.local")).answer

            del rep.objects["Endpoint"][other.id]  # an install that never runs: our records miss a change
            rep.revision = 4
            assert server.prepare(rep.view()) is not None
            rep.objects["Endpoint"][other.id] = other
            rep.revision = 5
            server.update(rep.view())  # its delta does not follow our records: all of them, to the worker too
            assert server.full_sends == 3 and server.records.generation == server._builder.generation
            r = await eventually(server.port, "cache.blue.tether.local")
            assert [rd.to_text() for rrset in r.answer for rd in rrset] == ["10.1.0.12"]
        finally:
            await server.close()

    asyncio.run(main())
