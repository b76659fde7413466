"""A by-hand check of one kubelet, outside the lab's own: on a lab made with `tether lab up
--kubernetes --no-kubelet`, start a private containerd and kubelet for one lab host, `kubectl run`
a pod bound to it, and check Tether networks it (its endpoint has the pod's address and labels),
then delete it (CNI DEL) and stop everything, printing each step's time. `tether lab up
--kubernetes` itself starts a kubelet on every host (tests/kube/test_kubelet_lab.py tests that);
this script is for looking at one kubelet's start and log alone. See docs/KUBERNETES.md.

    .venv/bin/python tools/k8s/kubelet_check.py --lab LAB [--host h1] [--kubelet PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from tether.lab.cluster import Lab, wait_for
from tether.lab.containerd import Containerd, Kubelet, lab_has_kubelets
from tether.lab.kube import LAB_NETWORK, ROOT, host_kubeconfig, lab_kube_api


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lab", required=True, help="a lab made with `tether lab up --kubernetes`")
    ap.add_argument("--host", default="h1", help="the lab host kubelet runs for (its Node)")
    ap.add_argument("--kubelet", help="kubelet binary (default: build it with tools/k8s/build.sh --kubelet)")
    a = ap.parse_args()
    binary = a.kubelet or os.path.join(subprocess.run([os.path.join(ROOT, "tools", "k8s", "build.sh"), "--kubelet"],
                                                      capture_output=True, text=True, check=True).stdout.split()[-1],
                                       "kubelet")
    lab = Lab(a.lab)
    lab.load()
    if lab_has_kubelets(lab.dir):
        raise SystemExit(f"lab {a.lab} runs kubelets already (tether lab up --kubernetes): a second kubelet for "
                         f"{a.host} would run its pods twice; use a lab made with --no-kubelet")
    kube = lab_kube_api(lab)
    d = tempfile.mkdtemp(prefix="tether-kubelet-")
    ctrd = Containerd(os.path.join(d, "containerd"), os.path.join(lab.dir, "cni-bin", "tether"),
                      {"cniVersion": "1.0.0", "name": LAB_NETWORK, "type": "tether",
                       "agent_socket": lab.cni_socket(a.host)})
    kl = Kubelet(os.path.join(d, "kubelet"), binary, a.host, lab.host(a.host).ns, host_kubeconfig(lab, kube), ctrd)
    pod = f"kubelet-check-{os.getpid()}"
    t0 = time.time()
    try:
        ctrd.start()
        kl.start()
        ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        wait_for(lambda: kube.kubectl("get", "node", a.host, "-o", ready, check=False).stdout == "True", 90,
                 f"node {a.host} Ready (see {kl.dir}/kubelet.log)")
        print(f"node {a.host} Ready after {time.time() - t0:.1f}s")
        kube.kubectl("run", pod, "--image=tether.local/pause:1", "--image-pull-policy=Never", "--labels=app=check",
                     f'--overrides={{"spec":{{"nodeName":"{a.host}"}}}}', "--command", "--", "/bin/sleep", "100000")
        wait_for(lambda: kube.kubectl("get", "pod", pod, "-o", "jsonpath={.status.phase}").stdout == "Running", 60,
                 f"pod {pod} Running")
        ip = kube.kubectl("get", "pod", pod, "-o", "jsonpath={.status.podIP}").stdout

        def endpoint() -> list[dict]:
            return [e for e in lab.client().list_raw("Endpoint") if e["name"] == pod]
        wait_for(lambda: [e for e in endpoint() if e["labels"] == {"app": "check"}], 30, "the pod's labels in Tether")
        [ep] = endpoint()
        assert ep["ips"] == [ip] and ep["host"] == a.host, ep
        print(f"pod {pod} Running on {a.host} at {ip}; Tether endpoint {ep['id']} labels {ep['labels']}")
        kube.kubectl("delete", "pod", pod, "--grace-period=1", "--timeout=60s")
        wait_for(lambda: not endpoint(), 30, "the endpoint to go after the pod's deletion")
        print("deleted; containerd's CNI calls:", " ".join(c["env"]["CNI_COMMAND"] for c in ctrd.calls()))
    finally:
        kube.kubectl("delete", "pod", pod, "--grace-period=0", "--force", check=False)
        kl.stop()
        ctrd.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
