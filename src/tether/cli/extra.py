"""Sub-command groups that live in their own modules (the lab, policy trace/flows, services/DNS),
listed in `GROUPS` and attached to the main `tether` app.

A group whose module cannot be loaded is logged at WARNING with the reason, and its command still
exists: it says why it is unavailable (exit 1) instead of `tether` answering "no such command".
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import typer

log = logging.getLogger("tether.cli")

Register = Callable[[typer.Typer], None]  # adds a group's commands to the app


def _lab(app: typer.Typer) -> None:
    from tether.cli.lab import lab_app

    app.add_typer(lab_app, name="lab")


def _policy(app: typer.Typer) -> None:
    from tether.cli.policy_cli import register

    register(app)


def _services(app: typer.Typer) -> None:
    from tether.cli.service_cli import register

    register(app)


# (what it adds, the commands it adds, how): the commands name the placeholders of a group that fails
GROUPS: tuple[tuple[str, tuple[str, ...], Register], ...] = (
    ("the virtual lab", ("lab",), _lab),
    ("policy trace and flows", ("trace", "flows"), _policy),
    ("services and DNS", ("service", "dns"), _services),
)


def register(app: typer.Typer, groups: tuple[tuple[str, tuple[str, ...], Register], ...] = GROUPS) -> None:
    for what, commands, add in groups:
        try:
            add(app)
        except Exception as e:  # noqa: BLE001 - the other commands must keep working
            reason = f"{type(e).__name__}: {e}"
            log.warning("the commands of %s (%s) cannot be loaded: %s", what, ", ".join(commands), reason)
            for name in commands:
                _placeholder(app, name, what, reason)


def _placeholder(app: typer.Typer, name: str, what: str, reason: str) -> None:
    """A command that says why the real one is missing (every argument accepted, so that it is reached)."""

    @app.command(name, help=f"Unavailable: {reason}", add_help_option=False,
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def unavailable(ctx: typer.Context) -> None:
        typer.echo(f"error: `tether {name}` is unavailable in this installation: the commands of {what} "
                   f"cannot be loaded ({reason}); reinstall tether", err=True)
        raise typer.Exit(1)
