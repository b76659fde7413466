"""`tether service create|list|show|delete` and `tether dns lookup NAME [--host H]`."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from tether.cli.main import OutOpt, ServerOpt, TokenOpt, client, fail, parse_labels, run
from tether.cli.output import Format, emit

service_app = typer.Typer(help="Services: a virtual IP load-balanced over ready backends.", no_args_is_help=True)
dns_app = typer.Typer(help="Ask the cluster DNS.", no_args_is_help=True)
NsOpt = Annotated[str, typer.Option("--namespace", "-n", help="namespace")]


def parse_port(spec: str):
    """`80`, `80:8080`, `80:http`, `53/udp`, `80:8080:30080` (service:target:node port)."""
    from tether.model import ServicePort

    spec, _, proto = spec.partition("/")
    name = None
    if "=" in spec:
        name, spec = spec.split("=", 1)
    parts = spec.split(":")
    try:
        port = int(parts[0])
        target: int | str | None = None
        if len(parts) > 1 and parts[1]:
            target = int(parts[1]) if parts[1].isdigit() else parts[1]
        node_port = int(parts[2]) if len(parts) > 2 and parts[2] else None
        return ServicePort(name=name, port=port, target_port=target, node_port=node_port,
                           protocol=(proto or "tcp").upper())
    except (ValueError, TypeError) as e:
        fail(f"port {spec!r} is not PORT[:TARGET[:NODEPORT]][/tcp|udp] ({e}); e.g. --port http=80:8080")
        raise


@service_app.command("create")
def service_create(
    name: str,
    port: Annotated[list[str], typer.Option("--port", "-p", help="\\[NAME=]PORT\\[:TARGET\\[:NODEPORT]]\\[/tcp|udp], "
                                            "repeatable")],
    namespace: NsOpt = "default",
    selector: Annotated[list[str], typer.Option(help="backend label k=v (repeatable)")] = [],  # noqa: B006
    backend: Annotated[list[str], typer.Option(help="explicit backend IP, when there is no selector")] = [],  # noqa: B006
    network: Annotated[str | None, typer.Option(help="only backends on this network; its DNS domain")] = None,
    type: Annotated[str, typer.Option("--type", help="ClusterIP or NodePort (published on every host, or on "
                                                     "--host only)")] = "ClusterIP",
    cluster_ip: Annotated[str | None, typer.Option(help="a fixed virtual IP inside the service range")] = None,
    affinity: Annotated[int | None, typer.Option(help="client-IP affinity, timeout in seconds")] = None,
    headless: Annotated[bool, typer.Option("--headless", help="no virtual IP: the name answers the ready "
                                                              "backends' addresses (clusterIP: None)")] = False,
    local: Annotated[bool, typer.Option("--local-traffic", help="NodePort: only backends on the receiving host, "
                                                                "client address kept (externalTrafficPolicy: "
                                                                "Local)")] = False,
    host: Annotated[str | None, typer.Option("--host", help="NodePort: publish on this host only (as Docker's "
                                                            "-p does)")] = None,
    host_ip: Annotated[str | None, typer.Option("--host-ip", help="NodePort with --host: publish on this "
                                                                  "address of that host only")] = None,
    label: Annotated[list[str], typer.Option(help="label k=v (repeatable)")] = [],  # noqa: B006
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """Create or update a service. Each --port is \\[NAME=]PORT\\[:TARGET\\[:NODEPORT]]\\[/tcp|udp], e.g.
    http=80:8080 or 53/udp."""
    from pydantic import ValidationError

    from tether.model import Service, ServiceBackend

    if not selector and not backend:
        fail("give --selector k=v (backends by label) or --backend IP (explicit backends)")
    try:
        svc = Service(name=name, namespace=namespace, ports=[parse_port(p) for p in port],
                      selector=parse_labels(selector) or None, backends=[ServiceBackend(ip=b) for b in backend],
                      network=network, type=type, cluster_ip=cluster_ip, labels=parse_labels(label),
                      session_affinity="ClientIP" if affinity else "None", affinity_timeout=affinity or 10800,
                      headless=headless, external_traffic_policy="Local" if local else "Cluster",
                      host=host, host_ip=host_ip)
    except ValidationError as e:
        fail("; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()))
        raise
    c = client(server, token)
    emit("Service", run(lambda: c.apply(svc)).model_dump(mode="json"), output)


@service_app.command("list")
def service_list(namespace: Annotated[str | None, typer.Option("--namespace", "-n")] = None,
                 server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table) -> None:
    """List services."""
    c = client(server, token)
    emit("Service", run(lambda: c.list_raw("Service", **({"namespace": namespace} if namespace else {}))), output)


@service_app.command("show")
def service_show(name: str, namespace: NsOpt = "default", server: ServerOpt = None, token: TokenOpt = None,
                 output: OutOpt = Format.yaml) -> None:
    """Show a service and the ready backends it balances over now."""
    from tether.calc.services import backends_of
    from tether.model import Endpoint, Service

    c = client(server, token)
    svc: Service = run(lambda: c.get("Service", f"{namespace}/{name}"))  # type: ignore[assignment]
    eps: list[Endpoint] = run(lambda: c.list("Endpoint"))  # type: ignore[assignment]
    data = svc.model_dump(mode="json")
    data["ready_backends"] = {f"{p.port}/{p.protocol}": [f"{b.ip}:{b.port}" for b in backends_of(svc, p, eps, "")]
                              for p in svc.ports}
    if output == Format.table:
        emit("Service", data, output)
        for port, backs in data["ready_backends"].items():
            print(f"{port}: {', '.join(backs) or 'no ready backends'}")
        return
    emit("Service", data, output)


@service_app.command("delete")
def service_delete(name: str, namespace: NsOpt = "default", server: ServerOpt = None,
                   token: TokenOpt = None) -> None:
    """Delete a service."""
    c = client(server, token)
    run(lambda: c.delete("Service", f"{namespace}/{name}"))
    print(f"service {namespace}/{name} deleted")


# --- dns -------------------------------------------------------------------------------------------

def _lab_namespace(server_url: str, host: str) -> str | None:
    """The network namespace of `host` when the server is a lab's (so we can ask from inside)."""
    from tether.lab.cluster import Lab, all_labs

    for name in all_labs():
        try:
            lab = Lab(name)
            if lab.server_url.rstrip("/") == server_url.rstrip("/") or f"unix://{lab.server_socket}" == server_url:
                return lab.host(host).ns
        except (OSError, KeyError, ValueError):
            continue
    return None


def ask(ip: str, wire: bytes, netns: str | None, timeout: float = 3.0) -> bytes:
    from tether.dataplane.netns import socket_in

    s = socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(wire, (ip, 53))
        return s.recv(65535)
    finally:
        s.close()


@dns_app.command("lookup")
def dns_lookup(
    name: str,
    type: Annotated[str, typer.Option("--type", "-t", help="A, AAAA, PTR, SRV, ... (an IP address means PTR)")] = "A",
    host: Annotated[str | None, typer.Option("--host", help="ask this host's agent (default: answer from the "
                                             "server's state, as every agent would)")] = None,
    namespace: NsOpt = "default",
    network: Annotated[str | None, typer.Option(help="the asking pod's network (its search domain and DNS "
                                                     "domain; default: the only domain in use)")] = None,
    server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
) -> None:
    """Resolve a name the way pods do: a name with fewer than 5 dots is tried with the pod's search
    domains first (NAMESPACE.svc.DOMAIN, svc.DOMAIN, NETWORK.DOMAIN, DOMAIN), so `web` finds the
    service web in --namespace. End the name with a dot to skip the search."""
    import ipaddress

    import dns.message
    import dns.rcode
    import dns.rdatatype

    from tether.calc import dns_records
    from tether.cli.config import resolve

    names = None
    try:
        ipaddress.ip_address(name)
        name, type = ipaddress.ip_address(name).reverse_pointer, "PTR"
        names = [name]
    except ValueError:
        pass
    c = client(server, token)
    nets = run(lambda: c.list_raw("Network"))
    if names is None:
        domains = sorted({n["dns_domain"] for n in nets if network in (None, n["name"])})
        if network and not domains:
            fail(f"no network {network!r}")
        domain = domains[0] if len(domains) == 1 else "tether.local"
        names = dns_records.candidates(name, dns_records.search_path(namespace, network, domain))
    if host:
        h = run(lambda: c.get("Host", host))
        if not h.dns_ip:
            fail(f"host {host!r} has no DNS address registered (is its agent running with DNS on?)")
        netns = _lab_namespace(resolve(server, token).server, host)

        def ask_one(q: bytes) -> bytes | None:
            try:
                return ask(h.dns_ip, q, netns)
            except OSError as e:
                fail(f"the DNS on {host} ({h.dns_ip}) did not answer: {e}")
                raise
        where = f"{host} ({h.dns_ip})"
    else:
        snap = run(c.snapshot)
        from tether.calc.replica import Replica

        rep = Replica()
        rep.load_snapshot(snap)
        rec = dns_records.build(rep.endpoints, rep.services, rep.networks.values(), serial=rep.revision)

        def ask_one(q: bytes) -> bytes | None:
            return dns_records.answer(rec, q)
        where = "server state"
    wire = None
    for candidate in names:  # the first name with an answer, as a stub resolver does
        got = ask_one(dns.message.make_query(candidate, type.upper()).to_wire())
        if got is not None:
            wire, name = got, candidate.rstrip(".")
            if dns.message.from_wire(got).answer:
                break
    if wire is None:
        fail(f"{name} is not a cluster name; ask a host's agent with --host to have it forwarded")
        raise typer.Exit(1)
    msg = dns.message.from_wire(wire)
    answers = [{"name": rrset.name.to_text(), "type": dns.rdatatype.to_text(rrset.rdtype), "ttl": rrset.ttl,
                "data": rd.to_text()} for rrset in msg.answer for rd in rrset]
    result = {"query": name, "type": type.upper(), "server": where, "rcode": dns.rcode.to_text(msg.rcode()),
              "answers": answers}
    if output != Format.table:
        emit("DnsAnswer", result, output)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} {type.upper()}: {result['rcode']} from {where}", box=None, header_style="bold")
    for col in ("NAME", "TYPE", "TTL", "DATA"):
        table.add_column(col)
    for a in answers:
        table.add_row(a["name"], a["type"], str(a["ttl"]), a["data"])
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(service_app, name="service")
    app.add_typer(dns_app, name="dns")



