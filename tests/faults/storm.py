"""A write storm against several servers, with the books kept to check afterwards that no
acknowledged write was lost and no address was given twice.

Each client creates endpoints with a handle of its own (so a retried create is the same create) and
deletes half of them again (by handle: a retried delete is the same delete). A request that fails is
retried on the next server; only an answer counts as acknowledged.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx


@dataclass
class Books:
    created: dict[str, list[str]] = field(default_factory=dict)  # handle -> ips, acknowledged creates
    deleted: set[str] = field(default_factory=set)  # handles whose delete was acknowledged
    attempted: set[str] = field(default_factory=set)  # every handle a create was sent for
    failures: int = 0
    refused: list[str] = field(default_factory=list)  # 4xx answers: "status text", a client stops there
    last_ack: float = field(default_factory=time.monotonic)
    longest_stall: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self) -> None:
        now = time.monotonic()
        with self.lock:
            self.longest_stall = max(self.longest_stall, now - self.last_ack)
            self.last_ack = now


class Storm:
    def __init__(self, urls: list[str], token: str, network: str, clients: int = 8) -> None:
        self.urls, self.token, self.network, self.clients = urls, token, network, clients
        self.books = Books()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Storm:
        self.books.last_ack = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def _request(self, http: list[httpx.Client], start: int, method: str, path: str, **kw) -> httpx.Response | None:
        """One request, retried on the servers in turn until it is answered (not 5xx) or the storm ends."""
        for n in itertools.count():
            if self.stop.is_set() and n > 0:
                return None
            c = http[(start + n) % len(http)]
            try:
                r = c.request(method, path, **kw)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            with self.books.lock:
                self.books.failures += 1
            time.sleep(0.05)
        return None

    def _client(self, i: int) -> None:
        http = [httpx.Client(base_url=u, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
                for u in self.urls]
        try:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                handle = f"storm-{i}-{n}"
                with self.books.lock:
                    self.books.attempted.add(handle)
                r = self._request(http, i, "POST", "/api/v1/endpoints",
                                  json={"name": handle, "network": self.network, "handle": handle})
                if r is None:
                    return
                if r.status_code not in (200, 201):
                    self.books.refused.append(f"{r.status_code} {r.text[:200]}")
                    return
                with self.books.lock:
                    self.books.created[handle] = r.json()["ips"]
                self.books.ack()
                if n % 2:
                    r = self._request(http, i, "DELETE", f"/api/v1/endpoints/by-handle/{handle}")
                    if r is None:
                        return
                    if r.status_code != 200:
                        self.books.refused.append(f"{r.status_code} {r.text[:200]}")
                        return
                    with self.books.lock:
                        self.books.deleted.add(handle)
                    self.books.ack()
        finally:
            for c in http:
                c.close()


def check(books: Books, endpoints: list[dict]) -> dict:
    """Compare the books with the endpoints the store holds; the counts the test prints."""
    present = {e["handle"]: e for e in endpoints}
    kept = {h for h in books.created if h not in books.deleted}
    lost = sorted(kept - set(present))
    resurrected = sorted(books.deleted & set(present))
    ips = Counter(ip for e in endpoints for ip in e["ips"])
    # a write whose answer was lost (the storm ended while it was retried) may or may not be there;
    # anything else present must be something a client asked for
    return {"acknowledged": len(books.created) + len(books.deleted), "present": len(present),
            "lost": lost, "resurrected": resurrected, "unknown": sorted(set(present) - books.attempted),
            "unanswered": len(books.attempted - set(books.created)),
            "duplicates": sorted(ip for ip, n in ips.items() if n > 1),
            "refused": books.refused, "failed_attempts": books.failures,
            "longest_stall_s": round(books.longest_stall, 2)}
