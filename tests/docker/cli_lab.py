"""A lab made as a user makes it, with `tether lab up --docker` or `--swarm`, torn down even on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.fixtures.lab import lab_name, require_root_tools
from tether.lab.cluster import LAB_ROOT, Lab
from tether.lab.dockerd import available

TETHER = [sys.executable, "-m", "tether.cli.main"]


def tether(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([*TETHER, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"tether {' '.join(args)}: {r.stderr}"
    return r


@contextmanager
def docker_lab(flag: str, hosts: tuple[str, ...] = ("h1", "h2")) -> Iterator[tuple[str, dict[str, str]]]:
    """(lab name, host -> its dockerd's DOCKER_HOST) of a lab brought up with `flag` (--docker, --swarm)."""
    require_root_tools()
    why = available()
    if why:
        pytest.skip(why)
    name = lab_name()
    try:
        tether("lab", "up", flag, "--hosts", str(len(hosts)), "--lab", name)
        docker_hosts = {}
        for h in hosts:
            out = tether("lab", "docker", h, "--lab", name).stdout
            assert out.startswith("export DOCKER_HOST=unix://"), out
            docker_hosts[h] = out.split()[1].split("=", 1)[1]
        yield name, docker_hosts
    finally:
        if os.path.isdir(os.path.join(LAB_ROOT, name)):
            Lab(name).down()
