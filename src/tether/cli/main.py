"""`tether`: the command line. Reads go through `-o table|json|yaml`; errors print the server's
message and exit 1 without a traceback."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tether.cli.config import resolve
from tether.cli.output import Format, emit

app = typer.Typer(help="Tether: container networking. Addresses, cross-host routing, policy, services, DNS.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
network_app = typer.Typer(help="Create, list, show and delete networks.", no_args_is_help=True)
endpoint_app = typer.Typer(help="Create, list, show and delete endpoints (container/VM interfaces).",
                           no_args_is_help=True)
host_app = typer.Typer(help="Hosts registered by their agents.", no_args_is_help=True)
app.add_typer(network_app, name="network")
app.add_typer(endpoint_app, name="endpoint")
app.add_typer(host_app, name="host")



def _version(value: bool) -> None:
    if value:
        from tether import __version__

        print(f"tether {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Tether: container networking. Addresses, cross-host routing, policy, services, DNS."""


ServerOpt = Annotated[str | None, typer.Option("--server", "-s", help="API address: host:port, http://..., or "
                                                "unix:///path (env TETHER_SERVER)", show_default=False)]
TokenOpt = Annotated[str | None, typer.Option("--token", help="bearer token (env TETHER_TOKEN; default: the local "
                                               "server's token file)", show_default=False)]
OutOpt = Annotated[Format, typer.Option("--output", "-o", help="output format")]

ALIASES = {
    "network": "Network", "networks": "Network", "net": "Network",
    "endpoint": "Endpoint", "endpoints": "Endpoint", "ep": "Endpoint",
    "host": "Host", "hosts": "Host",
    "block": "Block", "blocks": "Block",
    "namespace": "Namespace", "namespaces": "Namespace", "ns": "Namespace",
    "networkpolicy": "NetworkPolicy", "networkpolicies": "NetworkPolicy", "netpol": "NetworkPolicy",
    "securitygroup": "SecurityGroup", "securitygroups": "SecurityGroup", "sg": "SecurityGroup",
    "service": "Service", "services": "Service", "svc": "Service",
}


def fail(message: str) -> None:
    """Print an error and exit 1. The message is text, never markup (it may quote "[...]" syntax)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(1)


def client(server: str | None, token: str | None):
    from tether.client import TetherClient

    s = resolve(server, token)
    return TetherClient(s.server, s.token)


def run(fn):
    """Call `fn()`, turning API and connection errors into a one-line message and exit 1."""
    from tether.client import ApiError, ServerUnreachable
    from tether.manifests import ManifestError

    try:
        return fn()
    except ApiError as e:
        fail(f"{e.detail} (HTTP {e.status})")
    except (ServerUnreachable, ManifestError) as e:
        fail(str(e))


def parse_labels(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            fail(f"label {item!r} must be key=value")
        out[k] = v
    return out


# --- daemons -------------------------------------------------------------------------------------

@app.command()
def server(
    store: Annotated[str | None, typer.Option(help="sqlite:///path/tether.db (default: in --state-dir) or "
                                                   "etcd://host:port[,host:port...]")] = None,
    listen: Annotated[list[str] | None, typer.Option(help="host:port or unix:///path; repeatable "
                                                          "[default: unix:///run/tether/server.sock and "
                                                          "127.0.0.1:7443]")] = None,
    state_dir: Annotated[str, typer.Option(help="token and SQLite database live here")] = "/var/lib/tether",
    insecure: Annotated[bool, typer.Option(help="no token; only with loopback or unix listeners")] = False,
    service_cidr: Annotated[str, typer.Option(help="range for service virtual IPs")] = "10.96.0.0/16",
    dead_host_grace: Annotated[float, typer.Option(help="seconds after a host's lease expires before its "
                                                        "addresses are reclaimed")] = 600.0,
    max_body: Annotated[int, typer.Option(help="largest request body in bytes (413 above it); the other limits "
                                               "are flags of `python -m tether.server.main`")] = 1 << 20,
) -> None:
    """Run the control plane: the API over the store (SQLite by default, or etcd)."""
    from tether.server.limits import Limits
    from tether.server.main import run_server

    run_server(store, listen, state_dir, insecure, service_cidr=service_cidr, dead_host_grace=dead_host_grace,
               limits=Limits(max_body=max_body))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def agent(ctx: typer.Context) -> None:
    """Run the host agent: registers this host, programs its routes, VXLAN and nftables, serves CNI, Docker
    and DNS. `tether agent --help` lists its options."""
    from tether.agent.main import main as agent_main

    agent_main(ctx.args)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def kube(ctx: typer.Context) -> None:
    """Run the Kubernetes controller: mirrors a cluster's Namespaces, Pods, NetworkPolicies, Services,
    EndpointSlices and Nodes into Tether. `tether kube --help` lists its options."""
    from tether.kube.controller import main as kube_main

    kube_main(ctx.args)


# --- networks ------------------------------------------------------------------------------------

@network_app.command("create")
def network_create(
    name: str,
    subnet: Annotated[list[str], typer.Option(help="CIDR, e.g. 10.1.0.0/16 (repeatable)")],
    gateway: Annotated[str | None, typer.Option(help="gateway address (first subnet)")] = None,
    encap: Annotated[str, typer.Option(help="vxlan | direct | auto")] = "vxlan",
    nat_outgoing: Annotated[bool, typer.Option(help="masquerade traffic leaving all Tether networks")] = False,
    mtu: Annotated[int | None, typer.Option(help="default: derived from the underlay")] = None,
    block_size: Annotated[int, typer.Option(help="prefix length of IPAM blocks")] = 26,
    domain: Annotated[str, typer.Option(help="DNS domain")] = "tether.local",
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """Create a network with one or more subnets."""
    from pydantic import ValidationError

    from tether.model import Network, Subnet

    try:
        subnets = [Subnet(cidr=c) for c in subnet]
        if gateway:
            subnets[0] = Subnet(cidr=subnets[0].cidr, gateway=gateway)
        net = Network(name=name, subnets=subnets, encap=encap, nat_outgoing=nat_outgoing, mtu=mtu,
                      block_size=block_size, dns_domain=domain)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
        return
    c = client(server, token)
    made = run(lambda: c.create_network(net))
    emit("Network", made.model_dump(mode="json"), output)


@network_app.command("list")
def network_list(server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """List networks."""
    c = client(server, token)
    emit("Network", run(lambda: c.list_raw("Network")), output)


@network_app.command("show")
def network_show(name: str, server: ServerOpt = None, token: TokenOpt = None,
                 output: OutOpt = Format.yaml) -> None:
    """Show one network, with its endpoints and blocks."""
    c = client(server, token)
    net = run(lambda: c.request("GET", f"/api/v1/networks/{name}"))
    if output != Format.table:
        emit("Network", net, output)
        return
    emit("Network", net, output)
    emit("Endpoint", run(lambda: c.list_raw("Endpoint", network=name)), output, title="endpoints")
    emit("Block", run(lambda: c.list_raw("Block", network=name)), output, title="blocks")


@network_app.command("delete")
def network_delete(name: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete a network (refused while it has endpoints)."""
    c = client(server, token)
    run(lambda: c.delete("Network", name))
    print(f"network {name} deleted")


# --- endpoints -----------------------------------------------------------------------------------

@endpoint_app.command("create")
def endpoint_create(
    name: str,
    network: Annotated[str, typer.Option(help="network to attach to")],
    host: Annotated[str | None, typer.Option(help="host the endpoint lives on")] = None,
    namespace: Annotated[str, typer.Option(help="namespace (for policies and DNS)")] = "default",
    ip: Annotated[list[str] | None, typer.Option(help="static address (default: from IPAM)")] = None,
    label: Annotated[list[str] | None, typer.Option(help="k=v (repeatable)")] = None,
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """Create an endpoint; its address comes from IPAM unless --ip is given."""
    from tether.model import Endpoint

    ep = Endpoint(name=name, network=network, host=host, namespace=namespace, ips=ip or [],
                  labels=parse_labels(label or []))
    c = client(server, token)
    made = run(lambda: c.create_endpoint(ep))
    emit("Endpoint", made.model_dump(mode="json"), output)


def find_endpoint(c, ref: str, network: str | None) -> dict:
    """By exact id or name first, then by id prefix; an id the list leaves out (an endpoint stored
    under older, looser rules) is fetched directly, and shows why it is invalid."""
    listed = run(lambda: c.list_raw("Endpoint", network=network))
    eps = [e for e in listed if ref in (e["id"], e["name"])] or [e for e in listed if e["id"].startswith(ref)]
    if not eps:
        from tether.client import ApiError

        try:
            return c.request("GET", f"/api/v1/endpoints/{ref}")
        except ApiError:
            pass
        fail(f"endpoint {ref!r} not found" + (f" in network {network!r}" if network else ""))
    if len(eps) > 1:
        fail(f"{len(eps)} endpoints match {ref!r}; give --network or the id")
    return eps[0]


@endpoint_app.command("list")
def endpoint_list(
    network: Annotated[str | None, typer.Option(help="only this network")] = None,
    host: Annotated[str | None, typer.Option(help="only this host")] = None,
    namespace: Annotated[str | None, typer.Option(help="only this namespace")] = None,
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """List endpoints."""
    c = client(server, token)
    emit("Endpoint", run(lambda: c.list_raw("Endpoint", network=network, host=host, namespace=namespace)), output)


@endpoint_app.command("show")
def endpoint_show(ref: str, network: Annotated[str | None, typer.Option()] = None, server: ServerOpt = None,
                  token: TokenOpt = None, output: OutOpt = Format.yaml) -> None:
    """Show one endpoint (by name, id or id prefix), with why a host's agent left it out of its plan
    (`quarantined`), if one did."""
    c = client(server, token)
    ep = find_endpoint(c, ref, network)
    hosts = run(lambda: c.list_raw("Host"))
    held = [{"host": h["name"], "reason": p["reason"], "since": p["since"]} for h in hosts
            for p in (h.get("status") or {}).get("problems", []) if p["kind"] == "Endpoint" and p["name"] == ep["id"]]
    if held:
        ep["quarantined"] = held
    emit("Endpoint", ep, output)


@endpoint_app.command("delete")
def endpoint_delete(ref: str, network: Annotated[str | None, typer.Option()] = None, server: ServerOpt = None,
                    token: TokenOpt = None) -> None:
    """Delete an endpoint and release its addresses."""
    c = client(server, token)
    ep = find_endpoint(c, ref, network)
    run(lambda: c.delete("Endpoint", ep["id"]))
    print(f"endpoint {ep['name']} deleted ({', '.join(ep['ips'])} released)")


@host_app.command("list")
def host_list(server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """List hosts and whether their agents are alive."""
    c = client(server, token)
    emit("Host", run(lambda: c.list_raw("Host")), output)


# --- documents -----------------------------------------------------------------------------------

def read_input(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}")
        return ""


@app.command()
def apply(file: Annotated[str, typer.Option("--filename", "-f", help="YAML/JSON file, or - for stdin")],
          server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Create or update objects from documents: Tether kinds and Kubernetes Namespace, NetworkPolicy, Service."""
    from tether.manifests import parse

    objs = run(lambda: parse(read_input(file)))
    c = client(server, token)
    for obj in objs:
        if obj.kind == "Network":
            made = run(lambda o=obj: c.request("PUT", f"/api/v1/networks/{o.name}",
                                               content=o.model_dump_json(exclude={"revision"})))
            print(f"network/{made['name']} applied")
            continue
        if obj.kind == "Endpoint":
            existing = [e for e in c.list_raw("Endpoint", network=obj.network, namespace=obj.namespace)
                        if e["name"] == obj.name]
            if existing:
                print(f"endpoint/{obj.name} unchanged")
                continue
        made = run(lambda o=obj: c.apply(o))
        print(f"{obj.kind.lower()}/{made.store_name()} applied")


@app.command()
def delete(file: Annotated[str, typer.Option("--filename", "-f", help="YAML/JSON file, or - for stdin")],
           server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete the objects described in documents."""
    from tether.client import ApiError
    from tether.manifests import parse

    objs = run(lambda: parse(read_input(file)))
    c = client(server, token)
    for obj in reversed(objs):
        ref = obj.store_name()
        if obj.kind == "Endpoint":
            ref = find_endpoint(c, obj.name, obj.network)["id"]
        try:
            c.delete(obj.kind, ref)
            print(f"{obj.kind.lower()}/{obj.store_name() if obj.kind != 'Endpoint' else obj.name} deleted")
        except ApiError as e:
            if e.status == 404:
                print(f"{obj.kind.lower()}/{obj.name} not found")
            else:
                fail(f"{e.detail} (HTTP {e.status})")


@app.command()
def get(kind: Annotated[str, typer.Argument(help="networks, endpoints, hosts, blocks, namespaces, "
                                                 "networkpolicies, securitygroups, services (or short names)")],
        name: Annotated[str | None, typer.Argument(help="one object (namespace/name for namespaced kinds)")] = None,
        namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
        server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """Show objects of a kind."""
    from tether.client import path_of
    from tether.model import KINDS

    k = ALIASES.get(kind.lower())
    if k is None:
        fail(f"unknown kind {kind!r}; use one of: {', '.join(sorted(set(ALIASES)))}")
        return
    c = client(server, token)
    if name is None:
        params = {"namespace": namespace} if namespace and k in ("NetworkPolicy", "Service", "Endpoint") else {}
        emit(k, run(lambda: c.request("GET", path_of(k), params=params)), output)
        return
    if k == "Endpoint":
        emit(k, find_endpoint(c, name, None), output)
        return
    if KINDS[k].namespaced and "/" not in name:
        name = f"{namespace or 'default'}/{name}"
    emit(k, run(lambda: c.request("GET", path_of(k, name))), output)


@app.command()
def status(server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """Hosts, networks and endpoint counts at a glance."""
    c = client(server, token)
    hosts = run(lambda: c.list_raw("Host"))
    nets = run(lambda: c.list_raw("Network"))
    eps = run(lambda: c.list_raw("Endpoint"))
    if output != Format.table:
        emit("status", {"hosts": hosts, "networks": nets, "endpoints": len(eps)}, output)
        return
    for h in hosts:
        h.setdefault("labels", {})
    emit("Host", hosts, output, title="hosts")
    print_problems(hosts)
    for n in nets:
        n["labels"] = {"endpoints": str(sum(1 for e in eps if e["network"] == n["name"]))}
    emit("Network", nets, output, title="networks")
    print(f"{len(eps)} endpoints")


def print_problems(hosts: list[dict]) -> None:
    """Per host, what its agent could not apply: quarantined objects and failed kernel operations."""
    rows = [(h["name"], "quarantined" if which == "problems" else "failed", p["kind"], p["name"], p["reason"])
            for h in hosts for which in ("problems", "failed_ops")
            for p in (h.get("status") or {}).get(which, [])]
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="problems", box=None, header_style="bold")
    for col in ("HOST", "WHAT", "KIND", "NAME", "REASON"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(str(x)[:300] for x in row))
    Console().print(table)


def _register_optional() -> None:
    """Sub-commands whose modules may not be present in every build."""
    try:
        from tether.cli.lab import lab_app

        app.add_typer(lab_app, name="lab")
    except ImportError:
        pass
    try:
        from tether.cli.extra import register

        register(app)
    except ImportError:
        pass


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
