"""An in-process Tether server for the fuzzers: the real FastAPI app over a real SQLite store,
driven through httpx's ASGI transport on an event loop of its own (a thread), so a generated request
costs ~1 ms instead of a loopback round trip, and the test can read the store directly before and
after each request to prove that a refused request changed nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from tether.server.app import create_app
from tether.store.sqlite import SqliteStore

T = TypeVar("T")

# how many generated examples each fuzzer runs: CI's default, times TETHER_FUZZ_SCALE for longer runs
SCALE = float(os.environ.get("TETHER_FUZZ_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


class InProcessServer:
    """The app, its store and an HTTP client, all on one private event loop."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.thread.start()
        self.statuses: dict[int, int] = {}  # responses by status: what the fuzzers reached
        self.store = SqliteStore(os.path.join(state_dir, "tether.db"))
        # no GC loop: nothing may write to the store except the requests under test
        self.app = create_app(self.store, token=None, gc_interval=0)
        self._lifespan = self.app.router.lifespan_context(self.app)
        self.run(self._lifespan.__aenter__())
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, raise_app_exceptions=False),
                                        base_url="http://tether", timeout=30)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        response = self.run(self.client.request(method, url, **kw))
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        return response

    def state(self) -> tuple[int, tuple[tuple[str, int, int], ...]]:
        """The store's revision and every key with its mod revision and lease: equal before and after
        a request exactly when nothing wrote (a host's heartbeat lease may expire meanwhile: the
        store deletes its key by itself, see `changes_by_request`)."""

        async def read() -> tuple[int, tuple[tuple[str, int, int], ...]]:
            listing = await self.store.list("")
            return await self.store.revision(), tuple((kv.key, kv.mod_revision, kv.lease) for kv in listing.items)

        return self.run(read())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.aclose())
        with contextlib.suppress(Exception):
            self.run(self._lifespan.__aexit__(None, None, None))
        with contextlib.suppress(Exception):
            self.run(self.store.close())
        with contextlib.suppress(Exception):  # else their finalizers run after the loop closed (noise at exit)
            self.run(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
