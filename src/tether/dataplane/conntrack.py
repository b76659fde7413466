"""Marking a host's conntrack entries for judging again after a policy change (`conntrack -U`).

The forward chain accepts an established connection without looking at policies, so a policy
that now forbids it would never stop it. Instead of deleting the entries (a deleted entry is picked
up again mid-stream: a NAT-ed connection would be translated anew, and which end began it is lost),
the agent sets the ct mark bit `CT_REJUDGE` on the entries of the pods whose verdicts may have
changed; the table's `midstream` chains then judge each such connection's next packet towards its
server with the current policies (calc.midstream_chains): allowed, it is an ordinary connection
again; denied, both its directions are dropped from then on.
"""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Iterable

from tether.calc.names import CT_DENIED, CT_PICKED, CT_REJUDGE

log = logging.getLogger(__name__)

UPDATED = "flow entries have been updated"  # conntrack's report, also when none matched (exit code 1)


PER_ADDRESS = 16  # above this many addresses, one filter per subnet (two processes each) instead


def rejudge_commands(addresses: Iterable[str], picked: bool = False, subnets: Iterable[str] = ()
                     ) -> list[list[str]]:
    """`conntrack -U` commands marking every entry with one of `addresses` as its original source
    (the pod began it) or its reply source (the pod answers it, also behind a service's DNAT):
    CT_REJUDGE set, other bits kept (conntrack: mark = (mark & ~mask) ^ value). `picked`: the
    addresses were not tracked until now, so their entries were made mid-stream, or are stale ones
    from an earlier tracked period, or were made while conntrack registered in the namespace and the
    new table was not in place yet (`nft` registers it before its batch commits): which end began
    them is unknown, so CT_PICKED is set too and CT_DENIED cleared.
    Two processes per address; with more than PER_ADDRESS of them, two per subnet of `subnets` that
    holds one (`--orig-src/--orig-dst <cidr>`; conntrack 1.4.7 takes no prefix for reply
    addresses): every connection of those subnets is judged again, which changes nothing for one
    still allowed, but one through a service's DNAT whose backend is here is missed."""
    if picked:
        value, mask = CT_REJUDGE | CT_PICKED, CT_REJUDGE | CT_PICKED | CT_DENIED
    else:
        value = mask = CT_REJUDGE
    mark = ["--mark", f"{value:#x}/{mask:#x}"]
    wanted = sorted(set(addresses))
    if len(wanted) <= PER_ADDRESS:
        return [["conntrack", "-U", flag, a, *mark] for a in wanted for flag in ("--orig-src", "--reply-src")]
    nets = [ipaddress.ip_network(c, strict=False) for c in sorted(set(subnets))]
    covering = sorted({str(n) for a in wanted for n in nets if ipaddress.ip_address(a) in n})
    rest = [a for a in wanted if not any(ipaddress.ip_address(a) in ipaddress.ip_network(c) for c in covering)]
    return ([["conntrack", "-U", flag, c, *mark] for c in covering for flag in ("--orig-src", "--orig-dst")]
            + [["conntrack", "-U", flag, a, *mark] for a in rest for flag in ("--orig-src", "--reply-src")])


def rejudge(addresses: Iterable[str], picked: bool = False, subnets: Iterable[str] = (),
            netns: str | None = None) -> list[str]:
    """Mark the entries of `addresses` for judging again; returns what failed (logged as warnings)."""
    failed = []
    for cmd in rejudge_commands(addresses, picked, subnets):
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            failed.append(f"{' '.join(cmd)}: {e}")
            continue
        if r.returncode != 0 and UPDATED not in r.stderr:
            failed.append(f"{' '.join(cmd)}: {r.stderr.strip()[:200]}")
    for f in failed:
        log.warning("marking connections for judging again after a policy change failed (they keep their "
                    "verdict until they end; is conntrack-tools installed?): %s", f)
    return failed
