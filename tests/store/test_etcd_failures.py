"""etcd failures reach callers as the store's errors, and one failing call leaves the others alone."""

from __future__ import annotations

import asyncio
import signal

import aetcd.exceptions as etcd_errors
import aetcd.rpc as rpc
import pytest

from tests.fixtures.etcd import start_etcd
from tether.store.base import Unavailable
from tether.store.etcd import EtcdStore

P = "/tether/v1/test/"


@pytest.fixture
def own_etcd(tmp_path):
    e = start_etcd(str(tmp_path))
    try:
        yield e
    finally:
        e.stop(signal.SIGKILL)


async def test_list_and_txn_on_a_dead_etcd_raise_unavailable_not_grpc_errors(own_etcd):
    store = EtcdStore([own_etcd.endpoint], timeout=1, retry_for=1)
    try:
        await store.put(P + "a", b"1")
        own_etcd.stop(signal.SIGKILL)
        with pytest.raises(Unavailable):
            await store.list(P)
        with pytest.raises(Unavailable):
            await store.create(P + "b", b"2")
        with pytest.raises(Unavailable):
            await store.get(P + "a")
    finally:
        await store.close()


async def test_a_call_retried_elsewhere_does_not_cancel_calls_in_flight(own_etcd):
    store = EtcdStore([own_etcd.endpoint], timeout=2, retry_for=2)
    try:
        await store.put(P + "a", b"1")
        client = await store._connect()

        async def slow(c):
            await asyncio.sleep(0.3)
            return await c.kvstub.Range(rpc.RangeRequest(key=(P + "a").encode()), timeout=2)

        inflight = asyncio.create_task(store._call(slow))
        await asyncio.sleep(0.05)  # in flight on the first channel
        failed = []

        async def fails_once(c):
            if not failed:
                failed.append(c)
                raise etcd_errors.ConnectionFailedError("injected: connection reset")
            return "second attempt"

        assert await store._call(fails_once) == "second attempt"
        assert failed == [client]
        resp = await inflight  # the first channel stays open while its calls finish
        assert resp.kvs[0].value == b"1"
    finally:
        await store.close()


async def test_watch_reports_the_stores_progress_on_a_quiet_stream(own_etcd):
    store = EtcdStore([own_etcd.endpoint])
    try:
        await store.put(P + "a", b"1")
        await store.put("/elsewhere/x", b"1")
        head = await store.revision()

        async def first_progress():
            async for ev in store.watch(P, 0):
                if ev.type == "progress":
                    return ev.revision

        assert await asyncio.wait_for(first_progress(), 10) >= head
    finally:
        await store.close()
