"""What the lab's kubelets are given (no root, no kubelet needed): a clear message when kubelet is
not built, a configuration that keeps an idle kubelet cheap and off the machine's settings."""

from __future__ import annotations

import os

import yaml

from tether.lab.containerd import (
    GUARD,
    KERNEL_TUNABLES,
    KUBELET_CONFIG,
    KUBELET_MISSING,
    kubelet_binary,
    why_no_kubelet,
)


def test_a_missing_kubelet_is_reported_with_how_to_build_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TETHER_K8S_BIN", str(tmp_path))
    assert kubelet_binary() is None
    why = why_no_kubelet()
    assert why == KUBELET_MISSING and "tools/k8s/build.sh --kubelet" in why  # containerd & co. are installed
    (tmp_path / "kubelet").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "kubelet", 0o755)
    assert kubelet_binary() == str(tmp_path / "kubelet")


def test_the_kubelet_configuration_is_cheap_when_idle_and_leaves_the_machine_alone() -> None:
    c = yaml.safe_load(KUBELET_CONFIG.format(port=1, healthz=2, socket="/x.sock"))
    assert c["failCgroupV1"] is False and c["cgroupsPerQOS"] is False and c["makeIPTablesUtilChains"] is False
    assert c["address"] == c["healthzBindAddress"] == "127.0.0.1"
    assert c["syncFrequency"] == "5m" and c["nodeStatusUpdateFrequency"] == "1m"
    assert c["imageGCHighThresholdPercent"] == 100 and c["evictionHard"] == {}
    assert c["containerRuntimeEndpoint"] == "unix:///x.sock"


def test_kubelets_sysctls_are_bound_in_its_own_mount_namespace_with_the_values_it_wants() -> None:
    # kubelet's setupKernelTunables (pkg/kubelet/cm) sets exactly these; a differing value would be written
    assert KERNEL_TUNABLES == {"vm/overcommit_memory": 1, "vm/panic_on_oom": 0, "kernel/panic": 10,
                               "kernel/panic_on_oops": 1, "kernel/keys/root_maxkeys": 1000000,
                               "kernel/keys/root_maxbytes": 25000000}
    script = GUARD.format(tunables="vm/panic_on_oom=0")
    assert 'mount --bind "$f" "/proc/sys/$k"' in script and script.rstrip().endswith('exec "$@"')
