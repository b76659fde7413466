"""The UDP worker process: answers cluster names from the records the agent sends it, hands misses
back to the agent's event loop, picks up new records, is replaced when it dies, and exits with the
agent. On 127.0.0.1 with a kernel-chosen port; no upstream, so a forwarded query answers SERVFAIL."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from types import SimpleNamespace

import dns.message
import dns.query
import dns.rcode

from tether.agent.dns import DnsServer
from tether.calc.dns_records import build
from tether.model import Endpoint, Network, Subnet

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
