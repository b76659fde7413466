"""CPU and memory of a process from /proc, for the benchmarks that watch agents and servers."""

from __future__ import annotations

import os

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None, children: bool = True) -> float:
    """User + system CPU seconds of a process, with its waited-for children's (the agent's `nft`
    runs) unless `children` is False; 0 for no process."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15 if children else 13]) / TICK


def rss_mb(pid: int | None) -> float:
    """Resident memory in MB (one decimal); 0 for no process."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0
