"""`tether`: the command line. Reads go through `-o table|json|yaml`; errors print the server's
message and exit 1 without a traceback."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from tether.cli import extra
from tether.cli.config import resolve
from tether.cli.output import Format, emit

app = typer.Typer(help="Tether: container networking. Addresses, cross-host routing, policy, services, DNS.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
network_app = typer.Typer(help="Create, list, show and delete networks.", no_args_is_help=True)
endpoint_app = typer.Typer(help="Create, list, show and delete endpoints (container/VM interfaces).",
                           no_args_is_help=True)
host_app = typer.Typer(help="Hosts registered by their agents; joining and revoking them.", no_args_is_help=True)
app.add_typer(network_app, name="network")
app.add_typer(endpoint_app, name="endpoint")
app.add_typer(host_app, name="host")
host_token_app = typer.Typer(help="Bootstrap tokens that join hosts (admin).", no_args_is_help=True)
host_app.add_typer(host_token_app, name="token")



def _version(value: bool) -> None:
    if value:
        from tether import __version__

        print(f"tether {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False,
          ca_file: Annotated[str | None, typer.Option("--ca-file", help="cluster CA to verify an https:// server "
                                                      "with (env TETHER_CA_FILE, config ca_file; default: "
                                                      "/var/lib/tether/ca.crt when it exists)",
                                                      show_default=False)] = None) -> None:
    """Tether: container networking. Addresses, cross-host routing, policy, services, DNS."""
    from tether.cli import config

    config.ca_file_flag = ca_file


ServerOpt = Annotated[str | None, typer.Option("--server", "-s", help="API address: https://host:port, "
                                                "http://127.0.0.1:port, or unix:///path; several as a,b,c (the "
                                                "next is tried when one is down) (env TETHER_SERVER)",
                                                show_default=False)]
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

    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(1)


def client(server: str | None, token: str | None):
    from tether.client import TetherClient

    s = resolve(server, token)
    try:
        return TetherClient(s.server, s.token, ca_file=s.ca_file)
    except ValueError as e:
        fail(str(e))


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

server_app = typer.Typer(help="Run the control plane, or back up and restore its SQLite database.")
app.add_typer(server_app, name="server")


@server_app.callback(invoke_without_command=True)
def server(
    ctx: typer.Context,
    store: Annotated[str | None, typer.Option(help="sqlite:///path/tether.db (default: in --state-dir) or "
                                                   "etcd://host:port[,host:port...]")] = None,
    listen: Annotated[list[str] | None, typer.Option(help="host:port (HTTPS; plain HTTP on loopback), "
                                                          "https://host:port, http://127.0.0.1:port or "
                                                          "unix:///path; repeatable [default: "
                                                          "unix:///run/tether/server.sock and 127.0.0.1:7443]")] = None,
    state_dir: Annotated[str, typer.Option(help="token and SQLite database live here")] = "/var/lib/tether",
    insecure: Annotated[bool, typer.Option(help="no token; only with loopback or unix listeners")] = False,
    service_cidr: Annotated[str, typer.Option(help="range for service virtual IPs")] = "10.96.0.0/16",
    dead_host_grace: Annotated[float, typer.Option(help="seconds after a host's lease expires before its "
                                                        "addresses are reclaimed")] = 600.0,
    gc_interval: Annotated[float, typer.Option(help="seconds between garbage collection and compaction rounds, run "
                                                    "by the one server elected leader; 0: off")] = 30.0,
    compact_keep: Annotated[int | None, typer.Option(help="revisions of history kept when the leader compacts "
                                                          "etcd [default: 10000 on etcd; 0: never]",
                                                     show_default=False)] = None,
    max_body: Annotated[int, typer.Option(help="largest request body in bytes (413 above it); the other limits "
                                               "are flags of `python -m tether.server.main`")] = 1 << 20,
    tls_cert: Annotated[str | None, typer.Option(help="server certificate (PEM); default: one made from the state "
                                                      "dir's own CA (ca.crt) at first start")] = None,
    tls_key: Annotated[str | None, typer.Option(help="private key of --tls-cert")] = None,
    tls_ca: Annotated[str | None, typer.Option(help="CA that signed --tls-cert (given to joining hosts)")] = None,
    tls_san: Annotated[list[str] | None, typer.Option(help="extra name or IP the made certificate covers "
                                                           "(repeatable)")] = None,
    insecure_http: Annotated[bool, typer.Option(help="DANGEROUS: allow http://ADDR:PORT listeners off loopback; "
                                                     "tokens then cross the network in clear")] = False,
    etcd_cacert: Annotated[str | None, typer.Option(help="CA of etcd's certificates: talk TLS to etcd")] = None,
    etcd_cert: Annotated[str | None, typer.Option(help="client certificate (etcd --client-cert-auth)")] = None,
    etcd_key: Annotated[str | None, typer.Option(help="private key of --etcd-cert")] = None,
    etcd_user: Annotated[str | None, typer.Option(help="etcd user (etcd auth on; a role with readwrite on "
                                                       "/tether/)")] = None,
    etcd_password_file: Annotated[str | None, typer.Option(help="file holding --etcd-user's password")] = None,
) -> None:
    """Run the control plane: the API over the store (SQLite by default, or etcd), HTTPS on TCP listeners.
    `tether server backup` and `tether server restore` copy its SQLite database out and back."""
    if ctx.invoked_subcommand is not None:
        return
    from tether.server.limits import Limits
    from tether.server.main import TlsOptions, etcd_access_of, run_server

    run_server(store, listen, state_dir, insecure, service_cidr=service_cidr, dead_host_grace=dead_host_grace,
               gc_interval=gc_interval, compact_keep=compact_keep, limits=Limits(max_body=max_body),
               tls=TlsOptions(tls_cert, tls_key, tls_ca, list(tls_san or []), insecure_http),
               etcd_access=etcd_access_of(store, etcd_cacert, etcd_cert, etcd_key, etcd_user, etcd_password_file))


DbStoreOpt = Annotated[str | None, typer.Option("--store", help="sqlite:///path/tether.db [default: tether.db in "
                                                "--state-dir]", show_default=False)]
StateDirOpt = Annotated[str, typer.Option(help="the server's state directory")]


def sqlite_path(store: str | None, state_dir: str) -> str:
    import os

    if store is None:
        return os.path.join(state_dir, "tether.db")
    if not store.startswith("sqlite://"):
        fail(f"--store {store}: backup and restore are for the SQLite store; for etcd use etcdctl snapshot save "
             "and etcdutl snapshot restore")
    return store[len("sqlite://"):]


@server_app.command("backup")
def server_backup(
    to: Annotated[str, typer.Option("--to", help="file to write the copy to (replaced if it exists)")],
    store: DbStoreOpt = None, state_dir: StateDirOpt = "/var/lib/tether",
) -> None:
    """Copy the SQLite database to a file: online (the server keeps serving), one consistent revision,
    checked before it is renamed into place."""
    from tether.store.sqlite import DatabaseUnusable, backup

    path = sqlite_path(store, state_dir)
    try:
        rev = backup(path, to)
    except (DatabaseUnusable, OSError) as e:
        fail(f"backup of {path} failed: {e}")
    print(f"backed up {path} at revision {rev} to {to}")


@server_app.command("restore")
def server_restore(
    from_: Annotated[str, typer.Option("--from", help="a file written by `tether server backup`")],
    store: DbStoreOpt = None, state_dir: StateDirOpt = "/var/lib/tether",
) -> None:
    """Replace the SQLite database by a backup. The server must be stopped; the backup is checked
    first; the replaced database is kept as tether.db.before-restore. Agents resync by themselves."""
    from tether.store.sqlite import DatabaseUnusable, restore

    path = sqlite_path(store, state_dir)
    try:
        rev, kept = restore(path, from_)
    except DatabaseUnusable as e:
        fail(f"restore refused: {e}")
        raise  # unreachable: fail() exits
    except OSError as e:
        fail(f"restore of {path} failed: {e}")
        raise
    print(f"restored {path} from {from_}; revision now {rev}" + (f"; the replaced database is {kept}" if kept else ""))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def agent(ctx: typer.Context) -> None:
    """Run the host agent: registers this host, programs its routes, VXLAN and nftables, serves CNI, Docker
    and DNS. `tether agent --help` lists its options."""
    # the agent is a program of its own that this command starts, as `python -m tether.agent.main`
    # would: the CLI never uses agent code (tests/meta/test_import_graph.py)
    importlib.import_module("tether.agent.main").main(ctx.args)


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


@network_app.command("update")
def network_update(
    name: str,
    add_subnet: Annotated[list[str] | None, typer.Option(help="add a subnet CIDR (repeatable)")] = None,
    remove_subnet: Annotated[list[str] | None, typer.Option(help="remove a subnet (refused while endpoints hold "
                                                                 "addresses in it)")] = None,
    encap: Annotated[str | None, typer.Option(help="vxlan | direct | auto (direct: every host on one underlay "
                                                   "subnet)")] = None,
    nat_outgoing: Annotated[bool | None, typer.Option("--nat-outgoing/--no-nat-outgoing",
                                                      help="masquerade traffic leaving all Tether networks",
                                                      show_default=False)] = None,
    mtu: Annotated[int | None, typer.Option(help="pods plugged from now on get it; 0 = derived from the underlay",
                                            show_default=False)] = None,
    domain: Annotated[str | None, typer.Option(help="DNS domain")] = None,
    block_size: Annotated[int | None, typer.Option(help="prefix length of IPAM blocks (refused once the network "
                                                        "has blocks)")] = None,
    label: Annotated[list[str] | None, typer.Option(help="set a label k=v; k= removes it (repeatable)")] = None,
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """Change a network in place. The name cannot change (it is the network's key: create another
    network); a subnet holding addresses cannot be removed and the block size cannot change once
    addresses were handed out; the server refuses those and says why."""
    from pydantic import ValidationError

    from tether.model import Network, Subnet

    c = client(server, token)
    data = run(lambda: c.request("GET", f"/api/v1/networks/{name}"))
    changes: dict = {}
    if add_subnet or remove_subnet:
        subnets = [s for s in data["subnets"] if s["cidr"] not in set(remove_subnet or [])]
        missing = sorted(set(remove_subnet or []) - {s["cidr"] for s in data["subnets"]})
        if missing:
            fail(f"network {name!r} has no subnet {', '.join(missing)}; its subnets: "
                 f"{', '.join(s['cidr'] for s in data['subnets'])}")
        try:
            subnets += [Subnet(cidr=cidr).model_dump(mode="json") for cidr in add_subnet or []]
        except ValidationError as e:
            fail("; ".join(x["msg"] for x in e.errors()))
        changes["subnets"] = subnets
    for key, value in (("encap", encap), ("nat_outgoing", nat_outgoing), ("dns_domain", domain),
                       ("block_size", block_size), ("mtu", None if mtu == 0 else mtu)):
        if value is not None or (key == "mtu" and mtu == 0):
            changes[key] = value
    if label:
        changes["labels"] = {k: v for k, v in {**data["labels"], **parse_labels(label)}.items() if v}
    if not changes:
        fail("nothing to change: give --add-subnet, --remove-subnet, --encap, --[no-]nat-outgoing, --mtu, --domain, "
             "--block-size or --label")
    try:
        net = Network.model_validate({**data, **changes})
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
        return
    made = run(lambda: c.request("PUT", f"/api/v1/networks/{name}", content=net.model_dump_json(exclude={"revision"})))
    if output != Format.table:
        emit("Network", made, output)
        return
    print(f"network {name} updated: {', '.join(sorted(changes))}")


def list_command(app: typer.Typer, kind: str, help_text: str) -> None:
    """`tether <kind> list`: every object of a kind that has no filters."""

    def list_all(server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
        c = client(server, token)
        emit(kind, run(lambda: c.list_raw(kind)), output)

    list_all.__doc__ = help_text
    app.command("list")(list_all)


list_command(network_app, "Network", "List networks.")


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
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="namespace (for policies and DNS)")] = "default",
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
    namespace: Annotated[str | None, typer.Option("--namespace", "-n", help="only this namespace")] = None,
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


list_command(host_app, "Host", "List hosts and whether their agents are alive.")


@host_app.command("revoke")
def host_revoke(name: str, server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Revoke a host's credential now: its agent's next call gets 401 and its watch streams end (admin).
    Join it again with a new bootstrap token."""
    c = client(server, token)
    out = run(lambda: c.request("DELETE", f"/api/v1/hosts/{name}/credential"))
    print(f"host {name}: credential revoked" if out["revoked"] else f"host {name} had no credential")


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except (ValueError, IndexError):
        fail(f"--ttl {text!r}: write a duration like 90s, 30m, 2h or 1d")
        return 0.0


@host_token_app.command("create")
def host_token_create(ttl: Annotated[str, typer.Option(help="how long the token may be used: 30m, 2h, 1d")] = "30m",
                      description: Annotated[str, typer.Option(help="what it is for")] = "",
                      server: ServerOpt = None, token: TokenOpt = None,
                      output: OutOpt = Format.table) -> None:
    """Make a short-lived bootstrap token that joins hosts (admin); prints the join command with the CA pin."""
    c = client(server, token)
    out = run(lambda: c.request("POST", "/api/v1/bootstrap-tokens", json={"ttl": parse_duration(ttl),
                                                                          "description": description}))
    if output != Format.table:
        emit("BootstrapToken", out, output)
        return
    pin = f" --ca-hash {out['ca_hash']}" if out.get("ca_hash") else ""
    import time

    print(f"token {out['token']} (valid until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(out['expires']))})")
    print(f"on each new host:  tether host join --server https://SERVER:7443 --token {out['token']}{pin} --host NAME")


@host_app.command("join")
def host_join(join_token: Annotated[str, typer.Option("--token", help="bootstrap token (tether host token create)")],
              server: Annotated[str, typer.Option("--server", "-s", help="https://SERVER:7443 (several: a,b,c)")],
              host: Annotated[str, typer.Option(help="this host's name, as its agent's --host")] = "",
              ca_hash: Annotated[str | None, typer.Option(help="sha256:... pin of the cluster CA (printed by "
                                                               "`tether host token create`)")] = None,
              ca_file: Annotated[str | None, typer.Option(help="the cluster CA file, instead of --ca-hash")] = None,
              state_dir: Annotated[str, typer.Option(help="the agent's state dir: the credential (0600) and "
                                                          "ca.crt are written here")] = "/var/lib/tether-agent",
              ) -> None:
    """Join this host: trade a bootstrap token for its own credential, which the agent then uses."""
    import socket

    from tether.client import ApiError, ServerUnreachable, server_list
    from tether.join import JoinError, join

    try:
        path, ca = join(server_list(server), join_token, host or socket.gethostname(), state_dir, ca_file, ca_hash)
    except (JoinError, ServerUnreachable, ValueError) as e:
        fail(str(e))
    except ApiError as e:
        fail(f"{e.detail} (HTTP {e.status})")
    print(f"joined: credential in {path}" + (f", cluster CA in {ca}" if ca else ""))
    print(f"start the agent: tether agent --server {server} --state-dir {state_dir} --host {host or 'NAME'} "
          "--underlay-ip ADDR")


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
    """Create or update objects from documents: Tether kinds (the form `tether get -o yaml` prints) and
    Kubernetes Namespace, NetworkPolicy, Service. Objects the documents do not change are left alone."""
    from tether.cli.documents import apply_objects
    from tether.manifests import parse

    objs = run(lambda: parse(read_input(file), warn=lambda m: print(f"warning: {m}", file=sys.stderr)))
    c = client(server, token)
    run(lambda: apply_objects(c, objs, print))


@app.command()
def delete(kind: Annotated[str | None, typer.Argument(help="a kind (as for `get`), with NAME, instead of -f",
                                                      show_default=False)] = None,
           name: Annotated[str | None, typer.Argument(help="the object: a name, namespace/name, or an id",
                                                      show_default=False)] = None,
           file: Annotated[str | None, typer.Option("--filename", "-f", help="YAML/JSON file, or - for stdin",
                                                    show_default=False)] = None,
           namespace: Annotated[str, typer.Option("--namespace", "-n", help="for namespaced kinds")] = "default",
           ignore_not_found: Annotated[bool, typer.Option("--ignore-not-found",
                                                          help="exit 0 when an object does not exist")] = False,
           server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Delete the objects described in documents (-f), or one object (KIND NAME). Exits 1 when one
    does not exist, unless --ignore-not-found."""
    from tether.cli.documents import delete_objects
    from tether.manifests import parse

    if (file is None) == (kind is None) or (kind is not None and name is None):
        fail("give -f FILE, or KIND NAME (e.g. `tether delete service web -n shop`)")
    c = client(server, token)
    if file is not None:
        objs = run(lambda: parse(read_input(file)))
        missing = run(lambda: delete_objects(c, objs, print))
    else:
        k = ALIASES.get((kind or "").lower())
        if k is None:
            fail(f"unknown kind {kind!r}; use one of: {', '.join(sorted(set(ALIASES)))}")
            return
        missing = run(lambda: delete_objects(c, [], print, one=(k, name or "", namespace)))
    if missing and not ignore_not_found:
        fail(f"not found: {', '.join(missing)} (--ignore-not-found to accept that)")


@app.command()
def get(kind: Annotated[str, typer.Argument(help="networks, endpoints, hosts, blocks, namespaces, "
                                                 "networkpolicies, securitygroups, services (or short names)")],
        name: Annotated[str | None, typer.Argument(help="one object (namespace/name for namespaced kinds)")] = None,
        namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
        server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """Show objects of a kind; `-o yaml|json` prints documents (apiVersion, kind, metadata, spec, status)
    that `tether apply -f` takes back unchanged."""
    from tether.client import path_of
    from tether.manifests import to_document, to_list
    from tether.model import KINDS

    k = ALIASES.get(kind.lower())
    if k is None:
        fail(f"unknown kind {kind!r}; use one of: {', '.join(sorted(set(ALIASES)))}")
        return
    c = client(server, token)
    if name is None:
        params = {"namespace": namespace} if namespace and k in ("NetworkPolicy", "Service", "Endpoint") else {}
        items = run(lambda: c.request("GET", path_of(k), params=params))
        emit(k, items if output == Format.table else to_list(k, items), output)
        return
    if k == "Endpoint":
        one = find_endpoint(c, name, None)
    elif k == "Block":  # no route for one block
        one = next((b for b in run(lambda: c.list_raw("Block")) if b["name"] == name), None)
        if one is None:
            fail(f"no block {name!r}; `tether get blocks` lists them")
    else:
        if KINDS[k].namespaced and "/" not in name:
            name = f"{namespace or 'default'}/{name}"
        one = run(lambda: c.request("GET", path_of(k, name)))
    emit(k, one if output == Format.table else to_document(k, one), output)
    print_programming(c, k, one["id"] if k == "Endpoint" else name, output)


PROGRAMMABLE = ("Endpoint", "NetworkPolicy", "SecurityGroup", "Service", "Network", "Namespace")


def print_programming(c, kind: str, ref: str, output: Format) -> None:
    """Under a table: whether every host that must act on the object has applied it."""
    if output != Format.table or kind not in PROGRAMMABLE:
        return
    from tether.client import ApiError, ServerUnreachable

    try:
        p = c.request("GET", f"/api/v1/programming/{kind}/{ref}")
    except (ApiError, ServerUnreachable) as e:
        print(f"programming status unknown: {e}")
        return
    print(p["summary"])


def split_ref(ref: str, namespace: str | None) -> tuple[str, str]:
    """'networkpolicy/deny-db' -> ('NetworkPolicy', 'default/deny-db')."""
    from tether.model import KINDS

    kind, sep, name = ref.partition("/")
    k = ALIASES.get(kind.lower())
    if not sep or k is None or not name:
        fail(f"{ref!r} is not KIND/NAME: use e.g. networkpolicy/deny-db, endpoint/<id or name>, securitygroup/web")
    if KINDS[k].namespaced and "/" not in name:
        name = f"{namespace or 'default'}/{name}"
    return k, name



@app.command()
def describe(kind: Annotated[str, typer.Argument(help="a kind, as for `get`")],
             name: Annotated[str, typer.Argument(help="the object: a name, namespace/name, or an id")],
             namespace: Annotated[str, typer.Option("--namespace", "-n", help="for namespaced kinds")] = "default",
             server: ServerOpt = None, token: TokenOpt = None) -> None:
    """One object as a document, then what the system says about it: a network's endpoints and
    blocks, an endpoint's state and why an agent quarantined it, a service's ready backends, a host's
    problems."""
    import yaml

    from tether.cli.documents import find_named
    from tether.manifests import to_document

    k = ALIASES.get(kind.lower())
    if k is None:
        fail(f"unknown kind {kind!r}; use one of: {', '.join(sorted(set(ALIASES)))}")
        return
    c = client(server, token)
    obj = run(lambda: find_named(c, k, name, namespace))
    if obj is None:
        fail(f"no {k} {name!r}" + (f" in namespace {namespace!r}" if KIND_NAMESPACED.get(k) else "")
             + f"; `tether get {kind}` lists them")
        return
    about: dict = {}
    if k == "Network":
        eps = run(lambda: c.list_raw("Endpoint", network=obj["name"]))
        about["endpoints"] = [f"{e['namespace']}/{e['name']} {','.join(e['ips'])} on {e['host'] or '-'} "
                              f"({e['status']})" for e in eps]
        about["blocks"] = [f"{b['cidr']} on {b['host']}: {len(b['allocations'])} in use"
                           for b in run(lambda: c.list_raw("Block", network=obj["name"]))]
    elif k == "Endpoint":
        about["quarantined"] = [f"by {h['name']}: {p['reason']}" for h in run(lambda: c.list_raw("Host"))
                                for p in (h.get("status") or {}).get("problems", [])
                                if p["kind"] == "Endpoint" and p["name"] == obj["id"]]
    elif k == "Service":
        from tether.calc.services import backends_of
        from tether.model import Service

        svc = Service.model_validate(obj)
        eps = run(lambda: c.list("Endpoint"))
        about["ready backends"] = {f"{p.port}/{p.protocol}": [f"{b.ip}:{b.port}" for b in
                                                              backends_of(svc, p, eps, "")] for p in svc.ports}
    elif k == "Host":
        st = obj.get("status") or {}
        about["problems"] = [f"{p['kind']} {p['name']}: {p['reason']}" for p in st.get("problems", [])
                             + st.get("failed_ops", [])]
    print(yaml.safe_dump(to_document(k, obj), sort_keys=False), end="")
    if about:
        print("---\n# what the system says\n" + yaml.safe_dump(about, sort_keys=False), end="")


KIND_NAMESPACED = {"NetworkPolicy": True, "Service": True, "Endpoint": True}


@app.command()
def explain(kind: Annotated[str, typer.Argument(help="a kind, as for `get`")],
            output: OutOpt = Format.table) -> None:
    """The fields of a kind's document: where each goes (metadata, spec, status), its type and default
    (`-o json` prints the JSON schema)."""
    from tether.manifests import METADATA, STATUS
    from tether.model import KINDS

    k = ALIASES.get(kind.lower())
    if k is None:
        fail(f"unknown kind {kind!r}; use one of: {', '.join(sorted(set(ALIASES)))}")
        return
    cls = KINDS[k]
    if output != Format.table:
        emit(k, cls.model_json_schema(), output)
        return
    props = cls.model_json_schema()["properties"]
    rows = []
    for name, f in cls.model_fields.items():
        if name == "namespace" and not (cls.namespaced or k == "Endpoint"):
            continue
        where = "metadata" if name in METADATA else "status" if name in STATUS.get(k, ()) else "spec"
        if k == "NetworkPolicy" and name == "spec":
            rows.append(("spec", "", "the Kubernetes networking.k8s.io/v1 NetworkPolicy spec", ""))
            continue
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            default = "set by the server" if name in ("id", "created_at") else "empty when left out"
        else:
            default = f"default {f.default!r}"
        rows.append((where, name, schema_type(props.get(name, {})), default))
    print(f"apiVersion: tether.dev/v1\nkind: {k}")
    for where in ("metadata", "spec", "status"):
        for w, name, typ, default in rows:
            if w == where:
                print(f"{w}{'.' + name if name else ''}: {typ} ({default})")


def schema_type(p: dict) -> str:
    """A JSON-schema property as a short phrase: `string`, `one of vxlan|direct|auto`, `list of Subnet`."""
    if "enum" in p:
        return "one of " + "|".join(map(str, p["enum"]))
    if "const" in p:
        return repr(p["const"])
    if "$ref" in p:
        return p["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in p:
        kinds = [schema_type(x) for x in p["anyOf"] if x.get("type") != "null"]
        return " or ".join(kinds) + (" or null" if len(kinds) < len(p["anyOf"]) else "")
    if p.get("type") == "array":
        return "list of " + schema_type(p.get("items", {}))
    if p.get("type") == "object":
        return "map of string to " + schema_type(p.get("additionalProperties") or {}) \
            if isinstance(p.get("additionalProperties"), dict) else "map"
    return p.get("format") or p.get("type") or "any"


@app.command()
def wait(ref: Annotated[str, typer.Argument(help="KIND/NAME, e.g. networkpolicy/deny-db or ns/name for namespaced "
                                                "kinds: networkpolicy/prod/deny-db")],
         for_: Annotated[str, typer.Option("--for", help="the condition: 'programmed' (every host that must act "
                                                         "on the object has applied its current revision)")]
         = "programmed",
         timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait before failing")] = 30.0,
         namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
         server: ServerOpt = None, token: TokenOpt = None) -> None:
    """Wait until an object is in effect on every host that must act on it (exit 1 on timeout,
    saying which hosts have not applied it and why: down, failing, quarantined, pending)."""
    import time

    if for_ != "programmed":
        fail(f"unknown condition {for_!r}; the only one is 'programmed'")
    k, name = split_ref(ref, namespace)
    if k not in PROGRAMMABLE:
        fail(f"{k} has no programming status; use one of: {', '.join(PROGRAMMABLE)}")
    c = client(server, token)
    if k == "Endpoint":
        name = find_endpoint(c, name, None)["id"]
    deadline = time.monotonic() + timeout
    while True:
        p = run(lambda: c.request("GET", f"/api/v1/programming/{k}/{name}"))
        if p["programmed"]:
            print(f"{k.lower()}/{p['name']}: {p['summary']}")
            return
        if time.monotonic() >= deadline:
            fail(f"{k.lower()}/{p['name']} not programmed after {timeout:g} s: {p['summary']}")
        time.sleep(0.05)


@app.command()
def status(peers: Annotated[bool, typer.Option("--peers", help="the path health matrix: how each host reaches "
                                                               "every other over the underlay (latency, path MTU) "
                                                               "and through the VXLAN overlay "
                                                               "and the networks whose packets do not fit")] = False,
           server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """Hosts, networks and endpoint counts at a glance."""
    c = client(server, token)
    if peers:
        report = run(lambda: c.request("GET", "/api/v1/peers"))
        if output != Format.table:
            emit("peers", report, output)
            return
        print_peers(report)
        return
    health = server_health(c)
    if output == Format.table:  # first: when the store cannot answer, the lists below fail, and this says why
        print("store: " + ("takes writes" if health.get("ok") else "CANNOT TAKE WRITES: "
                           + "; ".join(health.get("problems") or ["no reason given"])))
    hosts = run(lambda: c.list_raw("Host"))
    nets = run(lambda: c.list_raw("Network"))
    eps = run(lambda: c.list_raw("Endpoint"))
    if output != Format.table:
        emit("status", {"hosts": hosts, "networks": nets, "endpoints": len(eps), "store": health}, output)
        return
    for h in hosts:
        h.setdefault("labels", {})
    emit("Host", hosts, output, title="hosts")
    print_problems(hosts)
    for n in nets:
        n["labels"] = {"endpoints": str(sum(1 for e in eps if e["network"] == n["name"]))}
    emit("Network", nets, output, title="networks")
    print(f"{len(eps)} endpoints")


def server_health(c) -> dict:
    """The answering server's /healthz: `ok` is False, with `problems`, when its store cannot take
    writes (no etcd quorum, an etcd alarm, a full disk under SQLite)."""
    import httpx

    try:
        return c.http.get("/healthz").json()
    except (httpx.HTTPError, ValueError) as e:
        return {"ok": False, "problems": [f"no answer from {c.servers[c.current]}/healthz: {e}"]}


def print_peers(report: dict) -> None:
    """A matrix like `weave status connections`: one row per host, one column per peer."""
    hosts = sorted(set(report) | {p["peer"] for r in report.values() for p in r.get("peers", [])})
    if not report:
        print("no peer reports yet (agents check their peers every 10 s)")
        return

    def cell(p: dict | None) -> str:
        if p is None:
            return "-"
        if not p["underlay"]["ok"]:
            return "DOWN"
        rtt = p["underlay"].get("rtt_ms")
        text = f"ok {rtt:.1f}ms" if rtt is not None else "ok"
        if p.get("path_mtu") is not None:
            text += f" mtu {p['path_mtu']}"
        if "overlay" in p:  # through the VXLAN tunnel to the peer's VTEP
            o = p["overlay"]
            text += f" vxlan {o['rtt_ms']:.1f}ms" if o.get("ok") and o.get("rtt_ms") is not None else \
                " vxlan ok" if o.get("ok") else " vxlan DOWN"
        return text

    width = max(12, *(len(h) for h in hosts)) + 2
    print("FROM \\ TO".ljust(width) + "".join(h.ljust(34) for h in hosts))
    problems = []
    for h in hosts:
        r = report.get(h)
        by_peer = {p["peer"]: p for p in (r or {}).get("peers", [])}
        age = f" ({r['age_s']:.0f}s ago)" if r else " (no report)"
        print(h.ljust(width) + "".join(("self" if x == h else cell(by_peer.get(x))).ljust(34) for x in hosts) + age)
        problems += [f"{h} -> {p['peer']}: {msg}" for p in by_peer.values() for msg in p.get("problems", [])]
    if problems:
        print("\nproblems:")
        for line in problems:
            print(f"  {line}")


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


extra.register(app)  # the groups in their own modules: lab, trace/flows, service/dns


def main() -> None:
    app()


if __name__ == "__main__":
    main()
