"""The wait between reconcile passes: agents started together spread out, and a slow pass stretches
the wait so reconciling takes at most about 1% of a CPU (agent.main.reconcile_delay)."""

from __future__ import annotations

import random

import pytest

from tether.agent.main import reconcile_delay


def test_waits_are_spread_over_plus_minus_a_fifth_of_the_interval() -> None:
    rng = random.Random(29)
    waits = [reconcile_delay(30.0, 0.05, rng) for _ in range(1000)]
    assert 24.0 <= min(waits) < 25.0 and 35.0 < max(waits) <= 36.0
    # 100 agents started together: their first passes fall in different seconds, not all at once
    assert len({int(w) for w in waits[:100]}) >= 10


def test_a_pass_that_took_long_makes_the_next_wait_a_hundred_times_longer() -> None:
    rng = random.Random(29)
    assert all(reconcile_delay(30.0, 1.2, rng) == pytest.approx(120.0) for _ in range(100))
    assert reconcile_delay(30.0, 0.0, rng) >= 24.0
