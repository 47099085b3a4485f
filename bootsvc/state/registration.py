"""Agent registration and heartbeat (agent_api.md §1-2).

* :func:`parse_register` is the pure codec of a registration body: it
  validates and clamps everything the agent sends, or raises
  :class:`lpmos.models.ValidationError` naming the field.
* :func:`decide_identity` (pure) picks the machine's authoritative SN: by
  MAC (the task's MAC, then server records' MACs), then UUID, then serial
  — with the cache's answers passed in; else the reported DMI serial when
  it is a valid SN and not a placeholder, else ``mac-<boot MAC hex>``.
* :func:`decide_token`, :func:`decide_mac_owner` and
  :func:`build_server_record` (pure) decide the token (issue, keep,
  re-issue to the same boot, refuse), each MAC's index entry, and the
  record to write.
* :meth:`Registrar.register` reads the record, the token and the MAC index,
  lets those decide, and writes the server record and the MAC index in one
  transaction (CAS on the record and on every index key it changes), with
  the machine's token when one is issued.  A MAC already indexed to another
  machine, or a record whose UUID differs from the agent's (a cloned VM),
  sets :attr:`lpmos.models.Server.conflict` on the records involved; the
  boot decision then never serves them an install.
* :meth:`Registrar.heartbeat` keeps ``keys.lease(idc, sn)`` alive on an
  etcd lease (TTL about 3 times the heartbeat interval).  Leases show liveness;
  they never decide safety.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bootsvc.state.machines import MachineIndex
from bootsvc.state.tokens import MachineTokens, TokenError, token_digest
from lpmos.metrics import Registry
from lpmos.models import (
    Server,
    Task,
    ValidationError,
    normalize_mac,
    validate_sn,
    validate_text,
    validate_uuid,
)
from lpmos.store import Compare, Conflict, KeyValue, Op, Put, Store, StoreError
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)

MACS_MAX = 64
PLACEHOLDER_SERIALS = frozenset({"", "not specified", "to be filled by o.e.m.", "0", "none",
                                 "default string", "system serial number", "not applicable",
                                 "n/a", "123456789", "0123456789"})
_ARCH_RE = re.compile(r"[a-z0-9_]{1,16}")
_BOOT_ID_RE = re.compile(r"[0-9a-fA-F-]{16,64}")


class RegistrationConflict(Exception):
    """The machine holds a token and the request carries none or another (409)."""

    status_code = 409


@dataclass(frozen=True)
class RegisterRequest:
    sn: str
    uuid: str
    macs: list[str]
    boot_mac: str
    arch: str
    inventory: dict[str, Any]
    agent_version: str
    boot_id: str = ""     # the kernel's per-boot id (/proc/sys/kernel/random/boot_id)


@dataclass(frozen=True)
class Registered:
    sn: str
    token: str | None
    task: Task | None
    conflict: str = ""
    revision: int = 0


def parse_register(body: Any) -> RegisterRequest:
    """Validate a registration body (see agent_api.md §1)."""
    if not isinstance(body, dict):
        raise ValidationError("body", "a JSON object")
    sn = body.get("sn", "")
    sn = sn.strip() if isinstance(sn, str) else ""
    if len(sn) > 128:
        sn = ""
    raw_uuid = body.get("uuid") or ""
    try:
        uuid = validate_uuid(raw_uuid) if raw_uuid else ""
    except ValidationError:
        uuid = ""     # firmware reports garbage UUIDs; an unusable one is no identity
    raw_macs = body.get("macs", [])
    if not isinstance(raw_macs, list) or len(raw_macs) > MACS_MAX:
        raise ValidationError("macs", f"a list of at most {MACS_MAX} MAC addresses")
    macs: list[str] = []
    for m in raw_macs:
        mac = normalize_mac(m, "macs")
        if mac not in macs:
            macs.append(mac)
    boot_mac = body.get("boot_mac") or ""
    if boot_mac:
        boot_mac = normalize_mac(boot_mac, "boot_mac")
        if boot_mac not in macs:
            macs.insert(0, boot_mac)
    elif macs:
        boot_mac = macs[0]
    if not macs:
        raise ValidationError("macs", "at least one MAC address is required")
    arch = body.get("arch") or "x86_64"
    if not isinstance(arch, str) or not _ARCH_RE.fullmatch(arch):
        raise ValidationError("arch", "1-16 characters of a-z, 0-9 and '_'")
    inventory = body.get("inventory") or {}
    if not isinstance(inventory, dict):
        raise ValidationError("inventory", "a JSON object")
    version = validate_text(body.get("agent_version", ""), "agent_version", 64)
    boot_id = body.get("boot_id") or ""
    if not isinstance(boot_id, str) or not _BOOT_ID_RE.fullmatch(boot_id):
        boot_id = ""      # optional; a malformed one is simply not used
    return RegisterRequest(sn, uuid, macs, boot_mac, arch, inventory, version, boot_id.lower())


def usable_serial(serial: str) -> bool:
    if serial.strip().lower() in PLACEHOLDER_SERIALS:
        return False
    try:
        validate_sn(serial)
    except ValidationError:
        return False
    return True


def mac_sn(mac: str) -> str:
    return "mac-" + mac.replace(":", "")


def decide_identity(req: RegisterRequest, known: dict[str, str | None]) -> str:
    """The authoritative SN.  ``known`` maps ``"mac:<mac>"``, ``"uuid"`` and
    ``"serial"`` to the SN the node's index resolves them to (or None)."""
    for mac in req.macs:
        sn = known.get("mac:" + mac)
        if sn:
            return sn
    if known.get("uuid"):
        return str(known["uuid"])
    if known.get("serial"):
        return str(known["serial"])
    if usable_serial(req.sn):
        return req.sn
    return mac_sn(req.boot_mac)


TokenAction = Literal["issue", "keep", "reissue", "refuse"]


def decide_token(stored: bytes | None, presented: str | None, boot_id: str) -> TokenAction:
    """What a registration does with the machine's token, given the stored
    token record (None: none), the token the request ``presented`` and its
    boot id: ``issue`` a first one, ``keep`` the one presented, ``reissue``
    or ``refuse`` (409) when the request does not carry the stored one.

    ``reissue`` is for the same boot registering again after its first
    answer (with the token) was lost.  It proves itself with its boot id,
    which only the machine and the network path have seen, as they saw the
    token; the old token dies with the re-issue."""
    if stored is None:
        return "issue"
    digest = _digest_of(stored)
    if presented and digest is not None and \
            hmac.compare_digest(token_digest(presented), digest):
        return "keep"
    if _same_boot(stored, boot_id):
        return "reissue"
    return "refuse"


MacDecision = Literal["own", "claim", "taken"]


def decide_mac_owner(sn: str, mac: str, owner: str) -> MacDecision:
    """What registering ``sn`` does with the index entry of ``mac``, which
    names ``owner`` ("" for none): ``own`` (it is ``sn``'s already),
    ``claim`` it (unindexed, or held by a ``mac-<hex>`` SN, which is a
    placeholder identity, not a machine), or leave it ``taken``: another
    machine holds it, the index keeps its first owner and both records are
    flagged."""
    if owner and owner != sn and owner != mac_sn(mac) and not owner.startswith("mac-"):
        return "taken"
    return "own" if owner == sn else "claim"


def build_server_record(old: Server | None, req: RegisterRequest, *, idc: str, sn: str,
                        ip: str, stamp: float, taken: list[tuple[str, str]]) -> Server:
    """The server record after ``req`` at ``stamp``: ``old`` (or a new one
    first seen now) with the request's MACs added, its UUID, arch, inventory,
    boot MAC and ``ip``.  A UUID other than the recorded one (a cloned VM)
    or a MAC another machine holds (``taken``: (mac, owner) pairs) flags it,
    unless it is flagged already.  ``old`` is not changed.  Raises
    :class:`lpmos.models.ValidationError`."""
    server = replace(old) if old is not None else Server(idc=idc, sn=sn, first_seen=stamp)
    conflicts: list[str] = []
    if server.uuid and req.uuid and server.uuid != req.uuid:
        conflicts.append(f"uuid {req.uuid} registered for {sn}, which had uuid {server.uuid}")
    conflicts += [f"mac {mac} also belongs to {owner}" for mac, owner in taken]
    server.macs = list(dict.fromkeys([*server.macs, *req.macs]))[:MACS_MAX]
    server.uuid = req.uuid or server.uuid
    server.arch = req.arch
    server.inventory = req.inventory
    server.boot_mac = req.boot_mac
    server.ip = ip[:64]
    server.last_seen = stamp
    server.state = "registered"
    if conflicts and not server.conflict:
        server.conflict = "; ".join(conflicts)[:300]
    return server.validate()


@dataclass
class _Lease:
    lease_id: int
    state: str
    expires: float = field(default=0.0)


class Registrar:
    def __init__(self, store: Store, keys: Keys, idc: str, machines: MachineIndex,
                 tokens: MachineTokens, cache: WatchCache, metrics: Registry, *, node: str,
                 heartbeat_interval: float = 10.0) -> None:
        self.store = store
        self.keys = keys
        self.idc = idc
        self.machines = machines
        self.tokens = tokens
        self.cache = cache
        self.metrics = metrics
        self.node = node
        metrics.describe("http_registrations_total",
                         "agent registrations stored, by token (issued or kept)")
        metrics.describe("http_register_conflicts_total",
                         "registrations flagged as a conflict (duplicate MAC, cloned machine)")
        metrics.describe("http_register_reissued_total",
                         "registrations that were issued a new machine token")
        metrics.describe("http_register_refused_total", "registrations refused, by reason")
        self.heartbeat_interval = heartbeat_interval
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()

    # -- registration -------------------------------------------------------------------

    def identify(self, req: RegisterRequest) -> str:
        known: dict[str, str | None] = {f"mac:{m}": self.machines.sn_for(mac=m) for m in req.macs}
        known["uuid"] = self.machines.sn_for(uuid=req.uuid) if req.uuid else None
        known["serial"] = self.machines.sn_for(serial=req.sn) if usable_serial(req.sn) else None
        return decide_identity(req, known)

    def register(self, req: RegisterRequest, presented: str | None, *, ip: str = "") -> Registered:
        """Write the server record (+ MAC index, + token) for ``req``.

        Raises :class:`RegistrationConflict` (409) when the machine holds a
        token and ``presented`` is not it, :class:`lpmos.store.StoreError`
        when etcd fails.
        """
        sn = self.identify(req)
        for _attempt in range(4):
            try:
                return self._register_once(sn, req, presented, ip)
            except Conflict:
                time.sleep(0.01)
        raise Conflict(self.keys.server(self.idc, sn), 0, "registration kept racing; retry")

    def _register_once(self, sn: str, req: RegisterRequest, presented: str | None,
                       ip: str) -> Registered:
        idc = self.idc
        server_key = self.keys.server(idc, sn)
        token_key = self.keys.machine_token(idc, sn)
        server_kv = self.store.get(server_key)
        token_kv = self.store.get(token_key)
        action = decide_token(token_kv.value if token_kv else None, presented, req.boot_id)
        self._count_token(sn, action)
        stamp = time.time()
        old = Server.from_json(server_kv.value) if server_kv is not None else None
        compares = [Compare(server_key, _revision(server_kv)),
                    Compare(token_key, _revision(token_kv))]
        ops: list[Op] = []
        taken = self._index_macs(sn, req.macs, compares, ops)
        server = build_server_record(old, req, idc=idc, sn=sn, ip=ip, stamp=stamp, taken=taken)
        ops.insert(0, Put(server_key, server.to_json()))
        token: str | None = None
        if action in ("issue", "reissue"):
            token, put = self.tokens.issue(sn, why="re-registration" if action == "reissue" else
                                           "registration", boot_id=req.boot_id)
            ops.append(put)
        revision = self.store.commit(compares, ops)
        if token:
            self.tokens.learn(sn, token, revision)
        # read-your-writes: the next request of this agent is answered from the cache
        self.cache.wait_for_revision(revision, 1.0)
        if server.conflict:
            self.metrics.inc("http_register_conflicts_total")
            log.warning("machine %s/%s flagged: %s", idc, sn, server.conflict)
        self.metrics.inc("http_registrations_total", token="issued" if token else "kept")
        view = self.machines.view(sn)
        return Registered(sn, token, view.task, server.conflict, revision)

    def _count_token(self, sn: str, action: TokenAction) -> None:
        """Count a re-issue; count and raise :class:`RegistrationConflict` for a refusal."""
        if action == "reissue":
            self.metrics.inc("http_register_reissued_total")
        elif action == "refuse":
            self.metrics.inc("http_register_refused_total", reason="token_held")
            raise RegistrationConflict(
                f"{sn} already holds a token from an earlier registration and this "
                "request does not carry it; reboot the machine to reset it")

    def _index_macs(self, sn: str, macs: list[str], compares: list[Compare],
                    ops: list[Op]) -> list[tuple[str, str]]:
        """Add to ``compares``/``ops`` the MAC index writes for ``sn`` and the
        flag on each other machine that holds one of ``macs``; returns the
        (mac, owner) pairs another machine holds."""
        taken: list[tuple[str, str]] = []
        flagged: set[str] = set()
        for mac in macs:
            index_key = self.keys.mac(self.idc, mac)
            index_kv = self.store.get(index_key)
            owner = index_kv.value.decode(errors="replace") if index_kv else ""
            decision = decide_mac_owner(sn, mac, owner)
            if decision == "claim":
                compares.append(Compare(index_key, _revision(index_kv)))
                ops.append(Put(index_key, sn.encode()))
            elif decision == "taken":     # the index keeps its first owner
                taken.append((mac, owner))
                other_key = self.keys.server(self.idc, owner)
                other_kv = self.store.get(other_key)
                if other_kv is not None and owner not in flagged:
                    other = Server.from_json(other_kv.value)
                    if not other.conflict:
                        other.conflict = f"mac {mac} also registered by {sn}"[:300]
                        flagged.add(owner)
                        compares.append(Compare(other_key, other_kv.mod_revision))
                        ops.append(Put(other_key, other.to_json()))
        return taken

    # -- heartbeat --------------------------------------------------------------------

    @property
    def lease_ttl(self) -> int:
        return max(5, math.ceil(3 * self.heartbeat_interval))

    def heartbeat(self, sn: str, state: str) -> None:
        """Keep ``keys.lease(idc, sn)`` alive; raises StoreError when etcd fails."""
        state = re.sub(r"[^a-z0-9_-]", "", state.lower())[:32] or "unknown"
        key = self.keys.lease(self.idc, sn)
        with self._lock:
            lease = self._leases.get(sn)
        if lease is not None:
            ttl = self.store.keepalive(lease.lease_id)
            if ttl > 0:
                if lease.state != state:
                    self.store.put(key, self._lease_value(state), lease=lease.lease_id)
                    lease.state = state
                return
        lease_id = self.store.grant(self.lease_ttl)
        self.store.put(key, self._lease_value(state), lease=lease_id)
        with self._lock:
            if len(self._leases) > 50000:
                self._leases.clear()
            self._leases[sn] = _Lease(lease_id, state)

    def _lease_value(self, state: str) -> bytes:
        return json.dumps({"node": self.node, "state": state, "at": time.time()},
                          sort_keys=True).encode()

    def release(self) -> None:
        """Forget leases (they expire by themselves; a node restart must not
        revoke the liveness of machines another node may be serving)."""
        with self._lock:
            self._leases.clear()


def _same_boot(raw: bytes, boot_id: str) -> bool:
    """Whether a stored token was issued to the boot with ``boot_id``."""
    if not boot_id:
        return False
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    stored = data.get("boot_sha256") if isinstance(data, dict) else None
    return isinstance(stored, str) and hmac.compare_digest(token_digest(boot_id), stored)


def _revision(kv: KeyValue | None) -> int:
    """The revision to compare a key against: 0 says "still absent"."""
    return kv.mod_revision if kv is not None else 0


def _digest_of(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    value = data.get("sha256") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


__all__ = ["RegisterRequest", "Registered", "Registrar", "RegistrationConflict", "StoreError",
           "TokenError", "build_server_record", "decide_identity", "decide_mac_owner",
           "decide_token", "parse_register"]
