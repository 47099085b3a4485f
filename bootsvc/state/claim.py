"""The destructive path: confirm an install with etcd before serving it.

RELIABILITY L3: no install is served without a fresh linearizable read and
a successful compare-and-swap claim of the task in the same request.

:func:`claim_install` does, for a ``claim`` decision (task ``approved`` in
the cache):

1. a fresh read of the task (and of the server record, for the conflict
   flag);
2. one transaction, conditional on the task's ``mod_revision``: the task
   moves ``approved → booting`` with ``claimed_by = node``, and the
   machine's token is replaced (a new one for installer mode, whose script
   and configs carry it; deleted for image mode, whose agent registers and
   gets its own).

For a ``continue`` decision (``booting`` / ``installing``: the machine
booted again mid-install) it does the fresh read and the token
replacement, conditional on the task being unchanged, without a state
change — unless *another* node claimed the task less than
``claim_guard`` seconds ago: that is the losing side of a race whose
cache already shows the winner's claim, and it waits like a CAS loser.

Whether the task read may be claimed, and what the claim writes, is the
pure rule :func:`bootsvc.policy.claim.decide_claim`; this module does the
reads and the conditional writes.

Two nodes racing for one task both read ``approved`` at revision R; both
commit on R; etcd lets exactly one through.  The loser gets
:class:`lpmos.store.Conflict` and answers "wait and retry".  Every failure
(etcd unreachable, the task changed, a conflict flag, a lost race) is an
:class:`Outcome` with ``install False``: the caller serves the wait script.
It never raises for those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bootsvc.policy.claim import decide_claim, decide_release
from bootsvc.state.tokens import MachineTokens
from lpmos.models import Server, Task, ValidationError, now
from lpmos.power import PowerRequest, coming_cycle
from lpmos.store import Compare, Conflict, KeyValue, Op, Put, Store, StoreError
from lpmos.store.keys import Keys
from lpmos.tasks import apply_transition


@dataclass(frozen=True)
class Outcome:
    """The result of a claim.  ``install`` False → serve wait-and-retry."""

    install: bool
    reason: str
    task: Task | None = None
    server: Server | None = None
    revision: int = 0
    token: str = ""
    etcd_requests: int = 0


def claim_install(
    store: Store,
    keys: Keys,
    tokens: MachineTokens,
    *,
    idc: str,
    sn: str,
    node: str,
    continuing: bool,
    renew: Literal["issue", "delete", "keep"],
    claim_guard: float = 30.0,
    boot_uuid: str = "",
) -> Outcome:
    """Claim (``continuing=False``) or re-confirm (``True``) the install of
    ``idc/sn`` for ``node``.  Fails closed; see the module docstring.

    ``renew`` (the machine token): ``issue`` a new one in the same transaction
    (installer mode: the script carries it), ``delete`` it (image mode from
    a boot script: the new agent registers for its own), or ``keep`` it (an
    agent already running claims through its task poll).

    ``boot_uuid`` is the SMBIOS UUID the booting firmware reported (``""``:
    unknown).  When the server record holds another UUID, a second machine
    boots with this machine's MAC (a cloned VM): the record is flagged as a
    conflict (best effort, CAS on the revision read) and no install is
    served (RELIABILITY: duplicate MAC / cloned VM)."""
    task_key = keys.task(idc, sn)
    read = _fresh_read(store, keys, idc, sn, "install")
    if isinstance(read, Outcome):
        return read
    kv, server_kv, task, server = read
    requests = 2
    decision = decide_claim(task, server, node=node, continuing=continuing, at=now(),
                            claim_guard=claim_guard, boot_uuid=boot_uuid)
    if decision.conflict and server is not None and server_kv is not None:
        requests += _flag_conflict(store, keys.server(idc, sn), server, server_kv,
                                   decision.conflict)
    if not decision.install:
        return Outcome(False, decision.reason, task, server, kv.mod_revision,
                       etcd_requests=requests)
    if renew == "keep" and not continuing:
        requests += 1
        why = _cycle_coming(store, keys, task, "install")
        if why:
            return Outcome(False, why, task, server, kv.mod_revision, etcd_requests=requests)
    ops: list[Op] = []
    if decision.move is not None:
        apply_transition(task, decision.move)
        ops.append(Put(task_key, task.to_json()))
    token, token_ops = _token_ops(tokens, sn, renew)
    ops += token_ops
    if not ops:       # continuing with the token kept: the fresh read was the check
        return Outcome(True, decision.reason, task, server, kv.mod_revision,
                       etcd_requests=requests)
    try:
        requests += 1
        revision = store.commit([Compare(task_key, kv.mod_revision)], ops)
    except Conflict as exc:
        return Outcome(False, f"another node claimed the task first (now at revision "
                       f"{exc.revision})", task, server, kv.mod_revision, etcd_requests=requests)
    except StoreError as exc:
        return Outcome(False, f"etcd unavailable for the install claim ({type(exc).__name__})",
                       task, server, kv.mod_revision, etcd_requests=requests)
    if token:
        tokens.learn(sn, token, revision)
    elif renew == "delete":
        tokens.forget(sn)
    return Outcome(True, decision.reason, task, server,
                   revision if decision.move is not None else kv.mod_revision, token,
                   etcd_requests=requests)


def _fresh_read(store: Store, keys: Keys, idc: str, sn: str, what: str
                ) -> tuple[KeyValue, KeyValue | None, Task, Server | None] | Outcome:
    """The linearizable read a claim starts with: the task's and the server
    record's key-values and what they hold, or the refusing :class:`Outcome`
    (etcd unavailable, the task gone, a record unreadable; ``what`` names
    the claim in the reason)."""
    requests = 0
    try:
        requests += 1
        kv = store.get(keys.task(idc, sn))
        requests += 1
        server_kv = store.get(keys.server(idc, sn))
    except StoreError as exc:
        return Outcome(False, f"etcd unavailable for the {what} claim ({type(exc).__name__})",
                       etcd_requests=requests)
    if kv is None:
        return Outcome(False, "the task is gone", etcd_requests=requests)
    try:
        task = Task.from_json(kv.value)
        server = Server.from_json(server_kv.value) if server_kv is not None else None
    except ValidationError as exc:
        return Outcome(False, f"unreadable task or server record: {exc}", etcd_requests=requests)
    return kv, server_kv, task, server


def _cycle_coming(store: Store, keys: Keys, task: Task, what: str) -> str:
    """Why an agent already running may not start ``task``'s attempt now
    (``""``: it may): a power cycle queued for the attempt is still to come
    (:func:`lpmos.power.coming_cycle`), read fresh; fails closed when etcd
    does not answer."""
    try:
        items = store.range(keys.power_requests(task.idc, task.sn)).items
    except StoreError as exc:
        return f"etcd unavailable for the {what} claim ({type(exc).__name__})"
    requests = []
    for item in items:
        try:
            requests.append(PowerRequest.from_json(item.value))
        except ValidationError:
            continue
    coming = coming_cycle(requests, task.attempt, now())
    if coming is None:
        return ""
    return (f"the BMC is to power-cycle the machine into PXE for attempt {task.attempt} "
            f"({coming.id}, {coming.state}); the {what} starts from that boot")


def _flag_conflict(store: Store, server_key: str, server: Server, server_kv: KeyValue,
                   conflict: str) -> int:
    """Mark the server record with ``conflict``, conditional on the revision
    read (best effort); returns the etcd requests made (1)."""
    server.conflict = conflict
    try:
        store.commit([Compare(server_key, server_kv.mod_revision)],
                     [Put(server_key, server.to_json())])
    except (Conflict, StoreError):
        pass      # refused either way; the next boot of the clone flags it again
    return 1


def _token_ops(tokens: MachineTokens, sn: str,
               renew: Literal["issue", "delete", "keep"]) -> tuple[str, list[Op]]:
    """The machine token's part of the claim: the new token (``""`` unless
    ``issue``) and the operations that write it."""
    if renew == "delete":
        return "", [tokens.delete_op(sn)]
    if renew == "issue":
        token, put = tokens.issue(sn, why="install script")
        return token, [put]
    return "", []


def claim_release(store: Store, keys: Keys, *, idc: str, sn: str, node: str) -> Outcome:
    """Confirm with etcd that ``idc/sn`` is to be wiped now, before its
    agent is told to (RELIABILITY L3, as for an install): a fresh read of
    the task and server record, the pure rule
    :func:`bootsvc.policy.claim.decide_release`, and when ``node`` does not
    serve the attempt yet, one CAS on the revision read that records it
    (``claimed_by``, ``started_at``, the attempt's node).  Fails closed
    (``install`` False: the agent is told to wait)."""
    task_key = keys.task(idc, sn)
    read = _fresh_read(store, keys, idc, sn, "release")
    if isinstance(read, Outcome):
        return read
    kv, _server_kv, task, server = read
    decision = decide_release(task, server, node=node)
    if not decision.install:
        return Outcome(False, decision.reason, task, server, kv.mod_revision, etcd_requests=2)
    why = _cycle_coming(store, keys, task, "wipe") if task.claimed_by != node else ""
    if why:
        return Outcome(False, why, task, server, kv.mod_revision, etcd_requests=3)
    if task.claimed_by == node:
        return Outcome(True, decision.reason, task, server, kv.mod_revision, etcd_requests=2)
    task.served_by(node)
    task.started_at = task.updated_at = now()
    task.add_log(f"release: node {node} has the live agent wipe the disks")
    try:
        revision = store.commit([Compare(task_key, kv.mod_revision)],
                                [Put(task_key, task.to_json())])
    except Conflict as exc:
        return Outcome(False, f"the task changed meanwhile (now at revision {exc.revision})",
                       task, server, kv.mod_revision, etcd_requests=3)
    except StoreError as exc:
        return Outcome(False, f"etcd unavailable for the release claim ({type(exc).__name__})",
                       task, server, kv.mod_revision, etcd_requests=3)
    return Outcome(True, decision.reason, task, server, revision, etcd_requests=3)
