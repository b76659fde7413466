"""`tether lab ...`: a Tether cluster in network namespaces on this machine, for demos and tests.

Hosts, pods and the "internet" are namespaces; the server, agents and pods are the real things
(agents program the hosts' kernels, pods are plugged by the real `tether-cni`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Annotated

import typer

from tether.cli.output import Format, emit

lab_app = typer.Typer(help="A virtual cluster of hosts in network namespaces on this machine (root needed).",
                      no_args_is_help=True)

# `-n` is the namespace everywhere in the CLI; the lab's name is `--lab` (`--name` still works)
NameOpt = Annotated[str, typer.Option("--lab", "--name", envvar="TETHER_LAB",
                                      help="lab name (prefix of its namespaces); `tether lab env` sets TETHER_LAB")]
OutOpt = Annotated[Format, typer.Option("--output", "-o", help="output format")]


def _fail(msg: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]error:[/red] {escape(msg)}", highlight=False)
    raise typer.Exit(1)


def _lab(name: str, must_exist: bool = True):
    from tether.lab.cluster import Lab, all_labs

    if os.geteuid() != 0:
        _fail("the lab creates network namespaces: run as root")
    lab = Lab(name)
    if must_exist and not lab.state.hosts:
        labs = all_labs()
        _fail(f"no lab named {name!r}" + (f" (labs: {', '.join(labs)})" if labs else "; create one with "
                                          "`tether lab up`"))
    return lab


def _progress():
    from rich.console import Console

    console = Console(stderr=True)
    start = time.time()

    def say(msg: str) -> None:
        console.print(f"[dim]{time.time() - start:5.1f}s[/dim] {msg}", highlight=False)

    return say


@lab_app.command()
def up(name: NameOpt = "lab",
       hosts: Annotated[int, typer.Option(min=1, max=200, help="number of hosts (past 20, progress every 10)")] = 3,
       store: Annotated[str, typer.Option(help="sqlite (embedded) or etcd (starts a local etcd)")] = "sqlite",
       agent_auth: Annotated[str, typer.Option(help="host: each agent joins with a bootstrap token and talks HTTPS "
                                                    "over the underlay with its own credential; admin: agents hold "
                                                    "the admin token")] = "host",
       etcd_endpoints: Annotated[str | None, typer.Option(
           help="with --store etcd: use this etcd cluster (host:port[,host:port...], reachable from the root "
                "namespace) instead of starting one; the lab never stops or wipes it")] = None,
       kubernetes: Annotated[bool, typer.Option(help="also a kube-apiserver (built by tools/k8s), a Node per host, "
                                                     "`tether kube`, and on every host a containerd and kubelet "
                                                     "(see --kubelet)")] = False,
       kubelet: Annotated[bool, typer.Option("--kubelet/--no-kubelet", help=(
           "with --kubernetes: a private containerd and a kubelet on every host (its Node), Tether as their CNI, so "
           "`kubectl run`/`apply` of a pod with spec.nodeName starts it (needs `tools/k8s/build.sh --kubelet`; "
           "without it the lab starts none and says so). --no-kubelet: none; `tether lab kube-pod` then does "
           "what kubelet does for a pod (the same CNI call)"))] = True,
       docker: Annotated[bool, typer.Option(help="also a dockerd on every host, wired to its agent (Tether's "
                                                 "network and IPAM drivers, names resolved by the agent's DNS) "
                                                 "with a busybox image tether-bb:local; `tether lab docker HOST` "
                                                 "prints the DOCKER_HOST of one")] = False,
       swarm: Annotated[bool, typer.Option(help="--docker, and the dockerds form a Docker Swarm (h1 the manager) "
                                                "with the tether-swarm plugin in each: docker network create -d "
                                                "tether-swarm:latest --scope swarm ...")] = False,
       underlay: Annotated[str, typer.Option(help="ipv4: hosts on 198.18.<s>.<i> (and a shared IPv6 prefix); ipv6: "
                                                  "hosts with only IPv6 underlay addresses, fd00:198:19:<s>::<i>/64, "
                                                  "so tunnels and direct routes run over IPv6")] = "ipv4",
       lean: Annotated[bool, typer.Option(help="lighter agents for scale labs: no flow records (conntrack events) "
                                               "and no DNS server on the hosts (pods get no resolver); routing, "
                                               "policy, services and status unchanged; docs/SCALING.md")] = False,
       start_wave: Annotated[int, typer.Option(min=1, help="agents started at a time, each wave ready before the "
                                                           "next (~10 keeps two cores usable)")] = 10) -> None:
    """Build the lab: underlay switch, hosts (h1, h2 on one subnet, h3+ on another), internet, server, agents."""
    if store not in ("sqlite", "etcd"):
        _fail("--store must be sqlite or etcd")
    if agent_auth not in ("host", "admin"):
        _fail("--agent-auth must be host or admin")
    if underlay not in ("ipv4", "ipv6"):
        _fail("--underlay must be ipv4 or ipv6")
    docker = docker or swarm
    if docker:
        from tether.lab.dockerd import available

        why = available()
        if why:
            _fail(f"--docker: {why}")
    if etcd_endpoints:
        if store != "etcd":
            _fail("--etcd-endpoints needs --store etcd")
        if any(":" not in e for e in etcd_endpoints.split(",")):
            _fail(f"--etcd-endpoints {etcd_endpoints!r}: give host:port[,host:port...], e.g. 127.0.0.1:2379")
        store = "etcd://" + etcd_endpoints
    lab = _lab(name, must_exist=False)
    if lab.state.hosts:
        _fail(f"lab {name!r} already exists; `tether lab down --lab {name}` first")
    say = _progress()
    try:
        lab.up(hosts=hosts, store=store, progress=say, agent_auth=agent_auth, underlay=underlay, lean=lean,
               start_wave=start_wave)
        if kubernetes:
            from tether.lab.containerd import kubelet_binary, why_no_kubelet
            from tether.lab.kube import lab_kubernetes

            why = why_no_kubelet() if kubelet else None
            if why:
                from rich.markup import escape

                say(f"[yellow]warning:[/yellow] no kubelets in this lab: {escape(why)}. Meanwhile `tether lab "
                    "kube-pod` runs pods as kubelet would (--no-kubelet: no kubelets, no warning)")
            binary = kubelet_binary() if kubelet and not why else None
            say("kubernetes: etcd, kube-apiserver, a Node per host, tether kube"
                + (", a containerd and kubelet per host" if binary else ""))
            kubeconfig = lab_kubernetes(lab, kubelet=binary, progress=say)
            say(f"kubectl: export KUBECONFIG={kubeconfig}")
            if binary:
                say(f"pods: kubectl run web --image=tether.local/pause:1 --image-pull-policy=Never "
                    f"--overrides='{{\"spec\":{{\"nodeName\":\"h1\"}}}}' -- /bin/sleep 1d  (or `tether lab "
                    f"kube-pod web --host h1 --name {name}`)")
        if docker:
            from tether.lab.dockerd import start_lab_dockerds

            say("docker: a dockerd on every host")
            dockerds = start_lab_dockerds(lab, progress=say, live_restore=not swarm)
            if swarm:
                from tether.lab.swarm import lab_swarm

                lab_swarm(lab, dockerds, progress=say)
    except Exception as e:  # noqa: BLE001 - leave nothing half-built
        say(f"failed: {e}; tearing down")
        lab.down()
        _fail(str(e))
    say(f"lab {name!r} ready: {hosts} hosts. Use the CLI with: eval $(tether lab env --lab {name})")
    if docker:
        say(f"Docker on h1: eval $(tether lab docker h1 --lab {name}); then docker network create -d tether "
            "--ipam-driver tether --subnet 10.77.0.0/24 blue")


@lab_app.command("kube-pod")
def kube_pod(pod: Annotated[str, typer.Argument(help="pod name")],
             host: Annotated[str, typer.Option(help="lab host (the Node the pod is bound to)")] = "h1",
             network: Annotated[str, typer.Option(help="Tether network the hosts' CNI config names")] = "pods",
             namespace: Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace")] = "default",
             label: Annotated[list[str] | None, typer.Option(help="key=value (repeatable)")] = None,
             name: NameOpt = "lab") -> None:
    """Start a pod bound to HOST. With the lab's kubelets: the Pod (busybox, sleeping) is applied and HOST's
    kubelet runs it. Without (`lab up --kubernetes --no-kubelet`): create the Pod in the lab's apiserver, then
    CNI ADD with kubelet's arguments and no labels (they reach Tether through `tether kube`)."""
    from tether.lab.containerd import lab_has_kubelets
    from tether.lab.kube import LAB_NETWORK, kubelet_pod, lab_kube_api, run_kube_pod

    lab = _lab(name)
    labels = dict(kv.split("=", 1) for kv in label or [])
    if lab_has_kubelets(lab.dir):
        if network != LAB_NETWORK:
            _fail(f"--network {network}: the lab's kubelets put every pod on {LAB_NETWORK!r} (their CNI config)")
        p = kubelet_pod(lab, lab_kube_api(lab), host, pod, namespace=namespace, labels=labels)
    else:
        p = run_kube_pod(lab, lab_kube_api(lab), host, pod, network, namespace=namespace, labels=labels)
    print(f"{p.namespace}/{p.name} on {p.host}: {', '.join(p.ips)} (netns {p.ns})")


@lab_app.command()
def populate(endpoints: Annotated[int, typer.Option(min=0, help="endpoints, spread over the hosts")] = 1000,
             policies: Annotated[int | None, typer.Option(min=0, help="policies (default: endpoints/10)")] = None,
             services: Annotated[int | None, typer.Option(min=0, help="services (default: endpoints / 20)")] = None,
             concurrency: Annotated[int, typer.Option(min=1, help="API requests in flight")] = 16,
             name: NameOpt = "lab") -> None:
    """Register a generated population through the API as runtimes would: endpoints (on network `scale`,
    namespaces scale-0..9, without kernel interfaces), NetworkPolicies and services selecting them
    (tether.lab.scale has the shape). Real pods (`tether lab run`) then probe it. See docs/SCALING.md."""
    from tether.lab.scale import Size, objects
    from tether.lab.scale import populate as register

    lab = _lab(name)
    size = Size(len(lab.state.hosts), endpoints, endpoints // 10 if policies is None else policies,
                endpoints // 20 if services is None else services)
    say = _progress()
    say(f"registering {size.label()}")
    took = register(lab.server_url, lab.token, objects(size, [h.name for h in lab.state.hosts]), concurrency, say)
    say("done: " + ", ".join(f"{k} {v} s" for k, v in took.items()))


@lab_app.command()
def down(name: NameOpt = "lab", all_: Annotated[bool, typer.Option("--all", help="every lab")] = False) -> None:
    """Stop the lab's processes (by PID) and delete its namespaces."""
    from tether.lab.cluster import Lab, all_labs

    names = all_labs() if all_ else [name]
    if not all_ and name not in all_labs():
        _fail(f"no lab named {name!r} on this machine (labs: {', '.join(all_labs()) or 'none'})")
    for n in names:
        Lab(n).down()
        print(f"lab {n} removed")


@lab_app.command()
def env(name: NameOpt = "lab") -> None:
    """Print shell exports that point the `tether` CLI at the lab's server (and `tether lab ...` at the lab)."""
    lab = _lab(name)
    print(f"export TETHER_SERVER={lab.server_url}\nexport TETHER_TOKEN={lab.token}\nexport TETHER_LAB={name}")


def tunnels(lab) -> list[dict]:
    """Per host: the VTEP, its static FDB peers and Tether routes, read from the host's kernel."""
    out = []
    for h in lab.state.hosts:
        def ipj(*args: str, ns: str = h.ns) -> list:
            r = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True)
            return json.loads(r.stdout or "[]") if r.returncode == 0 else []

        addrs = [a["local"] for link in ipj("addr", "show", "dev", "tth.vxlan") for a in link.get("addr_info", [])
                 if a.get("family") == "inet"]
        fdb = subprocess.run(["bridge", "-n", h.ns, "-j", "fdb", "show", "dev", "tth.vxlan"], capture_output=True,
                             text=True)
        peers = sorted({e.get("dst") for e in json.loads(fdb.stdout or "[]") if e.get("dst")})
        routes = [r for r in ipj("route", "show", "proto", "201")]
        out.append({"host": h.name, "underlay": h.ip, "vtep": addrs[0] if addrs else "-",
                    "peers": peers, "routes": len(routes),
                    "agent": "up" if lab.agent_status(h.name) == 0 else "down"})
    return out


@lab_app.command()
def status(name: NameOpt = "lab", output: OutOpt = Format.table) -> None:
    """Hosts and their agents, pods, and the tunnels each host's kernel holds."""
    lab = _lab(name)
    pods = [{"name": p.name, "host": p.host, "network": p.network, "namespace": p.namespace, "ips": p.ips,
             "netns": p.ns} for p in lab.state.pods.values()]
    data = {"name": name, "store": lab.state.store, "server": lab.server_url, "tunnels": tunnels(lab), "pods": pods}
    if output != Format.table:
        emit("lab", data, output)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"lab {name} ({lab.state.store} store, server {lab.server_url})", box=None, header_style="bold")
    for col in ("HOST", "UNDERLAY", "AGENT", "VTEP", "TUNNEL PEERS", "ROUTES"):
        t.add_column(col)
    for row in data["tunnels"]:
        t.add_row(row["host"], row["underlay"], row["agent"], row["vtep"], ", ".join(row["peers"]) or "-",
                  str(row["routes"]))
    Console().print(t)
    p = Table(title="pods", box=None, header_style="bold")
    for col in ("POD", "HOST", "NETWORK", "NAMESPACE", "IPS", "NETNS"):
        p.add_column(col)
    for d in pods:
        p.add_row(d["name"], d["host"], d["network"], d["namespace"], ",".join(d["ips"]), d["netns"])
    Console().print(p)


@lab_app.command()
def run(host: str, pod: str, network: Annotated[str, typer.Option("--network", help="Tether network")],
        namespace: Annotated[str, typer.Option("--namespace", "-n", help="the pod's namespace")] = "default",
        label: Annotated[list[str] | None, typer.Option(help="pod label k=v (repeatable)")] = None,
        ip: Annotated[str | None, typer.Option(help="request this address")] = None,
        name: NameOpt = "lab", output: OutOpt = Format.table) -> None:
    """Start a pod on HOST: a network namespace plugged in through the real tether-cni plugin."""
    from tether.lab.cluster import CniFailure

    lab = _lab(name)
    labels = {}
    for item in label or []:
        if "=" not in item:
            _fail(f"label {item!r} must be key=value")
        k, v = item.split("=", 1)
        labels[k] = v
    try:
        p = lab.run_pod(host, pod, network, namespace=namespace, labels=labels, ip=ip)
    except (CniFailure, KeyError, RuntimeError) as e:
        _fail(str(e))
    if output != Format.table:
        emit("pod", {"name": p.name, "host": p.host, "ips": p.ips, "netns": p.ns}, output)
    else:
        print(f"pod {host}/{pod}: {', '.join(p.ips)} (netns {p.ns})")


@lab_app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec(ctx: typer.Context, pod: str, name: NameOpt = "lab") -> None:
    """Run a command in a pod's namespace: `tether lab exec POD -- ping -c1 10.0.0.2`."""
    lab = _lab(name)
    try:
        ns = lab.pod(pod).ns
    except KeyError as e:
        _fail(str(e))
    if not ctx.args:
        _fail("give a command after --")
    sys.exit(subprocess.call(["ip", "netns", "exec", ns, *ctx.args]))


@lab_app.command()
def docker(host: str, name: NameOpt = "lab") -> None:
    """Print the DOCKER_HOST of HOST's dockerd, starting it if `tether lab up --docker` did not (its agent
    serves it Tether's network and IPAM drivers and DNS; busybox image `tether-bb:local`). `tether lab
    down` stops it and removes its containers."""
    from tether.lab.dockerd import IMAGE, available, lab_dockerd, start_lab_dockerd

    lab = _lab(name)
    why = available()
    if why:
        _fail(why)
    try:
        lab_dockerd(lab, host)
    except KeyError as e:
        _fail(str(e))
    try:
        d = start_lab_dockerd(lab, host)
    except (RuntimeError, TimeoutError) as e:
        _fail(f"dockerd on {host} did not start: {e} (its log: {lab_dockerd(lab, host).root / 'dockerd.log'})")
    print(f"export DOCKER_HOST={d.host_url}  # dockerd on {host}, image {IMAGE}")


@lab_app.command()
def rm(pod: str, name: NameOpt = "lab") -> None:
    """Delete a pod: CNI DEL, then its namespace."""
    lab = _lab(name)
    try:
        lab.rm_pod(pod)
    except (KeyError, RuntimeError) as e:
        _fail(str(e))
    print(f"pod {pod} removed")


@lab_app.command()
def demo(name: NameOpt = "demo", hosts: Annotated[int, typer.Option(min=2, max=20)] = 3,
         keep: Annotated[bool, typer.Option(help="leave the lab running afterwards")] = True) -> None:
    """The main job in one command: a lab, a VXLAN network, pods on every host, status and a cross-host ping."""
    from tether.lab.cluster import Lab
    from tether.model import Network, Subnet

    old = Lab(name)
    if old.state.hosts:
        old.down()
    lab = _lab(name, must_exist=False)
    say = _progress()
    try:
        lab.up(hosts=hosts, progress=say)
        say("network 'demo' 10.42.0.0/16 (vxlan, nat-outgoing)")
        lab.client().create_network(Network(name="demo", subnets=[Subnet(cidr="10.42.0.0/16")], encap="vxlan",
                                            nat_outgoing=True))
        for h in lab.state.hosts:
            for i in (1, 2):
                p = lab.run_pod(h.name, f"web{i}", "demo", labels={"app": "web"})
                say(f"pod {h.name}/{p.name}: {p.ip}")
        time.sleep(0.2)
    except Exception as e:  # noqa: BLE001
        lab.down()
        _fail(f"demo failed: {e}")
    status(name=name, output=Format.table)
    a, b = lab.state.pods["h1/web1"], lab.state.pods[f"{lab.state.hosts[-1].name}/web1"]
    print(f"\nping from {a.host}/{a.name} ({a.ip}) to {b.host}/{b.name} ({b.ip}) across the VXLAN overlay:")
    r = lab.exec(f"{a.host}/{a.name}", "ping", "-c", "3", "-i", "0.2", b.ip)
    print(r.stdout.strip() or r.stderr.strip())
    web = lab.exec(f"{a.host}/{a.name}", "curl", "-s", "-m", "3", "http://198.19.255.1/")
    print(f"\negress with nat-outgoing: the internet namespace saw the request from {web.stdout.strip() or '?'}")
    if keep:
        print(f"\nThe lab keeps running. Try:\n  eval $(tether lab env --lab {name}); tether endpoint list\n"
              f"  tether lab exec --lab {name} h2/web1 -- ping -c1 {a.ip}\n  tether lab down --lab {name}")
    else:
        lab.down()
    if r.returncode != 0:
        raise typer.Exit(1)
