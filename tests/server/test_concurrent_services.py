"""Services created at the same time each get a free cluster IP: an attempt that lost an address to
another service retries from the request as sent, not from the address it had chosen (that retry
answered 409 "cluster IP ... is already used", seen when bench/scale created services 16 at a time)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests.fixtures.server import ServerProc


def test_services_created_concurrently_all_get_distinct_cluster_ips(sqlite_server: ServerProc) -> None:
    def create(i: int) -> tuple[int, str | None]:
        with sqlite_server.http() as http:
            r = http.put(f"/api/v1/namespaces/default/services/s{i}",
                         json={"name": f"s{i}", "namespace": "default", "ports": [{"port": 80}]})
            return r.status_code, r.json().get("cluster_ip") if r.status_code < 300 else r.text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(create, range(48)))
    assert all(code == 201 for code, _ in got), [g for g in got if g[0] != 201][:3]
    ips = [ip for _, ip in got]
    assert len(set(ips)) == len(ips)
