"""Pods whose runtime passes no K8S_POD_NAME are named after their container ID, without collisions."""

from __future__ import annotations

import re

from tether.calc.names import pod_name

LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def test_runtime_hex_ids_keep_their_short_form() -> None:
    assert pod_name("0123456789ABCDEF" * 4) == "c-0123456789ab"


def test_other_ids_are_used_whole_so_that_shared_prefixes_do_not_collide() -> None:
    ids = [f"bench-h1-pod-{i}" for i in range(200)] + ["web-1", "Web_1", "x" * 80, "y" * 80 + "z", "-a-"]
    names = [pod_name(i) for i in ids]
    assert len(set(names)) == len(names)
    assert pod_name("web-1") == "c-web-1" and pod_name("bench-h1-pod-12") == "c-bench-h1-pod-12"
    assert all(LABEL.fullmatch(n) for n in names), names
