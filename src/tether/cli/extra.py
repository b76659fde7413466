"""Sub-command groups that live in their own modules (policy trace/flows, services/DNS), attached
to the main `tether` app when present."""

from __future__ import annotations

import importlib

import typer

MODULES = ("tether.cli.policy_cli", "tether.cli.service_cli")


def register(app: typer.Typer) -> None:
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(app)
