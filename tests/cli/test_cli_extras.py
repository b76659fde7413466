"""Command groups in their own modules: one that cannot load is logged at WARNING with the reason,
and its commands stay, saying why they are unavailable."""

from __future__ import annotations

import logging

import typer
from typer.testing import CliRunner

from tether.cli import extra
from tether.cli.main import app


def test_every_group_is_registered_in_this_build() -> None:
    names = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback} | \
        {g.name for g in app.registered_groups}
    assert {"lab", "trace", "flows", "service", "dns"} <= names


def test_a_group_that_cannot_load_is_logged_and_its_commands_say_why(caplog) -> None:
    def broken(app: typer.Typer) -> None:
        raise ImportError("cannot import name 'Lab' from 'tether.lab.cluster'")

    test_app = typer.Typer()

    @test_app.command()
    def other() -> None:
        """Another command."""

    caplog.set_level(logging.WARNING, "tether.cli")
    extra.register(test_app, (("the virtual lab", ("lab",), broken),))
    assert any("lab" in r.getMessage() and "cannot import name 'Lab'" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    r = CliRunner().invoke(test_app, ["lab", "up", "--hosts", "2"])
    assert r.exit_code == 1
    assert "unavailable" in r.output and "cannot import name 'Lab'" in r.output, r.output
