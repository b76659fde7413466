"""What the agent says about quarantined objects: each newly quarantined object logged once at
WARNING (and its release), and the per-kind gauge `tether_agent_quarantined_objects`. The agent's
side of `tether.calc.quarantine`, which only finds them (pure)."""

from __future__ import annotations

import logging

from tether.calc.plan import Quarantined
from tether.calc.quarantine import CHECKS

log = logging.getLogger("tether.agent.quarantine")

_LOGGED: set[Quarantined] = set()
COUNTS: dict[str, int] = {}  # kind -> objects quarantined now (the metric)


def note(quarantined: tuple[Quarantined, ...] | list[Quarantined], host: str) -> None:
    """Log each newly quarantined object once at WARNING, and keep the per-kind counts."""
    global _LOGGED
    now = set(quarantined)
    for q in sorted(now - _LOGGED):
        log.warning("%s: quarantined %s %r (left out of the plan, everything else is applied): %s", host, q.kind,
                    q.name[:100], q.reason)
    for q in sorted(_LOGGED - now):
        log.warning("%s: %s %r is no longer quarantined", host, q.kind, q.name[:100])
    _LOGGED = now
    COUNTS.clear()
    for q in now:
        COUNTS[q.kind] = COUNTS.get(q.kind, 0) + 1


def metrics(host: str) -> str:
    """Prometheus text of `tether_agent_quarantined_objects{kind}`."""
    lines = ["# HELP tether_agent_quarantined_objects Objects this agent left out of its plan because it "
             "cannot apply them (see `tether status`).", "# TYPE tether_agent_quarantined_objects gauge"]
    for kind in sorted({*CHECKS, *COUNTS}):
        lines.append(f'tether_agent_quarantined_objects{{host="{host}",kind="{kind}"}} {COUNTS.get(kind, 0)}')
    return "\n".join(lines) + "\n"
