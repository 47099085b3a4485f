"""Task operations: create, transition, apply progress events — each one CAS.

Every change to a task document goes through :func:`lpmos.store.atomic_update`
(or a single :func:`lpmos.store.cas` when the caller names the revision it
saw, as the API does for "approve what I looked at"), so two approvers, two
nodes or two browsers can never both win: the loser gets :class:`Conflict`
or :class:`IllegalTransition` (both HTTP 409).

Every mutating method takes an optional ``audit`` builder: the audit record
it returns is committed in the same transaction as the change (see
:mod:`lpmos.audit`), built from the task the transaction replaces and the
one it writes, so the record names exactly what that commit did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lpmos.models import ProgressEvent, Task, Transition, ValidationError, now
from lpmos.states import (
    FINAL,
    IllegalTransition,
    Move,
    NotInState,
    TaskStatus,
    decide_transition,
)
from lpmos.store import (
    Compare,
    Conflict,
    Delete,
    KeyValue,
    Op,
    Put,
    Store,
    Unchanged,
    atomic_update,
)
from lpmos.store.keys import Keys


class TaskNotFound(LookupError):
    status_code = 404

    def __init__(self, idc: str, sn: str) -> None:
        super().__init__(f"no task for {idc}/{sn}")
        self.idc = idc
        self.sn = sn


class TaskExists(Conflict):
    """A task for this machine is still active."""


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a pending", "an approved"."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class BatchRefused(ValidationError):
    """Some rows of a batch cannot be created; ``errors`` names each."""

    status_code = 400

    def __init__(self, errors: list[dict[str, object]]) -> None:
        super().__init__("tasks", f"{len(errors)} row(s) refused; nothing was created")
        self.errors = errors


@dataclass(frozen=True)
class Stored:
    task: Task
    revision: int


#: Builds the audit record of one task change for the change's own
#: transaction: ``audit(before, after)`` gets the stored task the commit
#: replaces (``None``: none) and the task it writes (``None``: a delete).
AuditFn = Callable[[Stored | None, Task | None], Op]


def _as_created(task: Task, *, by: str, at: float) -> None:
    """Validate ``task`` and make it a new ``pending`` task created by ``by``."""
    task.validate()
    task.status = TaskStatus.PENDING.value
    task.created_by = by
    task.created_at = task.updated_at = at
    task.add_transition(Transition("", TaskStatus.PENDING.value, at, by, "created"))


def _still_active(task: Task, old: Task) -> str:
    """Why ``task`` may not replace ``old``, the stored task of its machine
    (``""``: it may, ``old`` has ended)."""
    if old.state in FINAL:
        return ""
    return f"{task.idc}/{task.sn} already has {_a(old.status)} task"


class TaskService:
    def __init__(self, store: Store, keys: Keys) -> None:
        self.store = store
        self.keys = keys

    def get(self, idc: str, sn: str) -> Stored | None:
        kv = self.store.get(self.keys.task(idc, sn))
        if kv is None:
            return None
        return Stored(Task.from_json(kv.value), kv.mod_revision)

    def create(self, task: Task, *, by: str, audit: AuditFn | None = None) -> Stored:
        """Store a new ``pending`` task.  An existing task for the same
        machine may be replaced only when it has ended (succeeded, failed,
        rejected, cancelled); an active one raises :class:`TaskExists`.
        ``audit`` gets the ended task being replaced as ``before``."""
        _as_created(task, by=by, at=now())
        key = self.keys.task(task.idc, task.sn)
        current = self.store.get(key)
        expected = 0
        replaced: Stored | None = None
        if current is not None:
            old = Task.from_json(current.value)
            if busy := _still_active(task, old):
                raise TaskExists(key, current.mod_revision, busy)
            expected = current.mod_revision
            replaced = Stored(old, current.mod_revision)
        ops: list[Op] = [Put(key, task.to_json())]
        if audit is not None:
            ops.append(audit(replaced, task))
        revision = self.store.commit([Compare(key, expected)], ops)
        return Stored(task, revision)

    def create_many(self, tasks: list[Task], *, by: str,
                    audit: Callable[[list[Task]], Op] | None = None) -> list[Stored]:
        """Store several new ``pending`` tasks in ONE etcd transaction: all or
        none.  Each machine may appear once and must have no active task
        (as :meth:`create`); otherwise :class:`BatchRefused` lists every bad
        row (0-based index) and nothing is written.  A concurrent write to any
        of the keys between the check and the commit raises :class:`Conflict`
        (nothing written).  etcd refuses transactions of more than
        ``--max-txn-ops`` (default 128) operations; callers bound the size
        (the batch's one audit record, ``audit(tasks)``, is one of them)."""
        errors: list[dict[str, object]] = []
        seen: dict[str, int] = {}
        compares: list[Compare] = []
        puts: list[Put] = []
        stamp = now()
        for i, task in enumerate(tasks):
            key = self.keys.task(task.idc, task.sn)
            if key in seen:
                errors.append({"row": i, "field": "sn", "error":
                               f"{task.idc}/{task.sn} also in row {seen[key]}"})
                continue
            seen[key] = i
            _as_created(task, by=by, at=stamp)
            current = self.store.get(key)
            expected = 0
            if current is not None:
                if busy := _still_active(task, Task.from_json(current.value)):
                    errors.append({"row": i, "field": "sn", "error": busy})
                    continue
                expected = current.mod_revision
            compares.append(Compare(key, expected))
            puts.append(Put(key, task.to_json()))
        if errors:
            raise BatchRefused(errors)
        if not puts:
            return []
        ops: list[Op] = list(puts)
        if audit is not None:
            ops.append(audit(tasks))
        revision = self.store.commit(compares, ops)
        return [Stored(t, revision) for t in tasks]

    def update(self, idc: str, sn: str, fn: Callable[[Task], None], *,
               expect_revision: int | None = None, audit: AuditFn | None = None,
               extra: Callable[[Task], list[Op]] | None = None) -> Stored:
        """Apply ``fn`` (which mutates the task, or raises) under CAS.

        With ``expect_revision`` the write happens only if the task is still
        at that revision (no retry: the caller decided on what it saw).
        ``fn`` may raise :class:`lpmos.store.Unchanged` to write nothing
        (and no audit record).  ``extra(task)`` adds operations to the same
        transaction, built from the task about to be written (an approval's
        power request, :mod:`lpmos.power`); it runs once per attempt.
        """
        key = self.keys.task(idc, sn)
        result: list[Task] = []

        def apply(raw: bytes | None) -> bytes | None:
            if raw is None:
                raise TaskNotFound(idc, sn)
            task = Task.from_json(raw)
            fn(task)
            task.updated_at = now()
            result[:] = [task]
            return task.to_json()

        if expect_revision is not None:
            kv = self.store.get(key)
            if kv is None:
                raise TaskNotFound(idc, sn)
            if kv.mod_revision != expect_revision:
                raise Conflict(key, kv.mod_revision)
            try:
                new = apply(kv.value)
            except Unchanged:
                return Stored(Task.from_json(kv.value), kv.mod_revision)
            assert new is not None
            ops: list[Op] = [Put(key, new)]
            if audit is not None:
                ops.append(audit(Stored(Task.from_json(kv.value), kv.mod_revision), result[0]))
            if extra is not None:
                ops.extend(extra(result[0]))
            revision = self.store.commit([Compare(key, expect_revision)], ops)
            return Stored(result[0], revision)

        def audited(current: KeyValue | None, _new: bytes | None) -> list[Op]:
            assert current is not None   # apply() refused a missing task
            ops = [audit(Stored(Task.from_json(current.value), current.mod_revision),
                         result[0])] if audit is not None else []
            return ops + (extra(result[0]) if extra is not None else [])

        raw, revision = atomic_update(self.store, key, apply,
                                      extra=audited if audit is not None or extra is not None
                                      else None)
        if not result:    # Unchanged
            assert raw is not None
            return Stored(Task.from_json(raw), revision)
        return Stored(result[0], revision)

    def transition(
        self,
        idc: str,
        sn: str,
        target: TaskStatus | str,
        *,
        by: str,
        reason: str = "",
        expect_revision: int | None = None,
        mutate: Callable[[Task], None] | None = None,
        source: TaskStatus | str | None = None,
        audit: AuditFn | None = None,
        extra: Callable[[Task], list[Op]] | None = None,
    ) -> Stored:
        """Move a task to ``target``; :class:`IllegalTransition` if the state
        machine forbids it (checked against the state read in the same CAS),
        :class:`NotInState` if ``source`` is given and the task is not in it."""
        target = TaskStatus(target)
        only = TaskStatus(source) if source is not None else None

        def fn(task: Task) -> None:
            if only is not None and task.status != only.value:
                raise NotInState(task.status, target, only)
            apply_transition(task, decide_transition(task.status, target, at=now(), by=by,
                                                     reason=reason))
            if mutate is not None:
                mutate(task)

        return self.update(idc, sn, fn, expect_revision=expect_revision, audit=audit,
                           extra=extra)

    def apply_events(self, idc: str, sn: str, events: list[ProgressEvent], *,
                     by: str = "") -> tuple[Stored, list[str]]:
        """Apply progress events in order, skipping duplicates (L2).

        Returns the stored task and the ids of the events applied now.  An
        event whose ``seq`` is at or below the highest already applied from
        its source is a duplicate and changes nothing.  A ``state`` event
        moves the task through the state machine; one the machine forbids
        (for example ``succeeded`` for a cancelled task) is recorded in the
        log and otherwise ignored, so a late event can never resurrect a task.
        """
        applied: list[str] = []

        def fn(task: Task) -> None:
            applied.clear()
            for ev in sorted(events, key=lambda e: (e.source, e.seq)):
                if ev.seq <= task.event_seq.get(ev.source, -1):
                    continue
                task.event_seq[ev.source] = ev.seq
                applied.append(ev.event_id)
                stamp = now()
                if ev.kind == "state" and task.status != ev.status:
                    try:
                        move = decide_transition(task.status, ev.status, at=stamp,
                                                 by=by or ev.source, reason=ev.message,
                                                 reported=True)
                    except IllegalTransition:
                        task.add_log(f"ignored {ev.source} state {TaskStatus(ev.status).value} "
                                     f"(task is {task.status})")
                        continue
                    apply_transition(task, move)
                if ev.percent is not None:
                    task.progress.percent = ev.percent
                if ev.step:
                    task.progress.step = ev.step
                if ev.message:
                    task.progress.message = ev.message
                    task.add_log(ev.log_line())     # as the node's full log writes it
                if ev.bytes_total:
                    task.progress.bytes_done = ev.bytes_done
                    task.progress.bytes_total = ev.bytes_total
                    task.progress.rate = float(ev.rate)
                task.progress.updated_at = stamp
            if not applied:
                raise Unchanged

        return self.update(idc, sn, fn), list(applied)

    def delete(self, idc: str, sn: str, *, expect_revision: int | None = None,
               audit: AuditFn | None = None) -> Task:
        key = self.keys.task(idc, sn)
        kv = self.store.get(key)
        if kv is None:
            raise TaskNotFound(idc, sn)
        if expect_revision is not None and kv.mod_revision != expect_revision:
            raise Conflict(key, kv.mod_revision)
        task = Task.from_json(kv.value)
        if task.state in (TaskStatus.BOOTING, TaskStatus.INSTALLING):
            raise ValidationError("status", f"cannot delete a {task.status} task; cancel it first")
        ops: list[Op] = [Delete(key)]
        if audit is not None:
            ops.append(audit(Stored(task, kv.mod_revision), None))
        self.store.commit([Compare(key, kv.mod_revision)], ops)
        return task



def apply_transition(task: Task, move: Move) -> None:
    """Write ``move`` (:func:`lpmos.states.decide_transition`) into ``task``:
    the one place a task's status changes.  The caller stores it by CAS."""
    task.add_transition(Transition(move.current.value, move.target.value, move.at, move.by,
                                   move.reason))
    task.status = move.target.value
    for name, value in move.fields:
        record, _, attr = name.rpartition(".")
        setattr(task.progress if record == "progress" else task, attr, value)
    if move.new_attempt:
        task.attempt += 1
        task.event_seq = {}
    if move.served_by:
        task.served_by(move.served_by)
    task.updated_at = move.at
