"""The layout step (issue 24) changes no plan: every host's whole plan and the DNS records for
replicas covering every feature are byte-identical to the stored ones (tests/calc/golden.py)."""

from __future__ import annotations

import json
import os

import pytest

from tests.calc.golden import FIXTURES, SCENARIOS, outputs


def _read(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_hosts_plan_and_the_dns_records_equal_the_stored_ones(scenario: str) -> None:
    text = _read(f"{scenario}.replica.json")
    want = json.loads(_read(f"{scenario}.plans.json"))
    planners: dict = {}
    got = json.loads(json.dumps(outputs(text, planners), sort_keys=True))  # the stored form (tuples as lists)
    assert sorted(got) == sorted(want)
    for part in want:
        assert got[part] == want[part], f"{scenario}: {part} differs from the stored plan"
    again = json.loads(json.dumps(outputs(text, planners), sort_keys=True))  # warm: from the planners' memos
    assert again == want
