"""`/ui`: a small web page served by `tether server` (issue 25), with the same token as the API.

Plain server-rendered HTML and inline SVG, no build step: a topology (hosts with their health,
networks, pods, services; also drawn as a live graph by d3 when Debian's libjs-d3 is installed,
served from its installed path as /ui/static/d3.min.js), the flows (filters as `tether flows`, denied
rows highlighted with their policy), the policies (the pods each selects and its enforcement
status) and "why can't A reach B" (the trace's steps drawn as a chain, the failing one in red).
The token comes as the usual bearer header, or once as `?token=` (kept in an HttpOnly cookie).
"""

from __future__ import annotations

import html
import time
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, Router, SecurityGroup, Service

router = APIRouter(prefix="/ui", include_in_schema=False)
COOKIE = "tether_token"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
nav a{margin-right:1em} table{border-collapse:collapse} td,th{padding:.25em .6em;border-bottom:1px solid #ddd;
text-align:left;font-size:.9em} tr.deny{background:#fde2e2} .bad{color:#b00020;font-weight:bold}
.ok{color:#1b7f3b} .step{display:inline-block;border:2px solid #1b7f3b;border-radius:6px;padding:.4em;margin:.2em;
max-width:22em;vertical-align:top;font-size:.85em} .step.fail{border-color:#b00020;background:#fde2e2}
.arrow{display:inline-block;margin:.2em;vertical-align:top;padding-top:1em}
"""


def e(x: Any) -> str:
    return html.escape(str(x if x is not None else ""))


def page(title: str, body: str, refresh: int | None = None) -> HTMLResponse:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    nav = ('<nav><a href="/ui">topology</a><a href="/ui/flows">flows</a><a href="/ui/policies">policies</a>'
           '<a href="/ui/trace">why can\'t A reach B</a></nav>')
    return HTMLResponse(f"<!doctype html><html><head><meta charset=utf-8><title>Tether: {e(title)}</title>{meta}"
                        f"<style>{STYLE}</style></head><body>{nav}<h1>{e(title)}</h1>{body}</body></html>")


def keep_token(request: Request) -> RedirectResponse | None:
    """`?token=` once: put it in a cookie and come back without it in the address."""
    token = request.query_params.get("token")
    if not token:
        return None
    rest = {k: v for k, v in request.query_params.items() if k != "token"}
    r = RedirectResponse(request.url.path + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
    r.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return r


def _objs(request: Request) -> Any:
    return request.app.state.objects


@router.get("")
async def topology(request: Request) -> Any:
    if (r := keep_token(request)) is not None:
        return r
    o = _objs(request)
    hosts, eps = await o.observed_hosts(), await o.list(Endpoint)
    nets, svcs = await o.list(Network), await o.list(Service)
    live = await o.live_hosts()
    peers = request.app.state.peers
    box_w, pod_h = 260, 22
    height = 60 + pod_h * max([1, *(sum(1 for ep in eps if ep.host == h.name) for h in hosts)])
    parts = [f'<svg id="topology" width="{max(1, len(hosts)) * (box_w + 20) + 20}" height="{height + 20}" '
             'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="12">']
    for i, h in enumerate(sorted(hosts, key=lambda h: h.name)):
        x = 10 + i * (box_w + 20)
        bad = h.name not in live or h.status.problems or h.status.failed_ops or any(
            p.get("problems") for p in (peers.get(h.name) or {}).get("peers", []))
        colour = "#b00020" if h.name not in live else "#e08a00" if bad else "#1b7f3b"
        state = "down" if h.name not in live else "problems" if bad else "healthy"
        parts.append(f'<g class="host" data-host="{e(h.name)}"><rect x="{x}" y="10" width="{box_w}" '
                     f'height="{height}" rx="8" fill="none" stroke="{colour}" stroke-width="2"/>'
                     f'<text x="{x + 8}" y="30" font-weight="bold">{e(h.name)} ({e(h.underlay_ip)}) {state}</text>')
        for j, ep in enumerate(sorted((ep for ep in eps if ep.host == h.name), key=lambda ep: ep.name)):
            y = 50 + j * pod_h
            parts.append(f'<g class="pod" data-pod="{e(ep.namespace)}/{e(ep.name)}"><rect x="{x + 8}" y="{y - 14}" '
                         f'width="{box_w - 16}" height="{pod_h - 4}" rx="4" fill="#eef4ff"/>'
                         f'<text x="{x + 14}" y="{y}">{e(ep.namespace)}/{e(ep.name)} {e(", ".join(ep.ips))} '
                         f'[{e(ep.network)}]</text></g>')
        parts.append("</g>")
    parts.append("</svg>")
    net_rows = "".join(f"<tr><td>{e(n.name)}</td><td>{e(', '.join(s.cidr for s in n.subnets))}</td>"
                       f"<td>{e(n.encap)}</td><td>{sum(1 for ep in eps if ep.network == n.name)}</td></tr>"
                       for n in nets)
    svc_rows = "".join(f"<tr><td>{e(s.namespace)}/{e(s.name)}</td><td>{e(s.cluster_ip)}</td>"
                       f"<td>{e(', '.join(str(p.port) for p in s.ports))}</td><td>{e(s.selector or {})}</td></tr>"
                       for s in svcs)
    problems = "".join(f"<li class=bad>{e(h.name)}: {e(p.kind)} {e(p.name)}: {e(p.reason)}</li>"
                       for h in hosts for p in [*h.status.problems, *h.status.failed_ops])
    problems += "".join(f"<li class=bad>{e(h)} -> {e(p['peer'])}: {e(msg)}</li>"
                        for h, r in peers.items() for p in r.get("peers", []) for msg in p.get("problems", []))
    body = ("".join(parts) + graph(hosts, live, eps, nets, svcs, peers)
            + "<h2>networks</h2><table><tr><th>name</th><th>subnets</th><th>encap</th><th>pods</th>"
            f"</tr>{net_rows}</table><h2>services</h2><table><tr><th>service</th><th>VIP</th><th>ports</th>"
            f"<th>selector</th></tr>{svc_rows}</table>"
            + (f"<h2>problems</h2><ul>{problems}</ul>" if problems else ""))
    return page("topology", body, refresh=10)


D3_PATHS = ("/usr/share/javascript/d3/d3.min.js",)  # Debian's libjs-d3 (scripts/install-deps)

# The force-directed graph: hosts, networks, pods (each tied to its host and network) and services
# (tied to the pods they select), drawn by d3 (v3, as Debian ships it) from the JSON in #graph-data.
GRAPH_JS = """
(function(){
  var data = JSON.parse(document.getElementById('graph-data').textContent);
  var w = 900, h = 520, colour = {host: '#1b7f3b', down: '#b00020', problems: '#e08a00', network: '#5b6bbf',
                                  pod: '#7aa6e0', service: '#a05bbf'};
  var svg = d3.select('#graph').append('svg').attr('id', 'graph-svg').attr('width', w).attr('height', h);
  var force = d3.layout.force().nodes(data.nodes).links(data.links).size([w, h])
      .charge(-220).linkDistance(function(l){
        return l.kind === 'host' ? 50 : l.kind.indexOf('peer') === 0 ? 260 : 90; }).start();
  var link = svg.selectAll('line').data(data.links).enter().append('line')
      .attr('class', function(l){ return 'link ' + l.kind; })
      .attr('stroke', function(l){ return {service: '#a05bbf', peer: '#1b7f3b', 'peer-down': '#b00020'}[l.kind]
                                          || '#bbb'; })
      .attr('stroke-dasharray', function(l){ return l.kind === 'peer-down' ? '5,4' : null; });
  var node = svg.selectAll('g.node').data(data.nodes).enter().append('g')
      .attr('class', function(n){ return 'node ' + n.kind; }).attr('data-name', function(n){ return n.name; })
      .call(force.drag);
  node.append('circle').attr('r', function(n){ return n.kind === 'pod' ? 6 : 11; })
      .attr('fill', function(n){ return colour[n.state || n.kind]; });
  node.append('text').attr('x', 13).attr('y', 4).attr('font-size', 11).text(function(n){ return n.label; });
  node.append('title').text(function(n){ return n.title; });
  force.on('tick', function(){
    link.attr('x1', function(l){ return l.source.x; }).attr('y1', function(l){ return l.source.y; })
        .attr('x2', function(l){ return l.target.x; }).attr('y2', function(l){ return l.target.y; });
    node.attr('transform', function(n){ return 'translate(' + n.x + ',' + n.y + ')'; });
  });
})();
"""


def d3_path() -> str | None:
    import os

    return next((p for p in D3_PATHS if os.path.exists(p)), None)


def graph(hosts: list[Host], live: Any, eps: list[Endpoint], nets: list[Network], svcs: list[Service],
          peers: dict[str, Any]) -> str:
    """The topology as a live graph (d3), or a line saying how to get it when d3 is not installed.
    Hosts are tied to each other by their path health (red: the underlay does not carry the path)."""
    import json

    from tether.calc.services import selects

    if d3_path() is None:
        return "<p>(install Debian's libjs-d3 on the server for the topology graph)</p>"
    nodes: list[dict[str, Any]] = []
    index: dict[tuple[str, str], int] = {}

    def add(kind: str, name: str, label: str, title: str, state: str | None = None) -> int:
        index[(kind, name)] = len(nodes)
        nodes.append({"kind": kind, "name": name, "label": label, "title": title, "state": state})
        return index[(kind, name)]

    links: list[dict[str, Any]] = []
    for h in hosts:
        state = "down" if h.name not in live else "problems" if h.status.problems or h.status.failed_ops else "host"
        add("host", h.name, h.name, f"host {h.name} ({h.underlay_ip}): {state}", state)
    for a, report in peers.items():
        for p in report.get("peers", []):
            if ("host", a) in index and ("host", p.get("peer")) in index and a < p["peer"]:
                links.append({"source": index[("host", a)], "target": index[("host", p["peer"])],
                              "kind": "peer" if (p.get("underlay") or {}).get("ok") else "peer-down"})
    for n in nets:
        add("network", n.name, n.name, f"network {n.name} ({', '.join(s.cidr for s in n.subnets)}, {n.encap})")
    for ep in eps:
        i = add("pod", ep.id, f"{ep.namespace}/{ep.name}", f"{ep.namespace}/{ep.name} {', '.join(ep.ips)}")
        nodes[i]["name"] = nodes[i]["label"]  # indexed by id (names repeat across networks), shown by name
        for kind, name in (("host", ep.host), ("network", ep.network)):
            if (kind, name) in index:
                links.append({"source": i, "target": index[(kind, name)], "kind": kind})
    for s in svcs:
        i = add("service", f"{s.namespace}/{s.name}", f"svc {s.namespace}/{s.name}",
                f"service {s.namespace}/{s.name} {s.cluster_ip}")
        for ep in eps:
            if s.selector and ep.namespace == s.namespace and selects(s.selector, ep.labels):
                links.append({"source": i, "target": index[("pod", ep.id)], "kind": "service"})
    data = json.dumps({"nodes": nodes, "links": links}).replace("</", "<\\/")
    return (f'<h2>graph</h2><div id="graph"></div><script type="application/json" id="graph-data">{data}</script>'
            f'<script src="/ui/static/d3.min.js"></script><script>{GRAPH_JS}</script>')


@router.get("/static/d3.min.js")
async def d3_js() -> Any:
    from fastapi.responses import FileResponse, PlainTextResponse

    path = d3_path()
    if path is None:
        return PlainTextResponse("d3 is not installed on the server: apt-get install libjs-d3", status_code=404)
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "max-age=3600"})


@router.get("/flows")
async def flows(request: Request) -> Any:
    if (r := keep_token(request)) is not None:
        return r
    from tether.flows import label

    q = request.query_params
    src, dst, verdict = q.get("from") or None, q.get("to") or None, q.get("verdict") or None
    recs = request.app.state.flows.query(0, 500, src, dst, verdict if verdict in ("allow", "deny") else None)
    form = ('<form method=get>from <input name=from value="{}"> to <input name=to value="{}"> verdict '
            '<select name=verdict><option></option><option{}>allow</option><option{}>deny</option></select> '
            '<button>filter</button></form>').format(e(src), e(dst), " selected" if verdict == "allow" else "",
                                                      " selected" if verdict == "deny" else "")
    rows = []
    import time

    for r in reversed(recs):
        to = label(r.get("to") or {}, str(r.get("dst", ""))) + (f":{r['dport']}" if r.get("dport") else "")
        if r.get("backend"):
            to += f" → {label(r.get('backend_of') or {}, str(r['backend']))}"
        cls = ' class="deny"' if r.get("verdict") == "deny" else ""
        rows.append(f"<tr{cls}><td>{e(time.strftime('%H:%M:%S', time.localtime(r.get('time', 0))))}</td>"
                    f"<td>{e(r.get('reporter'))}</td><td>{e(r.get('verdict'))}</td><td>{e(r.get('proto'))}</td>"
                    f"<td>{e(label(r.get('from') or {}, str(r.get('src', ''))))}</td><td>{e(to)}</td>"
                    f"<td>{e(r.get('policy'))}</td><td>{e(r.get('reason'))}</td></tr>")
    body = (form + f"<p>{len(recs)} flows</p><table id=flows><tr><th>time</th><th>host</th><th>verdict</th>"
            "<th>proto</th><th>from</th><th>to</th><th>policy</th><th>reason</th></tr>" + "".join(rows) + "</table>")
    return page("flows", body, refresh=5)


@router.get("/policies")
async def policies(request: Request) -> Any:
    if (r := keep_token(request)) is not None:
        return r
    from tether.policy_eval import World, applies
    from tether.server.programming import programming

    o = _objs(request)
    eps, hosts, live = await o.list(Endpoint), await o.observed_hosts(), await o.live_hosts()
    world = World(eps, await o.list(Namespace))
    rows = []
    for pol in await o.list(NetworkPolicy):
        selected = [f"{ep.namespace}/{ep.name}" for ep in eps if applies(pol, ep, "Ingress")
                    or applies(pol, ep, "Egress")]
        p = programming(pol, hosts, live, o.written_at(pol))
        rows.append(f"<tr><td>{e(pol.namespace)}/{e(pol.name)}</td><td>{e(', '.join(selected) or 'none')}</td>"
                    f"<td class={'ok' if p.programmed else 'bad'}>{e(p.summary())}</td></tr>")
    for sg in await o.list(SecurityGroup):
        members = [f"{ep.namespace}/{ep.name}" for ep in eps if sg.id in ep.security_groups]
        p = programming(sg, hosts, live, o.written_at(sg))
        rows.append(f"<tr><td>sg:{e(sg.name)}</td><td>{e(', '.join(members) or 'none')}</td>"
                    f"<td class={'ok' if p.programmed else 'bad'}>{e(p.summary())}</td></tr>")
    del world
    return page("policies", "<table id=policies><tr><th>policy</th><th>selects</th><th>enforcement</th></tr>"
                + "".join(rows) + "</table>", refresh=10)


@router.get("/trace")
async def trace_view(request: Request) -> Any:
    if (r := keep_token(request)) is not None:
        return r
    from tether.cli.policy_cli import parse_target
    from tether.policy_eval import World
    from tether.trace import find_service, trace

    q = request.query_params
    src, dst = q.get("src", ""), q.get("dst", "")
    form = (f'<form method=get>from <input name=src value="{e(src)}" placeholder="namespace/pod"> to '
            f'<input name=dst value="{e(dst)}" placeholder="namespace/pod:80/tcp or svc:ns/name:80"> '
            '<button>trace</button></form>')
    if not src or not dst:
        return page("why can't A reach B", form)
    o = _objs(request)
    world = World(await o.list(Endpoint), await o.list(Namespace), await o.list(NetworkPolicy),
                  await o.list(SecurityGroup), await o.list(Network), await o.list(Host), await o.list(Router))
    services = await o.list(Service)

    def find(ref: str) -> Endpoint | str | None:
        if ref.startswith("host:") or ref.startswith("svc:") or find_service(services, ref) is not None:
            return ref
        ns, _, name = ref.rpartition("/")
        hit = [x for x in world.endpoints if (x.name == name and (not ns or x.namespace == ns)) or x.id == ref
               or ref in x.ips]
        return hit[0] if len(hit) == 1 else ref if ref[:1].isdigit() else None

    try:
        dst_ref, port, proto = parse_target(dst)
    except BaseException:  # noqa: BLE001 - the CLI's parser exits on a bad port
        return page("why can't A reach B", form + f"<p class=bad>cannot read {e(dst)}: use DST:PORT/PROTO</p>")
    s, d = find(src), find(dst_ref)
    if s is None or d is None:
        missing = src if s is None else dst_ref
        return page("why can't A reach B", form + f"<p class=bad>no endpoint or service {e(missing)}</p>")
    now_ = time.time()
    health = {h: {**r, "age_s": round(now_ - r["reported_at"], 1)} for h, r in request.app.state.peers.items()}
    t = trace(world, services, s, d, port, proto, health=health)
    chain = '<span class="arrow">→</span>'.join(
        f'<div class="step{"" if st.ok else " fail"}"><b>{e(st.name)}</b>'
        f'{f" ({e(st.host)})" if st.host else ""}<br>{e(st.detail)}</div>' for st in t.steps)
    verdict = "<p class=ok>ALLOWED</p>" if t.reached else \
        f"<p class=bad>DENIED at {e(t.failed.name if t.failed else '')}</p>"
    return page("why can't A reach B", form + verdict + f'<div id="trace">{chain}</div>')
