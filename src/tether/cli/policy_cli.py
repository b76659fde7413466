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
import time
from typing import Annotated, Any

import typer

from tether.cli.output import Format
from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Router, SecurityGroup, Service
from tether.policy_eval import Decision, World, decide

LabOpt = Annotated[str | None, typer.Option("--lab", help="lab name (default: env TETHER_LAB, or the only lab)")]
CLASSES = {"Endpoint": Endpoint, "Namespace": Namespace, "NetworkPolicy": NetworkPolicy,
           "SecurityGroup": SecurityGroup, "Network": Network, "Host": Host, "Router": Router}


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
                 networks=by_kind["Network"], hosts=by_kind["Host"], routers=by_kind["Router"])


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


def probe(lab: Any, src: Endpoint | str, dst_ip: str, port: int, proto: str, timeout: float) -> str:
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
        return str(json.loads(r.stdout)["outcome"])  # answered, refused or lost (tether.lab.probe)
    except (ValueError, KeyError):
        fail(f"the probe failed: {r.stderr.strip() or r.stdout.strip()}")
        raise AssertionError("unreachable") from None


def trace_once(world: World, src_ref: str, dst_spec: str) -> tuple[Endpoint | str, Endpoint | str, int, str,
                                                                      Decision]:
    dst_ref, port, proto = parse_target(dst_spec)
    src, dst = resolve(world, src_ref), resolve(world, dst_ref)
    return src, dst, port, proto, decide(world, src, dst, port, proto)


def services_from(snapshot: dict) -> list[Service]:
    return [Service.model_validate(i["object"]) for i in snapshot["objects"] if i["kind"] == "Service"]


def resolve_destination(world: World, services: list[Service], ref: str) -> Endpoint | str:
    """An endpoint (as `resolve`), else a service by `svc:NS/NAME`, `NS/NAME`, name or VIP."""
    from tether.trace import find_service

    if ref.startswith("svc:") or (not ref.startswith("host:") and not _is_ip(ref)
                                  and not _endpoint_named(world, ref) and find_service(services, ref)):
        if find_service(services, ref) is None:
            fail(f"no service {ref.removeprefix('svc:')!r}: use svc:NAMESPACE/NAME")
        return ref
    return resolve(world, ref)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _endpoint_named(world: World, ref: str) -> bool:
    ns, _, name = ref.rpartition("/")
    return any((e.name == name and (not ns or e.namespace == ns)) or e.id == ref for e in world.endpoints)


def trace_path(world: World, services: list[Service], src_ref: str, dst_spec: str, src_address: str | None = None,
               health: dict[str, Any] | None = None):
    """`tether trace`'s answer: every step of the path (`tether.trace`)."""
    from tether.trace import trace

    dst_ref, port, proto = parse_target(dst_spec)
    return trace(world, services, resolve(world, src_ref), resolve_destination(world, services, dst_ref), port,
                 proto, src_address, health)


def spoof_probe(lab: Any, src: Endpoint | str, dst: Endpoint | str, address: str, port: int, proto: str,
                timeout: float) -> bool:
    """Send UDP from `address` out of the source pod; reached = a listener in the destination pod saw
    that source (no reply can come back to a spoofed address, so the destination is asked)."""
    pods = {ref: p for ref, p in lab.state.pods.items()}
    src_pod = next((p for p in pods.values() if isinstance(src, Endpoint) and set(p.ips) & set(src.ips)), None)
    dst_pod = next((p for p in pods.values() if isinstance(dst, Endpoint) and set(p.ips) & set(dst.ips)), None)
    if src_pod is None or dst_pod is None or proto != "UDP":
        fail("--from-address with --probe needs a lab pod on both ends and a UDP port, e.g. ns/a ns/b:9999/udp")
        raise AssertionError("unreachable")
    mod = [sys.executable, "-m", "tether.lab.probe"]
    listener = subprocess.Popen(["ip", "netns", "exec", dst_pod.ns, *mod, "listen", str(port), "--seconds",
                                 str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        if listener.stdout.readline().strip() != "ready":
            fail(f"could not listen on {port}/udp in {dst_pod.ns}: {listener.stderr.read() if listener.stderr else ''}"
                 "; pick a port nothing else uses there")
        r = subprocess.run(["ip", "netns", "exec", src_pod.ns, *mod, "once", dst_pod.ips[0], str(port), "UDP",
                            "--source", address], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            fail(f"the spoofing probe failed: {r.stderr.strip()}")
        out, _ = listener.communicate(timeout=timeout + 30)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    return address in json.loads(out.strip().splitlines()[-1])


def target_address(world: World, services: list[Service], dst_spec: str) -> tuple[str, int, str]:
    """Where the probe sends: the endpoint's address, the service's VIP, or the host's address."""
    from tether.trace import find_service

    dst_ref, port, proto = parse_target(dst_spec)
    d = resolve_destination(world, services, dst_ref)
    if isinstance(d, Endpoint):
        return d.ips[0], port, proto
    if d.startswith("host:"):
        return next(h.underlay_ip for h in world.hosts if h.name == d[5:]), port, proto
    svc = find_service(services, d)
    if svc is not None and svc.cluster_ip:
        return svc.cluster_ip, port, proto
    return d, port, proto


def drop_counts(lab: Any) -> dict[str, dict[str, int]]:
    """Per lab host, the agent's drop totals by owner (policy, group, isolation, anti-spoofing)."""
    import re
    import socket

    out: dict[str, dict[str, int]] = {}
    for h in lab.state.hosts:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(os.path.join(lab.agent_dir(h.name), "flows.sock"))
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                text = b""
                while chunk := s.recv(65536):
                    text += chunk
        except OSError:
            continue
        out[h.name] = {m.group(1): int(m.group(2)) for m in re.finditer(
            r'tether_policy_dropped_packets_total\{host="[^"]*",policy="([^"]*)"\} (\d+)', text.decode())}
    return out


def explain_disagreement(lab: Any, before: dict[str, dict[str, int]], reached: bool, t: Any) -> str:
    """Which step the real packet failed at, read from the kernel's drop counters around the probe."""
    if reached:
        f = t.failed
        return (f"the packet got through although the model stops it at '{f.name}'" if f else "reached") + \
            "; is the agent on that host behind (tether wait --for programmed)?"
    after = drop_counts(lab)
    rose = [f"{owner} on {host} (+{n - before.get(host, {}).get(owner, 0)})"
            for host, counts in after.items() for owner, n in counts.items()
            if n > before.get(host, {}).get(owner, 0)]
    if rose:
        return "dropped by " + ", ".join(rose)
    return ("no drop rule counted it: it was lost outside policy (route, encapsulation, neighbour resolution "
            "or an MTU drop); check `ip route` and `ip neigh` on the hosts of steps " +
            ", ".join(sorted({s.host for s in t.steps if s.host})) + ")")


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
        from_address: Annotated[str | None, typer.Option(
            "--from-address", help="the packet leaves SRC from this address instead of its own: is it dropped as "
            "spoofed? (with --probe: a UDP port, and a lab pod on both ends)")] = None,
        server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
    ) -> None:
        """Is SRC allowed to open a connection to DST, which step of the path (anti-spoofing, DNS,
        service, policy, security group, route, nat-outgoing) stops it, and which policy decided?"""
        the_lab = find_lab(lab, "--probe" if probe_ else "--lab") if (probe_ or lab) else None
        if the_lab is not None and server is None:
            server, token = the_lab.server_url, token or the_lab.token
        c = client(server, token)
        snap = run(c.snapshot)
        world = world_from(snap)
        services = services_from(snap)
        if from_address is not None and not _is_ip(from_address):
            fail(f"--from-address {from_address!r} is not an IP address")
        from tether.client import ApiError

        try:  # the agents' path health: a path the underlay does not carry stops the route step
            health = c.request("GET", "/api/v1/peers")
        except ApiError:  # a token that may not read it, or an older server: trace without it
            health = {}
        t = trace_path(world, services, src, dst, from_address, health)
        result: dict[str, Any] = t.as_dict()
        if probe_:
            s = resolve(world, src)
            d, port, proto = target_address(world, services, dst)
            before = drop_counts(the_lab)
            if from_address is not None:
                dst_ref = parse_target(dst)[0]
                got = "answered" if spoof_probe(the_lab, s, resolve_destination(world, services, dst_ref),
                                                from_address, port, proto, timeout) else "lost"
            else:
                got = probe(the_lab, s, d, port, proto, timeout)
            # a refusal the trace foresees (a service without backends) is the host saying no, not a
            # packet that reached its destination
            reached = got != "lost" and not (t.refused and got == "refused")
            agrees = got == "refused" if t.refused else reached == t.reached
            result["probe"] = {"reached": reached, "outcome": got, "agrees": agrees}
            if not result["probe"]["agrees"]:
                result["probe"]["kernel"] = explain_disagreement(the_lab, before, reached, t)
        if output != Format.table:
            from tether.cli.output import emit

            emit("Trace", result, output)
        else:
            verdict = "ALLOWED" if t.reached else "DENIED"
            print(f"{verdict}: {result['source']} -> {result['destination']} {t.proto}/{t.port}")
            print(f"  decided by: {result['reason']}")
            for step in t.steps:
                where = f" ({step.host})" if step.host else ""
                print(f"  {'ok ' if step.ok else 'NO '} {step.name}{where}: {step.detail}")
            if "probe" in result:
                p = result["probe"]
                print(f"  probe: packet {'reached' if p['reached'] else 'was dropped'}"
                      f" ({'agrees' if p['agrees'] else 'DISAGREES with the model'})")
                if "kernel" in p:
                    print(f"  kernel: {p['kernel']}")
        if "probe" in result and not result["probe"]["agrees"]:
            raise typer.Exit(2)

    @app.command()
    def flows(
        src: Annotated[str | None, typer.Option("--from", help="only flows from this end: NAMESPACE/POD, a "
                                                "namespace, svc:NS/NAME, host:NAME or an address")] = None,
        dst: Annotated[str | None, typer.Option("--to", help="only flows to this end (a service matches its VIP "
                                                "and the backends it sent to)")] = None,
        verdict: Annotated[str | None, typer.Option("--verdict", help="allow or deny")] = None,
        denied: Annotated[bool, typer.Option("--denied", help="only denied packets (--verdict deny)")] = False,
        follow: Annotated[bool, typer.Option("--follow", help="keep printing new flows as they come")] = False,
        limit: Annotated[int, typer.Option(help="at most this many (per host with --socket)")] = 50,
        lab: LabOpt = None,
        socket_: Annotated[list[str] | None, typer.Option("--socket", help="read one agent's local flows socket "
                                                          "instead of the server (repeatable; --lab: every lab "
                                                          "host's)")] = None,
        server: ServerOpt = None, token: TokenOpt = None, output: OutOpt = Format.table,
    ) -> None:
        """Connections and denied packets recorded by every agent, both ends named (pod, namespace,
        network, host, service) with the policy that decided, from the server's flow ring."""

        if denied:
            verdict = "deny"
        if verdict not in (None, "allow", "deny"):
            fail(f"--verdict {verdict!r}: use allow or deny")
        if socket_:
            local_flows(list(socket_), lab, limit, verdict == "deny", output)
            return
        if lab and server is None:
            the_lab = find_lab(lab)
            server, token = the_lab.server_url, token or the_lab.token
        c = client(server, token)
        params: dict[str, Any] = {"limit": limit}
        for k, v in (("from", src), ("to", dst), ("verdict", verdict)):
            if v:
                params[k] = v
        after, header = 0, True
        while True:
            q = {**params, "after": after, "wait": 10 if follow and after else 0}
            got = run(lambda q=q: c.request("GET", "/api/v1/flows", params=q))
            after = got["last"]
            if output == Format.table:
                print_flows(got["flows"], header)
                header = header and not got["flows"]
            elif follow:  # one JSON document per line, as they come
                for r in got["flows"]:
                    print(json.dumps(r))
            else:
                from tether.cli.output import emit

                emit("Flow", got["flows"], output)
            if not follow:
                return
            sys.stdout.flush()


def print_flows(records: list[dict], header: bool = True) -> None:
    """One line per flow: time, reporting host, verdict, protocol, both ends named, policy."""
    from tether.flows import label

    if header:
        print(f"{'TIME':8} {'HOST':10} {'VERDICT':7} {'PROTO':5} {'FROM':32} {'TO':40} POLICY / REASON")
    for r in records:
        t = time.strftime("%H:%M:%S", time.localtime(r.get("time", 0)))
        src = label(r.get("from") or {}, str(r.get("src", ""))) + (f":{r['sport']}" if r.get("sport") else "")
        dst = label(r.get("to") or {}, str(r.get("dst", ""))) + (f":{r['dport']}" if r.get("dport") else "")
        if r.get("backend"):
            dst += f" -> {label(r.get('backend_of') or {}, str(r['backend']))}"
        why = r.get("policy") or ""
        if r.get("reason"):
            why = f"{why} ({r['reason']})" if why else r["reason"]
        event = "" if r.get("event") in (None, "new") else f" [{r['event']}]"
        print(f"{t:8} {str(r.get('reporter') or r.get('host', '')):10} {r.get('verdict', ''):7} "
              f"{str(r.get('proto', '')):5} {src:32} {dst:40} {why}{event}")


def local_flows(paths: list[str], lab: str | None, limit: int, denied: bool, output: Format) -> None:
    """The records one agent keeps on its flows socket (no server needed)."""
    from tether.jsonline import query_flows

    if not paths:
        if lab or os.environ.get("TETHER_LAB") or not os.path.exists("/run/tether/flows.sock"):
            the_lab = find_lab(lab, "with no agent flows socket at /run/tether/flows.sock (--socket PATH), "
                                    "`tether flows --socket`")
            paths = [os.path.join(the_lab.agent_dir(h.name), "flows.sock") for h in the_lab.state.hosts]
        else:
            paths = ["/run/tether/flows.sock"]
    records: list[dict] = []
    for p in paths:
        try:
            records.extend(query_flows(p, limit=limit, denied=denied))
        except OSError as e:
            print(f"warning: {p}: {e}", file=sys.stderr)
    records.sort(key=lambda r: r.get("time", 0))
    if output != Format.table:
        from tether.cli.output import emit

        emit("Flow", records, output)
        return
    print(f"{'TIME':8} {'HOST':10} {'VERDICT':7} {'PROTO':5} FROM -> TO  BY")
    for r in records:
        print(f"{r.get('when', ''):8} {r.get('host', ''):10} {r.get('verdict', 'deny'):7} {r.get('proto', ''):5} "
              f"{r.get('src_name') or r.get('src', '')}:{r.get('sport', '')} -> "
              f"{r.get('dst_name') or r.get('dst', '')}:{r.get('dport', '')} by {r.get('reason', '')}")
