"""Every command and sub-command answers `--help` with an explanation, never a traceback, and the
shell completion the help advertises is there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from tether.cli.main import app

runner = CliRunner()


def command_paths(cmd=None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """Walk the click tree typer builds: the root, every group and every command."""
    cmd = cmd or typer.main.get_command(app)
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from command_paths(sub, (*path, name))


PATHS = [p for p, _ in command_paths()]


def test_the_walk_finds_the_command_groups() -> None:
    names = {" ".join(p) for p in PATHS}
    assert {"network create", "endpoint show", "service create", "lab up", "dns lookup", "apply", "get"} <= names


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) or "tether" for p in PATHS])
def test_help_exits_0_and_explains(path: tuple[str, ...]) -> None:
    r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    assert "Usage" in r.output or "usage" in r.output
    cmd = dict(command_paths())[path]
    if path != ("agent",):  # the agent's options come from its own argparse parser
        assert (getattr(cmd, "help", None) or "").strip(), f"`tether {' '.join(path)}` has no help text"


def test_help_in_a_real_process_on_a_narrow_terminal() -> None:
    env = {**os.environ, "COLUMNS": "40", "TERM": "dumb"}
    for path in (["service", "create"], ["endpoint", "show"], ["lab", "run"]):
        out = subprocess.run([sys.executable, "-m", "tether.cli.main", *path, "--help"], capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr + out.stdout


def test_shell_completion_script_and_answers() -> None:
    script = subprocess.run([sys.executable, "-m", "tether.cli.main", "--show-completion", "bash"],
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "COMPREPLY" in script.stdout
    env = {**os.environ, "_TETHER_COMPLETE": "complete_bash", "COMP_WORDS": "tether netw", "COMP_CWORD": "1"}
    answer = subprocess.run([sys.executable, "-c", "from tether.cli.main import main; main()"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "network" in answer.stdout.split()


def test_each_short_flag_has_one_meaning_and_n_is_the_namespace() -> None:
    meanings: dict[str, set[str]] = {}
    for _path, cmd in command_paths():
        for param in getattr(cmd, "params", []):
            shorts = [o for o in param.opts if len(o) == 2 and o.startswith("-")]
            longs = [o for o in param.opts if o.startswith("--")]
            for s in shorts:
                meanings.setdefault(s, set()).add(longs[0] if longs else param.name)
    assert meanings["-n"] == {"--namespace"}
    assert {s: m for s, m in meanings.items() if len(m) > 1} == {}


def test_the_lab_name_flag_is_lab_and_the_old_name_still_works() -> None:
    for flag in ("--lab", "--name"):
        r = runner.invoke(app, ["lab", "down", flag, "no-such-lab-xyz"])
        assert r.exit_code == 1 and "no lab named" in r.output
