"""The etcd v3 store, driving etcd's gRPC API directly.

Why not a client library's high-level client: ``etcd3`` (2020) does not
import with protobuf >= 4, and both it and its maintained fork
``etcd-sdk-python`` mark an endpoint "failed" for 300 s after one timed-out
call, after which every call raises "Trying to use a failed node" although
etcd is healthy again.  We take only the generated protobuf/gRPC stubs from
``etcd-sdk-python`` (import name ``pyetcd``) and keep the policy here:

* every unary call has a deadline (``timeout``); an unreachable or stalled
  etcd raises :class:`StoreUnavailable` within it;
* idempotent calls (reads, lease keepalive) are retried on the next endpoint
  inside the same deadline; writes are not retried blindly (a timed-out write
  may have been applied) — the caller re-reads, which is what CAS is for;
* gRPC's reconnect back-off is capped at 2 s (its default grows to 120 s), so
  calls work again within seconds after etcd comes back;
* a watch confirms it is current with etcd's progress requests; a watch that
  does not answer one within its deadline is treated as broken;
* a write refused because etcd's backend quota is full (the NOSPACE alarm)
  raises :class:`lpmos.store.NoSpace`, a :class:`StoreUnavailable`.

Maintenance calls (:meth:`EtcdStore.status`, :meth:`EtcdStore.alarms`,
:meth:`EtcdStore.compact`, :meth:`EtcdStore.defragment`) are not part of the
:class:`lpmos.store.Store` interface; :mod:`lpmos.store.maintenance` uses
them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
from google.protobuf.unknown_fields import UnknownFieldSet  # type: ignore[import-untyped]
from pyetcd.etcdrpc import rpc_pb2 as pb
from pyetcd.etcdrpc import rpc_pb2_grpc as pbg

from lpmos.store import (
    Compacted,
    Compare,
    Conflict,
    Delete,
    Event,
    KeyValue,
    NoSpace,
    Op,
    Page,
    Put,
    StoreError,
    StoreUnavailable,
)

T = TypeVar("T")

_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


def prefix_end(prefix: str) -> bytes:
    """The etcd ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\x00"


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One etcd member's answer to the Maintenance Status call.

    ``db_size`` is the backend file's size; ``db_size_in_use`` the part
    holding live pages (the rest is free space left by compaction, which
    only a defragmentation gives back to the file system).  ``errors`` are
    the member's alarm strings (``"memberID:… alarm:NOSPACE"``)."""

    endpoint: str
    member_id: int
    leader: int
    version: str
    revision: int
    raft_index: int
    db_size: int
    db_size_in_use: int
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Alarm:
    """An alarm raised on a member: ``name`` is etcd's (``NOSPACE``, ``CORRUPT``)."""

    member_id: int
    name: str


# StatusResponse fields newer than the pyetcd stubs (etcd >= 3.4's rpc.proto);
# protobuf keeps them as unknown fields
_STATUS_ERRORS = 8
_STATUS_DB_SIZE_IN_USE = 9


def _status_extras(resp: Any) -> tuple[tuple[str, ...], int]:
    errors: list[str] = []
    in_use = 0
    for field in UnknownFieldSet(resp):
        if field.field_number == _STATUS_ERRORS and isinstance(field.data, bytes):
            errors.append(field.data.decode(errors="replace").strip())
        elif field.field_number == _STATUS_DB_SIZE_IN_USE and isinstance(field.data, int):
            in_use = field.data
    return tuple(errors), in_use


def _kv(kv: Any) -> KeyValue:
    return KeyValue(kv.key.decode(), bytes(kv.value), kv.mod_revision, kv.create_revision,
                    kv.version, kv.lease)


class _Endpoint:
    def __init__(self, url: str, credentials: grpc.ChannelCredentials | None) -> None:
        parts = urlsplit(url)
        self.url = url
        target = f"{parts.hostname}:{parts.port}"
        if parts.scheme == "https":
            if credentials is None:
                credentials = grpc.ssl_channel_credentials()
            self.channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.kv = pbg.KVStub(self.channel)
        self.lease = pbg.LeaseStub(self.channel)
        self.watch = pbg.WatchStub(self.channel)
        self.auth = pbg.AuthStub(self.channel)
        self.maintenance = pbg.MaintenanceStub(self.channel)


class EtcdStore:
    """:class:`lpmos.store.Store` on a real etcd (one or more endpoints)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 2.0,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        credentials = None
        if ca or cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca.read_bytes() if ca else None,
                private_key=key.read_bytes() if key else None,
                certificate_chain=cert.read_bytes() if cert else None,
            )
        self.timeout = timeout
        self.endpoints = list(endpoints)
        self._eps = [_Endpoint(url, credentials) for url in self.endpoints]
        self._current = 0
        self._lock = threading.Lock()
        self._user = user
        self._password = password
        self._auth_token: str | None = None
        self._closed = False

    # -- plumbing -------------------------------------------------------------

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self._user is None:
            return None
        if self._auth_token is None:
            self._authenticate()
        return (("token", self._auth_token or ""),)

    def _authenticate(self) -> None:
        ep = self._eps[self._current]
        try:
            resp = ep.auth.Authenticate(
                pb.AuthenticateRequest(name=self._user, password=self._password or ""),
                timeout=self.timeout,
            )
        except grpc.RpcError as exc:
            raise self._error(exc, "authenticate") from None
        self._auth_token = resp.token

    def _error(self, exc: grpc.RpcError, what: str) -> StoreError:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space exceeded" in (detail or ""):
            return NoSpace(f"etcd {what}: {detail} (the NOSPACE alarm is raised: etcd "
                           "refuses writes until it is compacted, defragmented and the "
                           "alarm disarmed)")
        if code in _RETRYABLE or code == grpc.StatusCode.CANCELLED:
            return StoreUnavailable(f"etcd {what}: {code.name if code else '?'}: {detail}")
        return StoreError(f"etcd {what}: {code.name if code else '?'}: {detail}")

    def _rotate(self, failed: int) -> None:
        with self._lock:
            if self._current == failed and len(self._eps) > 1:
                self._current = (failed + 1) % len(self._eps)

    def _call(self, what: str, fn: Callable[[_Endpoint, float, Any], T], *,
              idempotent: bool, timeout: float | None = None) -> T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        attempts = len(self._eps) if idempotent else 1
        last: grpc.RpcError | None = None
        reauthed = False
        i = 0
        while i < attempts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            index = self._current
            ep = self._eps[index]
            try:
                return fn(ep, remaining, self._metadata())
            except grpc.RpcError as exc:
                code = exc.code()
                expired = code == grpc.StatusCode.INVALID_ARGUMENT and \
                    "auth token" in (exc.details() or "")
                if expired and not reauthed:
                    self._auth_token = None
                    reauthed = True
                    continue
                if code not in _RETRYABLE:
                    raise self._error(exc, what) from None
                last = exc
                self._rotate(index)
                i += 1
        if last is not None:
            raise self._error(last, what) from None
        raise StoreUnavailable(f"etcd {what}: no answer within {timeout:g}s")

    # -- the interface --------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        req = pb.RangeRequest(key=key.encode())
        resp = self._call("get", lambda ep, t, md: ep.kv.Range(req, timeout=t, metadata=md),
                          idempotent=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        req = pb.RangeRequest(
            key=(start if start is not None else prefix).encode(),
            range_end=prefix_end(prefix), limit=limit, revision=revision,
        )

        def call(ep: _Endpoint, t: float, md: Any) -> Any:
            return ep.kv.Range(req, timeout=t, metadata=md)

        try:
            resp = self._call("range", call, idempotent=True)
        except StoreError as exc:
            if "compacted" in str(exc):
                raise Compacted(revision) from None
            raise
        return Page([_kv(kv) for kv in resp.kvs], resp.header.revision, bool(resp.more))

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        req = pb.PutRequest(key=key.encode(), value=value, lease=lease)
        resp = self._call("put", lambda ep, t, md: ep.kv.Put(req, timeout=t, metadata=md),
                          idempotent=False)
        return int(resp.header.revision)

    def delete(self, key: str) -> bool:
        req = pb.DeleteRangeRequest(key=key.encode())
        resp = self._call("delete",
                          lambda ep, t, md: ep.kv.DeleteRange(req, timeout=t, metadata=md),
                          idempotent=False)
        return bool(resp.deleted)

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        cmp = [
            pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=c.key.encode(),
                       mod_revision=c.mod_revision)
            for c in compares
        ]
        success = []
        for op in ops:
            if isinstance(op, Put):
                success.append(pb.RequestOp(request_put=pb.PutRequest(
                    key=op.key.encode(), value=op.value, lease=op.lease)))
            elif isinstance(op, Delete):
                success.append(pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(
                    key=op.key.encode())))
        failure = [pb.RequestOp(request_range=pb.RangeRequest(key=c.key.encode(), keys_only=True))
                   for c in compares]
        req = pb.TxnRequest(compare=cmp, success=success, failure=failure)
        resp = self._call("commit", lambda ep, t, md: ep.kv.Txn(req, timeout=t, metadata=md),
                          idempotent=False)
        if resp.succeeded:
            return int(resp.header.revision)
        for c, r in zip(compares, resp.responses, strict=False):
            kvs = r.response_range.kvs
            current = kvs[0].mod_revision if kvs else 0
            if current != c.mod_revision:
                raise Conflict(c.key, current)
        raise Conflict(compares[0].key if compares else "", 0)

    def revision(self) -> int:
        req = pb.RangeRequest(key=b"\x00", limit=1, count_only=True)
        resp = self._call("revision", lambda ep, t, md: ep.kv.Range(req, timeout=t, metadata=md),
                          idempotent=True)
        return int(resp.header.revision)

    def grant(self, ttl: int) -> int:
        req = pb.LeaseGrantRequest(TTL=ttl)
        resp = self._call("grant",
                          lambda ep, t, md: ep.lease.LeaseGrant(req, timeout=t, metadata=md),
                          idempotent=False)
        return int(resp.ID)

    def keepalive(self, lease_id: int) -> int:
        def call(ep: _Endpoint, t: float, md: Any) -> int:
            responses = ep.lease.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease_id)]),
                                                timeout=t, metadata=md)
            for resp in responses:
                return int(resp.TTL)
            return 0

        return self._call("keepalive", call, idempotent=True)

    def revoke(self, lease_id: int) -> None:
        req = pb.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call("revoke",
                       lambda ep, t, md: ep.lease.LeaseRevoke(req, timeout=t, metadata=md),
                       idempotent=True)
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    def compact(self, revision: int) -> None:
        """Compact history up to ``revision`` and wait until the member has
        applied it (``physical``).  :class:`Compacted` if ``revision`` is
        already compacted away (nothing to do)."""
        req = pb.CompactionRequest(revision=revision, physical=True)
        try:
            self._call("compact", lambda ep, t, md: ep.kv.Compact(req, timeout=t, metadata=md),
                       idempotent=True)
        except StoreError as exc:
            if "compacted" in str(exc):
                raise Compacted(revision) from None
            raise

    def status(self) -> MemberStatus:
        """The Status of the member behind the current endpoint."""
        req = pb.StatusRequest()
        answered: list[str] = []

        def call(ep: _Endpoint, t: float, md: Any) -> Any:
            answered[:] = [ep.url]
            return ep.maintenance.Status(req, timeout=t, metadata=md)

        resp = self._call("status", call, idempotent=True)
        errors, in_use = _status_extras(resp)
        return MemberStatus(endpoint=answered[0], member_id=int(resp.header.member_id),
                            leader=int(resp.leader), version=str(resp.version),
                            revision=int(resp.header.revision), raft_index=int(resp.raftIndex),
                            db_size=int(resp.dbSize), db_size_in_use=in_use, errors=errors)

    def alarms(self) -> list[Alarm]:
        """The alarms raised in the cluster (any member), e.g. NOSPACE."""
        req = pb.AlarmRequest(action=pb.AlarmRequest.GET, memberID=0, alarm=pb.NONE)
        resp = self._call("alarm list",
                          lambda ep, t, md: ep.maintenance.Alarm(req, timeout=t, metadata=md),
                          idempotent=True)
        return [Alarm(int(a.memberID), pb.AlarmType.Name(a.alarm)) for a in resp.alarms
                if a.alarm != pb.NONE]

    def disarm(self, alarm: Alarm) -> None:
        """Clear ``alarm`` (after the condition that raised it is gone)."""
        req = pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=alarm.member_id,
                              alarm=pb.AlarmType.Value(alarm.name))
        self._call("alarm disarm",
                   lambda ep, t, md: ep.maintenance.Alarm(req, timeout=t, metadata=md),
                   idempotent=True)

    def defragment(self, timeout: float = 60.0) -> None:
        """Defragment the member behind the current endpoint (only that
        one: defragmentation is per member, and it blocks the member's reads
        and writes while it runs, so it has its own, longer ``timeout``).
        Not retried on another endpoint."""
        req = pb.DefragmentRequest()
        self._call("defragment",
                   lambda ep, t, md: ep.maintenance.Defragment(req, timeout=t, metadata=md),
                   idempotent=False, timeout=max(self.timeout, timeout))

    def watch(self, prefix: str, start_revision: int) -> EtcdWatch:
        if self._closed:
            raise StoreUnavailable("store is closed")
        return EtcdWatch(self, prefix, start_revision)

    def close(self) -> None:
        self._closed = True
        for ep in self._eps:
            ep.channel.close()


_CLOSE = object()


class EtcdWatch:
    """One etcd watch stream on a prefix (see :class:`lpmos.store.Watch`)."""

    def __init__(self, store: EtcdStore, prefix: str, start_revision: int) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self._requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_end(prefix), start_revision=start_revision)))
        index = store._current
        self._store = store
        self._index = index
        ep = store._eps[index]
        try:
            self._call = ep.watch.Watch(self._request_iter(), metadata=store._metadata())
        except grpc.RpcError as exc:
            store._rotate(index)
            raise store._error(exc, "watch") from None
        self._closed = False

    def _request_iter(self) -> Iterator[Any]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            yield item

    def progress(self) -> None:
        self._requests.put(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))

    def close(self) -> None:
        self._closed = True
        self._requests.put(_CLOSE)
        self._call.cancel()

    def __iter__(self) -> Iterator[tuple[list[Event], int]]:
        try:
            for resp in self._call:
                if resp.compact_revision:
                    raise Compacted(resp.compact_revision)
                if resp.canceled:
                    raise StoreUnavailable(f"etcd watch canceled: {resp.cancel_reason}")
                if resp.created and not resp.events:
                    # the creation answer's revision is "now", not "seen up to":
                    # historical events from start_revision may still follow
                    continue
                events = [
                    Event("delete" if ev.type == 1 else "put", ev.kv.key.decode(),
                          bytes(ev.kv.value), ev.kv.mod_revision, ev.kv.create_revision,
                          ev.kv.lease)
                    for ev in resp.events
                ]
                yield events, int(resp.header.revision)
        except grpc.RpcError as exc:
            if self._closed:
                return
            self._store._rotate(self._index)
            raise self._store._error(exc, "watch") from None
        if not self._closed:
            raise StoreUnavailable("etcd watch stream ended")
