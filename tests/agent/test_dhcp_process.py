"""The agent's dnsmasq for VM ports (agent/dhcp.py), run as a stand-in program that records what it
was started with and the signals it got: reload on SIGHUP, restart when the ranges change or it
dies (logged at WARNING), stopped by PID."""

from __future__ import annotations

import logging
import os
import stat
import sys
import time

import pytest

from tether.agent.dhcp import Dnsmasq
from tether.calc.dhcp import DnsmasqConfig

FAKE = """#!{python}
import os, signal, sys, time
d = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--pid-file=")][0].rsplit("/", 1)[0]
open(os.path.join(d, "dnsmasq.pid"), "w").write(str(os.getpid()))
log = open(os.path.join(d, "events"), "a", buffering=1)
log.write(f"start {{os.getpid()}} {{' '.join(a for a in sys.argv if a.startswith('--dhcp-range'))}}\\n")
hosts = os.path.join(d, "hosts")
signal.signal(signal.SIGHUP, lambda *_: log.write("hup " + open(hosts).read().replace(chr(10), ";") + "\\n"))
print("fake dnsmasq: started", file=sys.stderr, flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def dnsmasq(tmp_path) -> Dnsmasq:
    fake = tmp_path / "dnsmasq"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    d = Dnsmasq(str(tmp_path / "run" / "h1-abc"), str(fake))
    yield d
    d.stop()


def events(d: Dnsmasq, n: int) -> list[str]:
    path = os.path.join(d.dir, "events")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(lines := open(path).read().splitlines()) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} events: {open(path).read() if os.path.exists(path) else '(none)'}")


RANGE = ("--dhcp-range=set:sub-a,10.1.0.0,static,255.255.255.0,86400",)


def test_hosts_change_reloads_with_sighup_and_a_range_change_restarts(dnsmasq: Dnsmasq) -> None:
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))
    first = dnsmasq.proc.pid
    assert events(dnsmasq, 1)[0].startswith(f"start {first}")
    assert oct(os.stat(dnsmasq.dir).st_mode & 0o777) == "0o755"  # dnsmasq re-reads as an unprivileged user
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))  # nothing changed: nothing happens
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\nm2\n", "o\n"))
    assert events(dnsmasq, 2)[1] == "hup m1;m2;" and dnsmasq.proc.pid == first
    dnsmasq.apply(DnsmasqConfig((*RANGE, "--dhcp-range=set:sub-b,10.2.0.0,static,255.255.255.0,86400"), "m1\n", "o\n"))
    lines = events(dnsmasq, 3)
    assert dnsmasq.proc.pid != first and lines[2].startswith(f"start {dnsmasq.proc.pid}") and "sub-b" in lines[2]
    assert not os.path.exists(f"/proc/{first}") or open(f"/proc/{first}/stat").read().split()[2] == "Z"


def test_a_dead_dnsmasq_is_restarted_and_said_at_warning(dnsmasq: Dnsmasq, caplog) -> None:
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))
    events(dnsmasq, 1)
    pid = dnsmasq.proc.pid
    dnsmasq.proc.kill()
    dnsmasq.proc.wait()
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\nm2\n", "o\n"))  # a plan meanwhile: no restart of its own
    assert dnsmasq.proc.pid == pid and not dnsmasq.alive()
    dnsmasq._last_start -= 5
    with caplog.at_level(logging.WARNING, "tether.dhcp"):
        dnsmasq.check()
    assert dnsmasq.alive() and dnsmasq.proc.pid != pid
    assert open(os.path.join(dnsmasq.dir, "hosts")).read() == "m1\nm2\n"  # with the latest configuration
    assert any(f"pid {pid}" in r.message and "restarting" in r.message and "fake dnsmasq: started" in r.message
               for r in caplog.records)


def test_nothing_to_serve_or_shutdown_stops_it_by_pid_and_a_stale_one_is_stopped(dnsmasq: Dnsmasq) -> None:
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))
    events(dnsmasq, 1)
    pid = dnsmasq.proc.pid
    dnsmasq.apply(DnsmasqConfig((), "", ""))
    assert dnsmasq.proc is None and not os.path.exists(dnsmasq.dir)
    # an agent killed with its dnsmasq left running: the next one finds it by the PID file
    dnsmasq.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))
    events(dnsmasq, 1)
    orphan = dnsmasq.proc
    dnsmasq.proc = None
    dnsmasq.running = None
    successor = Dnsmasq(dnsmasq.dir, dnsmasq.binary)
    successor.apply(DnsmasqConfig(RANGE, "m1\n", "o\n"))
    try:
        assert orphan.wait(5) is not None and successor.alive() and successor.proc.pid not in (pid, orphan.pid)
    finally:
        successor.stop()
