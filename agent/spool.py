"""The agent's on-disk spool: events survive node outages and agent restarts.

Layout of the spool directory (mode 0700)::

    seq            the next sequence number not yet handed out (reserved in blocks)
    events/SEQ.json one pending event per file, named by its zero-padded seq
    token          the per-machine token (mode 0600)
    state.json     install checkpoints (which task attempt was written)
    journal.jsonl  every event ever spooled, for post-mortems (bounded, not fsynced)

Contract:

* :meth:`Spool.append` gives the event the next ``seq`` of source ``agent``
  and writes it durably (file fsync, rename, directory fsync) *before*
  returning, so nothing the agent reported is lost to a crash;
* sequence numbers are strictly increasing across restarts: they are
  reserved in blocks recorded in ``seq`` before use (a crash may skip
  numbers, never reuse one; the node deduplicates by ``source:seq``);
* :meth:`Spool.pending` returns events in seq order, and an event is removed
  only by :meth:`Spool.ack` with its id, once the node has stored it;
* bounded: past ``max_events`` pending events new *progress* events are
  dropped (each one supersedes the one before; counted as
  ``agent_spool_dropped_total{reason="full"}``), log events are dropped
  past twice that, and state events are always kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from lpmos.metrics import Registry
from lpmos.models import ProgressEvent, ValidationError

log = logging.getLogger(__name__)

SOURCE = "agent"
SEQ_BLOCK = 64
DEFAULT_MAX_EVENTS = 10_000
JOURNAL_MAX = 8 * 1024 * 1024
EVENT_FILE_MAX = 64 * 1024
_EVENT_RE = re.compile(r"(\d{16})\.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with ``data``: temp file, fsync, rename,
    directory fsync.  A crash leaves the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class SpoolCorrupt(RuntimeError):
    pass


class Spool:
    def __init__(self, directory: Path, *, max_events: int = DEFAULT_MAX_EVENTS,
                 metrics: Registry | None = None, source: str = SOURCE) -> None:
        self.dir = Path(directory)
        self.events_dir = self.dir / "events"
        self.max_events = max_events
        self.metrics = metrics or Registry()
        self.source = source
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.events_dir.mkdir(exist_ok=True, mode=0o700)
        for stale in self.events_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)       # a crash between write and rename
        self._pending: list[int] = sorted(
            int(m.group(1)) for p in self.events_dir.iterdir()
            if (m := _EVENT_RE.fullmatch(p.name)))
        reserved = self._read_reserved()
        self._next = max([reserved, *(s + 1 for s in self._pending)])
        self._reserved = self._next    # nothing reserved by this process yet
        self._heal_journal()

    def _heal_journal(self) -> None:
        """A crash between spooling an event and journaling it leaves the
        event pending but not in the journal: journal it now (and finish a
        line a crash cut short), so the journal lists every spooled event."""
        path = self.dir / "journal.jsonl"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError:
            return
        if raw and not raw.endswith(b"\n"):
            with path.open("ab") as fh:
                fh.write(b"\n")
        journaled = set()
        for line in raw.splitlines():
            try:
                journaled.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
        for seq in self._pending:
            if seq not in journaled:
                try:
                    self._journal((self.events_dir / f"{seq:016d}.json").read_bytes())
                except OSError:
                    continue

    # -- sequence numbers
    def _read_reserved(self) -> int:
        path = self.dir / "seq"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise SpoolCorrupt(f"{path} holds {text[:40]!r}, not a sequence number")
        return int(text)

    def _take_seq(self) -> int:
        if self._next >= self._reserved:
            self._reserved = self._next + SEQ_BLOCK
            write_durably(self.dir / "seq", f"{self._reserved}\n".encode())
        seq = self._next
        self._next += 1
        return seq

    # -- events
    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def append(self, **fields: Any) -> ProgressEvent | None:
        """Spool one event (fields of :class:`ProgressEvent` except source and
        seq); returns it with its seq, or None when dropped because full."""
        with self._lock:
            kind = fields.get("kind", "progress")
            count = len(self._pending)
            if (kind == "progress" and count >= self.max_events) or (
                    kind == "log" and count >= 2 * self.max_events):
                self.metrics.inc("agent_spool_dropped_total", reason="full", kind=kind)
                return None
            fields.setdefault("at", time.time())
            event = ProgressEvent(source=self.source, seq=self._next, **fields).validate()
            event.seq = self._take_seq()
            data = json.dumps(event.to_dict(), separators=(",", ":")).encode()
            write_durably(self.events_dir / f"{event.seq:016d}.json", data)
            self._journal(data)           # before the sender can see (and ack) it
            self._pending.append(event.seq)
            self.metrics.inc("agent_spool_appended_total", kind=kind)
            self._changed.notify_all()
            return event

    def _journal(self, data: bytes) -> None:
        path = self.dir / "journal.jsonl"
        try:
            if path.exists() and path.stat().st_size + len(data) > JOURNAL_MAX:
                self.metrics.inc("agent_journal_skipped_total")
                return
            with path.open("ab") as fh:
                fh.write(data + b"\n")
        except OSError as exc:
            log.warning("spool journal: %s", exc)

    def journal(self) -> list[dict[str, Any]]:
        """Every event spooled so far (oldest first), from the journal."""
        try:
            lines = (self.dir / "journal.jsonl").read_bytes()[:JOURNAL_MAX].splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue        # a line cut by a crash
        return out

    def pending(self, limit: int = 500) -> list[dict[str, Any]]:
        """The oldest pending events, in seq order, as dicts ready to send.
        An unreadable event file is set aside (``*.bad``) and counted."""
        with self._lock:
            seqs = list(self._pending[:limit])
        out = []
        for seq in seqs:
            path = self.events_dir / f"{seq:016d}.json"
            try:
                raw = path.read_bytes()[:EVENT_FILE_MAX]
                event = ProgressEvent.from_dict(json.loads(raw)).to_dict()
            except FileNotFoundError:
                continue                        # acked meanwhile
            except (OSError, ValueError, ValidationError) as exc:
                log.error("spool: event %s unreadable (%s); set aside", path.name, exc)
                self.metrics.inc("agent_spool_dropped_total", reason="corrupt", kind="unknown")
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                self._forget([seq])
                continue
            out.append(event)
        return out

    def ack(self, event_ids: list[str]) -> int:
        """Remove the acknowledged events (``"agent:SEQ"``); returns how many."""
        seqs: list[int] = []
        for ident in event_ids:
            source, _, number = str(ident).partition(":")
            if source == self.source and number.isdigit():
                seqs.append(int(number))
        removed = []
        for seq in seqs:
            try:
                (self.events_dir / f"{seq:016d}.json").unlink()
                removed.append(seq)
            except FileNotFoundError:
                pass
        if removed:
            _fsync_dir(self.events_dir)
        self._forget(removed)
        return len(removed)

    def drop(self, event_ids: list[str], reason: str) -> int:
        """Remove events the node refused for good (counted with the reason)."""
        n = self.ack(event_ids)
        if n:
            self.metrics.inc("agent_spool_dropped_total", n, reason=reason, kind="any")
        return n

    def _forget(self, seqs: list[int]) -> None:
        if not seqs:
            return
        gone = set(seqs)
        with self._lock:
            self._pending = [s for s in self._pending if s not in gone]
            self._changed.notify_all()

    def wait_changed(self, timeout: float) -> None:
        """Block until an event is appended or acked, or ``timeout`` passes."""
        with self._lock:
            self._changed.wait(timeout)

    def wait_empty(self, timeout: float) -> bool:
        """Block until nothing is pending; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 1.0))
            return True

    # -- token and checkpoints
    def save_token(self, token: str) -> None:
        write_durably(self.dir / "token", token.encode(), 0o600)

    def load_token(self) -> str | None:
        try:
            text = (self.dir / "token").read_text().strip()
        except OSError:
            return None
        return text or None

    def load_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.dir / "state.json").read_bytes()[:EVENT_FILE_MAX])
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_durably(self.dir / "state.json", json.dumps(state).encode())
