"""Rules about the repository itself: CI detection, portability of benchmarks, a product that stands
on its own (nothing a user needs may live outside the repo)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.fixtures.lab import in_ci

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("value", ["true", "1", "yes", "TRUE", "on", "anything"])
def test_any_non_empty_ci_value_other_than_false_counts_as_ci(value: str) -> None:
    assert in_ci({"CI": value})


@pytest.mark.parametrize("value", ["", "false", "0", "no", "False", "off"])
def test_unset_or_false_ci_is_not_ci(value: str) -> None:
    assert not in_ci({"CI": value})
    assert not in_ci({})


def _files(*dirs: str, suffixes: tuple[str, ...] = (".py", ".md", "")) -> list[pathlib.Path]:
    out = []
    for d in dirs:
        base = ROOT / d
        paths = [base] if base.is_file() else base.rglob("*")
        out += [p for p in paths if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    return out


def test_no_code_hard_codes_a_checkout_path() -> None:
    """Benchmarks and tests run from wherever the repo is checked out (use sys.executable)."""
    offenders = [str(p) for p in _files("src", "tests", "bench", "scripts")
                 if p != pathlib.Path(__file__).resolve() and "/work/main" in p.read_text(errors="replace")]
    assert offenders == []


def test_the_product_and_its_docs_do_not_depend_on_files_outside_the_repo() -> None:
    def outside(text: str) -> bool:
        return "../shared" in text or "recipes/README" in text

    offenders = [str(p) for p in _files("src", "tests", "bench", "docs", "README.md")
                 if p != pathlib.Path(__file__).resolve() and outside(p.read_text(errors="replace"))]
    assert offenders == []


def test_dns_bench_teardown_stops_what_set_up_started_even_after_a_failed_set_up() -> None:
    from bench import dns

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)

    class FakeLab:
        downs = 0

        def down(self) -> None:
            FakeLab.downs += 1

    try:
        dns.teardown([proc], FakeLab())  # type: ignore[arg-type]
        assert proc.wait(timeout=10) is not None
        assert FakeLab.downs == 1
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, 9)
            proc.wait()
