"""`tether trace SRC DST[:PORT[/PROTO]] [--probe]` and `tether flows --denied`.

trace answers "why can (or can't) A reach B" from the desired state alone (`tether.policy_eval`),
naming the policy or security-group rule that decided; in a lab `--probe` sends a real packet from
the source's namespace and says whether the kernel agrees. flows shows what the agents' flow logs
recorded: recent denied packets, read from each agent's flows socket.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from typing import Annotated, Any

import typer

from tether.cli.output import Format
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, SecurityGroup
from tether.policy_eval import Decision, World, decide

LabOpt = Annotated[str | None, typer.Option("--lab", help="lab name (default: env TETHER_LAB, or the only lab)")]
CLASSES = {"Endpoint": Endpoint, "Namespace": Namespace, "NetworkPolicy": NetworkPolicy,
           "SecurityGroup": SecurityGroup, "Network": Network, "Host": Host}


def fail(message: str) -> None:
    from tether.cli.main import fail as cli_fail  # imported late: tether.cli.main imports this module

    cli_fail(message)


def world_from(snapshot: dict) -> World:
    by_kind: dict[str, list] = {k: [] for k in CLASSES}
    for item in snapshot["objects"]:
        cls = CLASSES.get(item["kind"])
        if cls is not None:
            by_kind[item["kind"]].append(cls.model_validate(item["object"]))
    return World(endpoints=by_kind["Endpoint"], namespaces=by_kind["Namespace"],
                 policies=by_kind["NetworkPolicy"], security_groups=by_kind["SecurityGroup"],
                 networks=by_kind["Network"], hosts=by_kind["Host"])


def parse_target(text: str) -> tuple[str, int, str]:
    """`DST[:PORT[/PROTO]]` -> (dst, port, proto); port 80 and TCP by default."""
    proto = "TCP"
    head, slash, tail = text.rpartition("/")
    if slash and tail.upper() in ("TCP", "UDP", "SCTP", "ICMP"):
        text, proto = head, tail
    prefix = "host:" if text.startswith("host:") else ""
    body = text[len(prefix):]
    if ":" in body:
        body, port = body.rsplit(":", 1)
        if not port.isdigit():
            fail(f"port {port!r} in {text!r} is not a number; write DST:PORT/PROTO, e.g. x/a:80/tcp")
        return prefix + body, int(port), proto.upper()
    return prefix + body, 80, proto.upper()


def resolve(world: World, ref: str) -> Endpoint | str:
    """An endpoint by `ns/name`, `name`, id or IP; `host:<name>`; or a bare IP outside Tether."""
    if ref.startswith("host:"):
        if not any(h.name == ref[5:] for h in world.hosts):
            fail(f"no host {ref[5:]!r}; hosts: {', '.join(h.name for h in world.hosts)}")
        return ref
    try:
        ipaddress.ip_address(ref)
        return world.endpoint_by_ip(ref) or ref
    except ValueError:
        pass
    ns, _, name = ref.rpartition("/")
    found = [e for e in world.endpoints if (e.name == name and (not ns or e.namespace == ns)) or e.id == ref]
    if len(found) == 1:
        return found[0]
    if not found:
        fail(f"no endpoint {ref!r}: use NAMESPACE/NAME, a name, an id or an IP")
    fail(f"{len(found)} endpoints match {ref!r} ({', '.join(f'{e.namespace}/{e.name}' for e in found[:5])}); "
         "use NAMESPACE/NAME or an IP")
    raise AssertionError("unreachable")


def describe(x: Endpoint | str) -> str:
    return f"{x.namespace}/{x.name} ({', '.join(x.ips)})" if isinstance(x, Endpoint) else x


def find_lab(name: str | None, why: str = "--probe"):
    """The lab named by --lab or TETHER_LAB, or the only one; `why` says which option needs it."""
    from tether.lab.cluster import Lab, all_labs

    name = name or os.environ.get("TETHER_LAB")
    if not name:
        labs = all_labs()
        if len(labs) != 1:
            fail(f"{why} needs a lab: give --lab NAME or set TETHER_LAB ({len(labs)} labs exist: "
                 f"{', '.join(labs) or 'none'})")
        name = labs[0]
    return Lab(name)


def probe(lab: Any, src: Endpoint | str, dst_ip: str, port: int, proto: str, timeout: float) -> bool:
    """Send one real packet from the source's namespace (a lab pod, or a lab host for host:<name>)."""
    if isinstance(src, Endpoint):
        pod = next((p for p in lab.state.pods.values() if set(p.ips) & set(src.ips)), None)
        if pod is None:
            fail(f"{describe(src)} is not a pod of lab {lab.name}; --probe works on lab pods and hosts")
        netns = pod.ns
    elif src.startswith("host:"):
        netns = lab.host(src[5:]).ns
    else:
        fail("--probe needs an endpoint or host:<name> as the source")
        raise AssertionError("unreachable")
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "tether.lab.probe", "once", dst_ip,
                        str(port), proto, "--timeout", str(timeout)], capture_output=True, text=True,
                       timeout=timeout + 30)
    try:
        return bool(json.loads(r.stdout)["reached"])
    except (ValueError, KeyError):
        fail(f"the probe failed: {r.stderr.strip() or r.stdout.strip()}")
        raise AssertionError("unreachable") from None


def trace_once(world: World, src_ref: str, dst_spec: str) -> tuple[Endpoint | str, Endpoint | str, int, str,
                                                                      Decision]:
    dst_ref, port, proto = parse_target(dst_spec)
    src, dst = resolve(world, src_ref), resolve(world, dst_ref)
    return src, dst, port, proto, decide(world, src, dst, port, proto)


def register(app: typer.Typer) -> None:
    global OutOpt, ServerOpt, TokenOpt  # the option types typer reads from this module's globals
    from tether.cli.main import OutOpt, ServerOpt, TokenOpt, client, run

    @app.command()
    def trace(
        src: Annotated[str, typer.Argument(help="source: NAMESPACE/NAME, endpoint name, IP, or host:<name>")],
        dst: Annotated[str, typer.Argument(help="destination, optionally :PORT or :PORT/PROTO, e.g. x/a:80/tcp")],
        probe_: Annotated[bool, typer.Option("--probe", help="in a lab: confirm with a real packet")] = False,
        lab: LabOpt = None,
        timeout: Annotated[float, typer.Option(help="probe timeout in seconds")] = 1.0,
        server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
    ) -> None:
        """Is SRC allowed to open a connection to DST, and which policy or rule decided?"""
        the_lab = find_lab(lab, "--probe" if probe_ else "--lab") if (probe_ or lab) else None
        if the_lab is not None and server is None:
            server, token = the_lab.server_url, token or the_lab.token
        c = client(server, token)
        world = world_from(run(c.snapshot))
        s, d, port, proto, decision = trace_once(world, src, dst)
        result: dict[str, Any] = {"source": describe(s), "destination": describe(d), "port": port,
                                  "protocol": proto, **decision.as_dict()}
        if probe_:
            dst_ip = d.ips[0] if isinstance(d, Endpoint) else (
                next(h.underlay_ip for h in world.hosts if h.name == d[5:]) if d.startswith("host:") else d)
            reached = probe(the_lab, s, dst_ip, port, proto, timeout)
            result["probe"] = {"reached": reached, "agrees": reached == decision.allowed}
        if output != Format.table:
            from tether.cli.output import emit

            emit("Trace", result, output)
        else:
            verdict = "ALLOWED" if decision.allowed else "DENIED"
            print(f"{verdict}: {result['source']} -> {result['destination']} {proto}/{port}")
            print(f"  decided by: {decision.reason}")
            for step in decision.steps:
                print(f"  - {step}")
            if "probe" in result:
                p = result["probe"]
                print(f"  probe: packet {'reached' if p['reached'] else 'was dropped'}"
                      f" ({'agrees' if p['agrees'] else 'DISAGREES with the model'})")
        if "probe" in result and not result["probe"]["agrees"]:
            raise typer.Exit(2)

    @app.command()
    def flows(
        denied: Annotated[bool, typer.Option("--denied", help="only denied packets")] = False,
        lab: LabOpt = None,
        socket_: Annotated[list[str] | None, typer.Option("--socket", help="an agent's flows socket (repeatable; "
                                                          "default /run/tether/flows.sock, or every lab host's)")]
        = None,
        limit: Annotated[int, typer.Option(help="at most this many per host")] = 50,
        output: OutOpt = Format.table,
    ) -> None:
        """Recent flow-log records (denied packets) from the agents' flow logs."""
        from tether.agent.flowlog import query

        paths = list(socket_ or [])
        if not paths:
            if lab or os.environ.get("TETHER_LAB") or not os.path.exists("/run/tether/flows.sock"):
                the_lab = find_lab(lab, "with no agent flows socket at /run/tether/flows.sock (--socket PATH), "
                                        "`tether flows`")
                paths = [os.path.join(the_lab.agent_dir(h.name), "flows.sock") for h in the_lab.state.hosts]
            else:
                paths = ["/run/tether/flows.sock"]
        records: list[dict] = []
        for p in paths:
            try:
                records.extend(query(p, limit=limit, denied=denied))
            except OSError as e:
                print(f"warning: {p}: {e}", file=sys.stderr)
        records.sort(key=lambda r: r.get("time", 0))
        if output != Format.table:
            from tether.cli.output import emit

            emit("Flow", records, output)
            return
        for r in records:
            print(f"{r.get('when', '')} {r.get('host', '')} {r.get('verdict', 'deny')} {r.get('proto', '')} "
                  f"{r.get('src', '')}:{r.get('sport', '')} -> {r.get('dst', '')}:{r.get('dport', '')} "
                  f"if={r.get('interface', '')} by {r.get('reason', '')}")
