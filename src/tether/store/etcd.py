"""The distributed store: etcd v3 over gRPC (aetcd makes the channel and stubs).

etcd already has the semantics `Store` promises (one revision per transaction, ordered watches from
a revision, compaction, leases), so this is a thin mapping. What it adds is failure handling:

- every etcd failure becomes `Unavailable` (the API's 503), whatever layer raised it: gRPC's
  `AioRpcError` from a stub, or `CancelledError` from a channel closed under a call;
- calls are retried for a short while (`retry_for`) on the next endpoint: reads, lease calls and
  transactions alike. A transaction is safe to send again because every write Tether makes either
  compares revisions (a repeat that finds its own earlier write fails with `Conflict`, and the caller
  re-reads) or is an unconditional put/delete (a repeat writes the same thing);
- one failing call never breaks the others: switching endpoints opens a new channel and closes the
  old one only once the calls still on it have had time to finish;
- watches resume from the last delivered revision on another endpoint, so there are no gaps and no
  duplicates, and report etcd's own progress (`Event("progress", ...)`) on a quiet stream.

It reaches etcd over client TLS (a CA to verify etcd, and a client certificate when etcd has
--client-cert-auth) and/or as an etcd user (`EtcdAccess`). A wrong CA, a refused client certificate,
a wrong password or a user without permission on Tether's keys is `EtcdRefused`: an operator's
mistake that retrying cannot fix, so `tether server` stops at start with one line and exit code 78.
An expired etcd auth token is not a mistake: the next attempt authenticates again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions as etcd_errors
import aetcd.rpc as rpc
import grpc
from aetcd import transactions as tx

from tether.store.base import (
    KV,
    Compacted,
    Compare,
    Conflict,
    Delete,
    Event,
    ListResult,
    Op,
    Put,
    StoreError,
    StoreUnusable,
    Unavailable,
)

log = logging.getLogger(__name__)
R = TypeVar("R")

# A new client (opened after a failure) gets connections of its own: by default gRPC shares subchannels
# between channels to the same address, so the new client inherited the stuck connection of a
# partition and its reconnect backoff (up to 120 s): the server stayed unhealthy 30 s and more after
# the network healed. Reconnects back off 2 s at most: etcd members come back within seconds.
GRPC_OPTIONS = {"grpc.max_receive_message_length": 1 << 30, "grpc.max_send_message_length": 64 << 20,
                "grpc.use_local_subchannel_pool": 1, "grpc.initial_reconnect_backoff_ms": 200,
                "grpc.min_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 2000}
# codes that mean "this member or the connection to it cannot answer now": try again, elsewhere
RETRYABLE = {rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED, rpc.StatusCode.CANCELLED,
             rpc.StatusCode.UNKNOWN, rpc.StatusCode.INTERNAL, rpc.StatusCode.ABORTED}
PROGRESS_EVERY = 3.0  # seconds of a quiet watch stream between requests for etcd's progress
PROBE_KEY = b"/tether/.revision"  # read (count only) for the revision: inside the prefix a Tether etcd role grants
EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): `tether server`'s exit code when etcd refuses who it is


@dataclass(frozen=True)
class EtcdAccess:
    """How Tether proves itself to etcd and checks etcd: client TLS (`cacert` verifies etcd's
    certificate; `cert`/`key` is Tether's client certificate) and/or an etcd user and password."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = None

    @property
    def tls(self) -> bool:
        return bool(self.cacert or self.cert)

    def credentials(self) -> Any:
        """The gRPC channel credentials for TLS, or None for plain connections; files read now, so a
        missing or unreadable one is reported at start."""
        if not self.tls:
            return None
        if bool(self.cert) != bool(self.key):
            raise EtcdRefused("--etcd-cert and --etcd-key go together (Tether's client certificate and its key)")

        def read(path: str | None, flag: str) -> bytes | None:
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise EtcdRefused(f"{flag} {path}: {e.strerror}") from None

        return grpc.ssl_channel_credentials(read(self.cacert, "--etcd-cacert"), read(self.key, "--etcd-key"),
                                            read(self.cert, "--etcd-cert"))


class EtcdRefused(StoreUnusable):
    """etcd will not talk to this configuration: wrong CA, refused client certificate, wrong user or
    password, no permission on Tether's keys. Retrying cannot help; an operator must fix a flag."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_CONFIG)


def refusal(e: BaseException, access: EtcdAccess) -> str | None:
    """What is wrong with the configuration if `e` says etcd refused it, else None (a plain outage)."""
    if not isinstance(e, rpc.AioRpcError):
        return None
    code, details = e.code(), e.details() or ""
    low = details.lower()
    if "handshake failed" in low and ("certificate" in low or "ssl_error_ssl" in low):
        return (f"TLS with etcd failed ({details}): etcd's certificate is not signed by the CA of --etcd-cacert "
                f"{access.cacert or '(none: the system CAs)'}, or does not name the address in --store")
    if "unwrap failed" in low or "bad_certificate" in low or "certificate required" in low:
        return (f"etcd refused Tether's client certificate ({details}): pass --etcd-cert/--etcd-key signed by a CA "
                "in etcd's --trusted-ca-file")
    if "authentication failed" in low:
        return f"etcd refused the user {access.user!r} ({details}): check --etcd-user and --etcd-password-file"
    if "user name is empty" in low:
        return ("etcd has authentication on and needs a user: pass --etcd-user and --etcd-password-file "
                "(or a client certificate whose common name is the etcd user, with --etcd-cert/--etcd-key)")
    if code == rpc.StatusCode.PERMISSION_DENIED:
        return (f"etcd denied access to Tether's keys ({details}): grant the etcd user a role with readwrite on "
                "the prefix /tether/ (etcdctl role grant-permission ROLE readwrite /tether/ --prefix=true)")
    if code == rpc.StatusCode.FAILED_PRECONDITION and "auth" in low:
        return f"etcd refused the request ({details})"
    return None


class LeaseNotFound(StoreError):
    """etcd does not know the lease (it expired or was revoked)."""


class OutOfSpace(Unavailable):
    """etcd refuses writes until an operator frees space: not worth retrying."""


class Retry(Exception):
    """A failure worth another attempt on another endpoint (carries what went wrong)."""


def _range_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


def _cancelled_from_outside() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def translate(e: BaseException) -> BaseException:
    """An etcd failure as the store error callers handle: `Retry` (try another endpoint),
    `Unavailable` (do not retry: out of space), `LeaseNotFound`, `Compacted`, or `e` itself."""
    if isinstance(e, asyncio.CancelledError):
        return e if _cancelled_from_outside() else Retry("the call was cancelled (its channel closed)")
    if isinstance(e, etcd_errors.ConnectionFailedError | etcd_errors.ConnectionTimeoutError
                  | etcd_errors.InternalError):  # aetcd's own wrapping of the same failures
        return Retry(str(e))
    if not isinstance(e, rpc.AioRpcError):
        return e
    code, details = e.code(), e.details() or ""
    if code == rpc.StatusCode.RESOURCE_EXHAUSTED or "space exceeded" in details:
        return OutOfSpace(f"etcd is out of space ({details}): the NOSPACE alarm stops every write; compact, "
                           "defragment (etcdctl defrag) and disarm the alarm (etcdctl alarm disarm), and raise "
                           "--quota-backend-bytes")
    if code == rpc.StatusCode.UNAUTHENTICATED or "invalid auth token" in details:
        return Retry(f"etcd auth token expired or unknown ({details}): authenticating again")
    if code == rpc.StatusCode.NOT_FOUND and "lease" in details:
        return LeaseNotFound(details)
    if code == rpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(0)
    if code in RETRYABLE:
        return Retry(f"{code.name}: {details}")
    return StoreError(f"etcd refused the request ({code.name}: {details})")


class Client(aetcd.Client):
    """aetcd's client on a TLS channel when given credentials (aetcd itself makes only plain ones).
    Its own `connect` also leaves gRPC's errors unwrapped, so `refusal` can read them."""

    def __init__(self, *, credentials: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = f"{self._host}:{self._port}"
        options = list(self._options.items())
        self.channel = (rpc.secure_channel(target, self._credentials, options=options) if self._credentials
                        else rpc.insecure_channel(target, options=options))
        if self._username is not None:
            resp = await rpc.AuthStub(self.channel).Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password), timeout=self._timeout)
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._connected.set()


class EtcdStore:
    def __init__(self, endpoints: list[str], *, timeout: float = 5, retry_for: float = 5,
                 access: EtcdAccess | None = None) -> None:
        if not endpoints:
            raise ValueError("etcd store needs at least one endpoint host:port")
        self.endpoints = endpoints
        self.access = access or EtcdAccess()
        if self.access.user is not None and self.access.password is None:
            raise EtcdRefused("--etcd-user needs --etcd-password-file (a file holding the etcd user's password)")
        self._credentials = self.access.credentials()
        self.timeout = timeout  # per call
        self.retry_for = retry_for  # all attempts of one store call together
        self._client: aetcd.Client | None = None
        self._current = 0
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()

    def _new_client(self, endpoint: str) -> aetcd.Client:
        host, _, port = endpoint.rpartition(":")
        return Client(host=host or "127.0.0.1", port=int(port), timeout=self.timeout, options=GRPC_OPTIONS,
                      username=self.access.user, password=self.access.password, credentials=self._credentials)

    async def _connect(self) -> aetcd.Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is not None:
                return self._client
            errors, refused = [], []
            for i in range(len(self.endpoints)):
                idx = (self._current + i) % len(self.endpoints)
                client = self._new_client(self.endpoints[idx])
                try:
                    await client.connect()
                    await client.maintenancestub.Status(rpc.StatusRequest(), timeout=self.timeout,
                                                        metadata=client.metadata)
                except Exception as e:  # noqa: BLE001 - any failure means "try the next one"
                    await client.close()
                    if (wrong := refusal(e, self.access)) is not None:  # the next member may take us
                        refused.append(f"etcd {self.endpoints[idx]}: {wrong}")
                    errors.append(f"{self.endpoints[idx]}: {e.details() if isinstance(e, rpc.AioRpcError) else e}")
                    continue
                self._client, self._current = client, idx
                return client
            if refused:  # no member took us, and some refused who we are: a flag to fix, not an outage
                raise EtcdRefused("; ".join(refused))
            closed = any("Socket closed" in e for e in errors)
            hint = ("" if not closed else " (a member that closes TLS handshakes may serve plain connections: "
                    "drop --etcd-cacert)" if self.access.tls else " (a member that closes plain connections may "
                    "want TLS: --etcd-cacert)")
            raise Unavailable("cannot reach etcd (" + "; ".join(errors) + f"); is etcd running?{hint}")

    def _failed(self, client: aetcd.Client, why: object) -> None:
        """Move to the next endpoint after a failure on `client`. The old channel is closed later,
        not now: the other calls on it finish or fail by themselves (closing it cancelled them all)."""
        if self._client is not client:
            return  # another call already moved on
        log.warning("etcd %s failed (%s); trying the next endpoint", self.endpoints[self._current], why)
        self._client = None
        self._current = (self._current + 1) % len(self.endpoints)

        async def close_later() -> None:
            await asyncio.sleep(self.timeout + 1)
            with contextlib.suppress(Exception):
                await client.close()

        task = asyncio.get_running_loop().create_task(close_later())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[R]]) -> R:
        """Run `fn(client)`; on an availability failure, again on the next endpoint until
        `retry_for` seconds have passed, then `Unavailable`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        pause = 0.05
        while True:
            client: aetcd.Client | None = None
            try:
                client = await self._connect()
                return await fn(client)
            except OutOfSpace:
                raise
            except Unavailable as e:  # no endpoint answered
                why: object = e
            except BaseException as e:  # noqa: BLE001 - sorted by translate(); the rest re-raised
                if (wrong := refusal(e, self.access)) is not None:
                    raise EtcdRefused(wrong) from None
                err = translate(e)
                if not isinstance(err, Retry):
                    if err is e:
                        raise
                    raise err from e
                why = err
                if client is not None:
                    self._failed(client, err)
            if loop.time() + pause > deadline:
                raise Unavailable(f"etcd unavailable for {self.retry_for:g} s ({why}); check the etcd members "
                                  f"({', '.join(self.endpoints)}) and their quorum") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    def _kv(self, kv: Any) -> KV:
        return KV(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision, kv.lease)

    async def _range(self, key: bytes, range_end: bytes = b"", **options: Any) -> Any:
        async def run(c: aetcd.Client) -> Any:
            req = rpc.RangeRequest(key=key, range_end=range_end, **options)
            return await c.kvstub.Range(req, timeout=self.timeout, metadata=c.metadata)

        return await self._call(run)

    async def get(self, key: str) -> KV | None:
        resp = await self._range(key.encode())
        return self._kv(resp.kvs[0]) if resp.kvs else None

    async def list(self, prefix: str) -> ListResult:
        p = prefix.encode()
        resp = await self._range(p, _range_end(p), sort_order=1, sort_target=0)
        return ListResult([self._kv(kv) for kv in resp.kvs], resp.header.revision)

    async def txn(self, compares: list[Compare], ops: list[Op]) -> int:
        conds = [tx.Mod(c.key.encode()) == c.mod_revision for c in compares]
        reqs: list[Any] = []
        for op in ops:
            if isinstance(op, Put):
                reqs.append(tx.Put(op.key.encode(), op.value, lease=op.lease or None))
            elif isinstance(op, Delete):
                reqs.append(tx.Delete(op.key.encode()))

        async def run(c: aetcd.Client) -> int:
            request = rpc.TxnRequest(
                compare=[x.build_message() for x in conds], success=c._ops_to_requests(reqs), failure=[]
            )
            resp = await c.kvstub.Txn(request, timeout=self.timeout, metadata=c.metadata)
            if not resp.succeeded:
                raise Conflict("a compared key changed: " + ", ".join(f"{c.key}@{c.mod_revision}" for c in compares))
            return resp.header.revision

        try:
            return await self._call(run)
        except LeaseNotFound as e:
            raise Conflict(f"lease not found (expired?): {e}") from e

    async def create(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self.txn([Compare(key, 0)], [Put(key, value, lease)])

    async def update(self, key: str, value: bytes, mod_revision: int, lease: int = 0) -> int:
        return await self.txn([Compare(key, mod_revision)], [Put(key, value, lease)])

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return await self.txn([], [Put(key, value, lease)])

    async def delete(self, key: str, mod_revision: int | None = None) -> int:
        compares = [Compare(key, mod_revision)] if mod_revision is not None else []
        return await self.txn(compares, [Delete(key)])

    async def revision(self) -> int:
        """The current revision, read through the leader (a linearizable read: fails without quorum)."""
        return (await self._range(PROBE_KEY, count_only=True)).header.revision

    async def compact(self, revision: int) -> None:
        async def run(c: aetcd.Client) -> None:
            await c.kvstub.Compact(rpc.CompactionRequest(revision=revision, physical=True),
                                   timeout=max(self.timeout, 30), metadata=c.metadata)

        with contextlib.suppress(Compacted):  # already compacted further: fine
            await self._call(run)

    async def problems(self) -> list[str]:
        """What keeps the cluster from taking writes: no quorum, or an alarm (NOSPACE, CORRUPT)."""
        try:
            await self.revision()
        except Unavailable as e:
            return [f"no etcd quorum: {e}"]

        async def alarms(c: aetcd.Client) -> Any:
            req = rpc.AlarmRequest(action=rpc.AlarmRequest.GET, memberID=0, alarm=rpc.AlarmType.Value("NONE"))
            return await c.maintenancestub.Alarm(req, timeout=self.timeout, metadata=c.metadata)

        resp = await self._call(alarms)
        return [f"etcd alarm {rpc.AlarmType.Name(a.alarm)} on member {a.memberID:x}"
                + (": the database reached --quota-backend-bytes; compact, defragment and disarm it"
                   if a.alarm == rpc.AlarmType.Value("NOSPACE") else "") for a in resp.alarms]

    async def watch(self, prefix: str, after_revision: int) -> AsyncIterator[Event]:
        p = prefix.encode()
        last = after_revision
        failures = 0
        while True:
            client = await self._connect()
            requests: asyncio.Queue[Any] = asyncio.Queue()
            create = rpc.WatchCreateRequest(key=p, range_end=_range_end(p), start_revision=last + 1,
                                            progress_notify=True)
            requests.put_nowait(rpc.WatchRequest(create_request=create))

            async def outgoing(q: asyncio.Queue[Any] = requests) -> AsyncIterator[Any]:
                while (req := await q.get()) is not None:
                    yield req

            call = rpc.WatchStub(client.channel).Watch(outgoing(), metadata=client.metadata)
            try:
                async for resp in self._responses(call, requests):
                    if resp.compact_revision:
                        raise Compacted(resp.compact_revision)
                    if resp.canceled:
                        raise Retry(f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
                    failures = 0
                    for ev in resp.events:
                        typ = "delete" if ev.type == rpc.Event.DELETE else "put"
                        rev = ev.kv.mod_revision
                        yield Event(typ, ev.kv.key.decode(), None if typ == "delete" else bytes(ev.kv.value), rev)
                        last = max(last, rev)
                    if not resp.events and not resp.created:
                        yield Event("progress", "", None, resp.header.revision)
                raise Retry("the watch stream ended")
            except BaseException as e:  # noqa: BLE001 - sorted by translate()
                err = translate(e)
                if err is e:
                    raise
                if not isinstance(err, Retry):
                    raise err from None
                failures += 1
                log.warning("etcd watch interrupted (%s); resuming from revision %d", err, last)
                self._failed(client, err)
                if failures > 2 * len(self.endpoints):
                    raise Unavailable(f"etcd watch failed {failures} times in a row ({err})") from None
                await asyncio.sleep(min(0.2 * failures, 1.0))
            finally:
                requests.put_nowait(None)
                call.cancel()

    @staticmethod
    async def _responses(call: Any, requests: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        """The watch responses; on a quiet stream, every few seconds a request for etcd's progress.
        (A reader task feeds a queue: cancelling a read of the gRPC stream itself ends the stream.)"""
        got: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            try:
                async for resp in call:
                    got.put_nowait(resp)
                got.put_nowait(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                got.put_nowait(e)

        reader = asyncio.create_task(read())
        try:
            while True:
                try:
                    item = await asyncio.wait_for(got.get(), PROGRESS_EVERY)
                except TimeoutError:
                    requests.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()

    async def grant_lease(self, ttl: float) -> int:
        async def run(c: aetcd.Client) -> int:
            resp = await c.leasestub.LeaseGrant(rpc.LeaseGrantRequest(TTL=max(1, round(ttl)), ID=0),
                                                timeout=self.timeout, metadata=c.metadata)
            return resp.ID

        return await self._call(run)

    async def keepalive(self, lease: int) -> bool:
        async def run(c: aetcd.Client) -> bool:
            async for reply in c.leasestub.LeaseKeepAlive([rpc.LeaseKeepAliveRequest(ID=lease)],
                                                          timeout=self.timeout, metadata=c.metadata):
                return reply.TTL > 0
            return False

        return await self._call(run)

    async def revoke(self, lease: int) -> None:
        async def run(c: aetcd.Client) -> None:
            await c.leasestub.LeaseRevoke(rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout, metadata=c.metadata)

        with contextlib.suppress(LeaseNotFound):
            await self._call(run)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
