"""`/ui`: a small web page served by `tether server` (issue 25), with the same token as the API.

Plain server-rendered HTML and inline SVG, no JavaScript library and no build step: a topology
(hosts with their health, networks, pods, services), the flows (filters as `tether flows`, denied
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

from tether.model import Endpoint, Host, Namespace, Network, NetworkPolicy, SecurityGroup, Service

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
    hosts, eps = await o.list(Host), await o.list(Endpoint)
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
    body = ("".join(parts) + "<h2>networks</h2><table><tr><th>name</th><th>subnets</th><th>encap</th><th>pods</th>"
            f"</tr>{net_rows}</table><h2>services</h2><table><tr><th>service</th><th>VIP</th><th>ports</th>"
            f"<th>selector</th></tr>{svc_rows}</table>"
            + (f"<h2>problems</h2><ul>{problems}</ul>" if problems else ""))
    return page("topology", body, refresh=10)


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
    eps, hosts, live = await o.list(Endpoint), await o.list(Host), await o.live_hosts()
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
                  await o.list(SecurityGroup), await o.list(Network), await o.list(Host))
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
