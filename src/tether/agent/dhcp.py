"""DHCP for VM ports: one dnsmasq per host, managed by the agent (Neutron's DHCP agent, per host).

What it serves is calculated in `tether.calc.dhcp` from the replica after every applied plan; this
module only runs the process, by PID: started when the host has a VM port to serve, SIGHUP when only
hosts or options changed (dnsmasq re-reads its hosts and options files), restarted when its subnets
changed (dhcp-range is on its command line) or when it died (logged at WARNING with its last
words), stopped when nothing is left to serve and when the agent stops. A dnsmasq left over by an
agent that was killed is found by its PID file and stopped first.

Where it listens: DHCP only (`--port=0`: no DNS), only on interfaces named `tap*` (VM ports' host
sides), and it answers only known MACs on their own tap, so the host's underlay never gets an answer.
Its files live under /run/tether-dhcp (`calc.names.dhcp_dir`), readable by the unprivileged user
dnsmasq becomes; its log is dnsmasq.log there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable

from tether.calc.dhcp import DnsmasqConfig, dnsmasq_config
from tether.calc.names import VXLAN_OVERHEAD, dhcp_dir
from tether.calc.replica import Replica
from tether.model import Endpoint

log = logging.getLogger("tether.dhcp")

LOG_LIMIT = 1 << 20  # dnsmasq.log is started afresh when it is bigger at a (re)start


def base_args(directory: str) -> list[str]:
    return ["--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts",
            "--leasefile-ro", "--log-facility=-", f"--pid-file={directory}/dnsmasq.pid",
            "--interface=tap*", "--bind-dynamic", "--dhcp-ignore=tag:!known", "--dhcp-authoritative", "--no-ping",
            f"--dhcp-hostsfile={directory}/hosts", f"--dhcp-optsfile={directory}/opts"]


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class Dnsmasq:
    """The host's dnsmasq for its VM ports. `apply(config)` is cheap when nothing changed."""

    def __init__(self, directory: str, binary: str = "dnsmasq") -> None:
        self.dir = directory
        self.binary = binary
        self.proc: subprocess.Popen | None = None
        self.running: DnsmasqConfig | None = None  # what the process was started or reloaded with
        self.wanted: DnsmasqConfig | None = None
        self.restarts = 0
        self.reloads = 0
        self._last_start = 0.0
        self._backoff = 2.0  # seconds before restarting one that died

    def apply(self, cfg: DnsmasqConfig) -> None:
        self.wanted = cfg
        if cfg.empty:
            self.stop()
            return
        if self.proc is not None and self.proc.poll() is not None:
            return  # it died: `check` restarts it (with the latest configuration), not every plan
        if self.alive() and cfg == self.running:
            return
        os.makedirs(os.path.dirname(self.dir), mode=0o755, exist_ok=True)  # DHCP_RUN_DIR
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        if self.running is None or cfg.hosts != self.running.hosts:
            _write(os.path.join(self.dir, "hosts"), cfg.hosts)
        if self.running is None or cfg.opts != self.running.opts:
            _write(os.path.join(self.dir, "opts"), cfg.opts)
        if self.alive() and self.running is not None and cfg.args == self.running.args:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)  # re-reads hosts and opts
            self.reloads += 1
            log.info("dnsmasq (pid %d) reloads its VM ports", self.proc.pid)
        else:
            self._start(cfg)
        self.running = cfg

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Restart a dnsmasq that died, saying why at WARNING (2 s after its start at the soonest,
        doubling while it keeps dying at once)."""
        if self.proc is None or self.proc.poll() is None or self.wanted is None or self.wanted.empty:
            return
        now = time.monotonic()
        if now - self._last_start < self._backoff:
            return
        lived = now - self._last_start
        log.warning("dnsmasq (pid %d) for VM ports' DHCP exited with status %s after %.0f s; restarting it. Its "
                    "last log lines: %s", self.proc.pid, self.proc.returncode, lived, self.last_words())
        # one that dies at once (bad arguments, a port taken) is retried ever less often, up to once a minute
        self._backoff = 2.0 if lived > 60 else min(self._backoff * 2, 60.0)
        self.proc = None
        self.running = None
        self.apply(self.wanted)

    def last_words(self, n: int = 3) -> str:
        try:
            with open(os.path.join(self.dir, "dnsmasq.log"), errors="replace") as f:
                return " | ".join(line.strip() for line in f.readlines()[-n:]) or "(none)"
        except OSError:
            return "(no log)"

    def _start(self, cfg: DnsmasqConfig) -> None:
        self.stop(remove=False)
        self.stop_stale()
        logfile = os.path.join(self.dir, "dnsmasq.log")
        with contextlib.suppress(OSError):
            if os.path.getsize(logfile) > LOG_LIMIT:
                os.unlink(logfile)
        with open(logfile, "a") as err:
            self.proc = subprocess.Popen([self.binary, *base_args(self.dir), *cfg.args], stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, start_new_session=True)
        self._last_start = time.monotonic()
        self.restarts += 1
        log.info("dnsmasq (pid %d) serves DHCP to this host's VM ports (%d)", self.proc.pid,
                 cfg.hosts.count("\n"))

    def stop_stale(self) -> None:
        """Stop the dnsmasq a killed agent left behind (its PID file, if that PID is still our dnsmasq)."""
        try:
            with open(os.path.join(self.dir, "dnsmasq.pid")) as f:
                pid = int(f.read().strip() or 0)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            return
        if pid > 1 and b"dnsmasq" in cmdline and f"--pid-file={self.dir}/dnsmasq.pid".encode() in cmdline:
            log.warning("stopping the dnsmasq (pid %d) a previous agent left running", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(20):
                if not os.path.exists(f"/proc/{pid}"):
                    break
                time.sleep(0.05)

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            log.info("dnsmasq (pid %d) stopped", self.proc.pid)
            self.proc = None
        self.running = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


class DhcpService:
    """The agent extra: recomputes the configuration after every applied plan, watches the process."""

    def __init__(self, host: str, state_dir: str, underlay_mtu: int, dns_ip: Callable[[], str | None],
                 binary: str = "dnsmasq", vxlan_overhead: int = VXLAN_OVERHEAD,
                 here: Callable[[Replica], Iterable[Endpoint]] | None = None) -> None:
        self.host = host
        self.here = here  # this host's endpoints of a replica (LocalEndpoints.here), if known
        self.underlay_mtu = underlay_mtu
        self.vxlan_overhead = vxlan_overhead  # the taps' (LocalEndpoints.vxlan_overhead): one MTU for both
        self.dns_ip = dns_ip
        self.dnsmasq = Dnsmasq(dhcp_dir(host, os.path.abspath(state_dir)), binary)
        self.dnsmasq.stop_stale()
        self._task = asyncio.create_task(self._watch())
        self._failed: str | None = None

    def update(self, replica: Replica) -> None:
        cfg = dnsmasq_config(replica, self.host, self.underlay_mtu, self.dns_ip(), overhead=self.vxlan_overhead,
                             endpoints=None if self.here is None else self.here(replica))
        try:
            self.dnsmasq.apply(cfg)
            self._failed = None
        except OSError as e:
            if str(e) != self._failed:
                log.warning("cannot run dnsmasq for VM ports' DHCP (%s); VMs on this host get no DHCP answers. "
                            "Install dnsmasq-base (scripts/install-deps)", e)
            self._failed = str(e)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(1)
            try:
                self.dnsmasq.check()
            except OSError as e:
                log.warning("cannot restart dnsmasq for VM ports' DHCP: %s", e)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self.dnsmasq.stop(remove=False)  # its log stays for whoever looks at why the agent stopped
