"""The command line explains itself and fails with a message, never a traceback."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from tether import __version__
from tether.cli.main import app

runner = CliRunner()


def test_service_create_help_shows_the_port_syntax_without_crashing() -> None:
    r = runner.invoke(app, ["service", "create", "--help"])
    assert r.exit_code == 0, r.output
    assert "NODEPORT" in r.output


def test_a_bad_port_is_an_error_message_not_a_traceback() -> None:
    r = runner.invoke(app, ["service", "create", "x", "-p", "bad[/x]", "--selector", "a=b"])
    assert r.exit_code == 1
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "is not PORT" in r.output


def test_version() -> None:
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_agent_help_lists_the_agents_options() -> None:
    out = subprocess.run([sys.executable, "-m", "tether.cli.main", "agent", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--underlay-ip" in out.stdout and "--cni-socket" in out.stdout


def test_removing_a_lab_that_does_not_exist_fails() -> None:
    r = runner.invoke(app, ["lab", "down", "--name", "no-such-lab-xyz"])
    assert r.exit_code == 1
    assert "no lab named" in r.output


def test_explain_gives_the_fields_of_a_kinds_document() -> None:
    r = runner.invoke(app, ["explain", "network"])
    assert r.exit_code == 0, r.output
    assert "spec.subnets: list of Subnet" in r.output and "spec.encap: one of vxlan|direct|auto" in r.output
    assert "metadata.name: string (required)" in r.output
    r = runner.invoke(app, ["explain", "svc", "-o", "json"])
    assert r.exit_code == 0 and '"headless"' in r.output and '"$defs"' in r.output
    assert runner.invoke(app, ["explain", "pods"]).exit_code == 1
