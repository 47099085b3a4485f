"""The full install log of each attempt of each machine, on the node that received it.

The task document keeps only the newest ``LOG_LINES_KEPT`` lines (design
brief: "the full log lives with the regional node that received it and is
fetched on demand").  This node appends every log line of the progress
events it stores (:class:`bootsvc.state.events.EventPipeline`, after etcd took
them, also when they come from the spool) to a file of its own, and serves
it to the control plane (:mod:`bootsvc.http.node_api`).

Contract:

* Layout: ``STATE_DIR/logs/<node>/<sn>/<attempt>.log`` and, once rotated,
  ``<attempt>.log.1`` (the part before).  JSON lines: a header
  ``{"part": P, "first_line": L}`` (``L`` lines of the attempt came before
  this part), then ``{"id": "source:seq", "at": node time, "line": text}``.
* Dedup: per attempt and event source, the highest ``seq`` written is
  remembered (recovered from the files after a restart); an event at or
  below it adds nothing, so replayed or resent events never duplicate
  lines, even when etcd already had them (a lost ack).  Lines are written
  only after etcd stored the events, never for an event etcd refused.
* Bounds: the current part is rotated to ``.log.1`` when it would pass
  half of ``install_log.max_bytes``, replacing (dropping) the older ``.1``,
  so one attempt holds at most about ``max_bytes`` on disk; a reader learns
  from ``first_line`` how many lines were dropped.  A machine keeps the
  newest ``install_log.attempts`` attempts; older ones are deleted when a
  new one starts.  Lines are already bounded by
  :func:`lpmos.models.clean_message`.
* Failures here (disk full) are counted and logged, never passed to the
  event path: the events are stored in etcd either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpmos.config import Setting, int_range
from lpmos.metrics import Registry
from lpmos.models import ProgressEvent, ValidationError, validate_sn

log = logging.getLogger(__name__)

SETTINGS: tuple[Setting, ...] = (
    Setting("install_log.max_bytes", "--install-log-max-bytes", 8 * 1024 * 1024,
            int_range(64 * 1024, 1024 * 1024 * 1024),
            "bytes of full install log this node keeps per attempt of a machine; past it "
            "the oldest half is dropped (the task document keeps the newest 200 lines)",
            metavar="BYTES"),
    Setting("install_log.attempts", "--install-log-attempts", 5, int_range(1, 1000),
            "attempts per machine whose full install log this node keeps; older ones are "
            "deleted when a new one starts", metavar="N"),
)

#: attempts whose dedup state stays in memory (reloaded from disk past it)
STATES_CACHED = 4096

_FILE_RE = re.compile(r"(\d{1,9})\.log(\.1)?")


@dataclass(frozen=True)
class InstallLog:
    """One attempt's log as kept: ``lines`` oldest first; ``first_line``
    lines of the attempt were dropped before them (the size bound)."""

    sn: str
    attempt: int
    first_line: int
    lines: list[str]

    @property
    def truncated(self) -> bool:
        return self.first_line > 0


@dataclass
class _Attempt:
    seqs: dict[str, int] = field(default_factory=dict)   # highest seq written per source
    part: int = 0              # part number of the current file
    first_line: int = 0        # lines of the attempt before the current file
    lines: int = 0             # lines in the current file
    size: int = 0              # bytes of the current file (0: not written yet)


class InstallLogs:
    def __init__(self, root: Path, metrics: Registry, *, max_bytes: int = 8 * 1024 * 1024,
                 attempts_kept: int = 5) -> None:
        self.root = Path(root)
        self.metrics = metrics
        self.half = max(4096, max_bytes // 2)
        self.attempts_kept = max(1, attempts_kept)
        self._lock = threading.Lock()
        self._states: dict[tuple[str, int], _Attempt] = {}
        metrics.describe("install_log_lines_total", "install log lines this node appended")
        metrics.describe("install_log_rotations_total",
                         "install log parts rotated (each past the first drops the oldest)")
        metrics.describe("install_log_errors_total", "install log writes that failed")

    def _dir(self, sn: str) -> Path:
        return self.root / validate_sn(sn)

    def _paths(self, sn: str, attempt: int) -> tuple[Path, Path]:
        base = self._dir(sn) / f"{int(attempt)}.log"
        return base, base.with_name(base.name + ".1")

    # -- appending (the event pipeline, after etcd stored the events) -------------

    def append(self, sn: str, attempt: int, events: Iterable[ProgressEvent]) -> int:
        """Append the log lines of ``events`` not written before to attempt
        ``attempt`` of ``sn``; how many.  Never raises for I/O."""
        try:
            with self._lock:
                return self._append(sn, attempt, events)
        except (OSError, ValidationError, ValueError) as exc:
            self.metrics.inc("install_log_errors_total")
            log.warning("install log of %s attempt %s: %s", sn, attempt, exc)
            with self._lock:
                self._states.pop((sn, attempt), None)     # reload from disk next time
            return 0

    def _append(self, sn: str, attempt: int, events: Iterable[ProgressEvent]) -> int:
        st = self._state(sn, attempt)
        if st is None:          # an attempt older than the ones kept
            return 0
        at = round(time.time(), 3)
        records: list[bytes] = []
        for ev in sorted(events, key=lambda e: (e.source, e.seq)):
            if ev.seq <= st.seqs.get(ev.source, -1):
                continue
            st.seqs[ev.source] = ev.seq
            line = ev.log_line()
            if line:
                records.append(json.dumps({"id": ev.event_id, "at": at, "line": line},
                                          separators=(",", ":")).encode() + b"\n")
        if not records:
            return 0
        current, previous = self._paths(sn, attempt)
        pending = bytearray()
        count = 0
        for rec in records:
            size = st.size or len(self._header(st))      # a new part starts with its header
            if (st.lines or count) and size + len(pending) + len(rec) > self.half:
                self._write(current, st, bytes(pending), count)
                pending, count = bytearray(), 0
                os.replace(current, previous)           # the older .1, if any, is dropped
                st.first_line += st.lines
                st.part += 1
                st.lines = st.size = 0
                self.metrics.inc("install_log_rotations_total")
            pending += rec
            count += 1
        self._write(current, st, bytes(pending), count)
        self.metrics.inc("install_log_lines_total", len(records))
        return len(records)

    @staticmethod
    def _header(st: _Attempt) -> bytes:
        return json.dumps({"part": st.part, "first_line": st.first_line},
                          separators=(",", ":")).encode() + b"\n"

    def _write(self, path: Path, st: _Attempt, data: bytes, count: int) -> None:
        if not data:
            return
        if st.size == 0:
            data = self._header(st) + data
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        st.size += len(data)
        st.lines += count

    def _state(self, sn: str, attempt: int) -> _Attempt | None:
        st = self._states.get((sn, attempt))
        if st is not None:
            return st
        current, previous = self._paths(sn, attempt)
        if not current.exists() and not previous.exists():
            if not self._make_room(sn, attempt):
                return None
            st = _Attempt()
        else:
            st = self._load(current, previous)
        if len(self._states) >= STATES_CACHED:
            self._states.clear()
        self._states[(sn, attempt)] = st
        return st

    def _make_room(self, sn: str, attempt: int) -> bool:
        """A new attempt starts: keep the newest ``attempts_kept`` (this one
        included); False if this one is older than all of those."""
        folder = self._dir(sn)
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[int, list[Path]] = {}
        for entry in folder.iterdir():
            m = _FILE_RE.fullmatch(entry.name)
            if m:
                files.setdefault(int(m.group(1)), []).append(entry)
        kept = sorted({*files, attempt})[-self.attempts_kept:]
        for number, paths in files.items():
            if number not in kept:
                for path in paths:
                    path.unlink(missing_ok=True)
                self._states.pop((sn, number), None)
        return attempt in kept

    def _load(self, current: Path, previous: Path) -> _Attempt:
        st = _Attempt()
        for path in (previous, current):
            header, records = _read(path)
            for rec in records:
                source, _, seq = str(rec.get("id", "")).rpartition(":")
                if seq.isdigit():
                    st.seqs[source] = max(st.seqs.get(source, -1), int(seq))
            if path is current and header is not None:
                st.part = int(header.get("part", 0))
                st.first_line = int(header.get("first_line", 0))
                st.lines = len(records)
                st.size = path.stat().st_size
            elif path is previous and header is not None and not current.exists():
                # rotated, nothing written since: the next write starts the next part
                st.part = int(header.get("part", 0)) + 1
                st.first_line = int(header.get("first_line", 0)) + len(records)
        return st

    # -- reading (the node API) --------------------------------------------------------

    def read(self, sn: str, attempt: int) -> InstallLog | None:
        """Attempt ``attempt`` of ``sn`` as kept, or ``None`` if this node has
        none.  ``ValidationError`` for a malformed SN."""
        current, previous = self._paths(sn, attempt)
        with self._lock:
            parts = [_read(p) for p in (previous, current)]
        parts = [(h, r) for h, r in parts if h is not None]
        if not parts:
            return None
        first = int(parts[0][0].get("first_line", 0)) if parts[0][0] else 0
        lines = [str(rec.get("line", "")) for _h, records in parts for rec in records]
        return InstallLog(sn, attempt, first, lines)


def _read(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A part's header and records; ``(None, [])`` if it does not exist.  A
    torn last line (a crash mid-write) and foreign lines are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, []
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    for i, raw in enumerate(data.splitlines()):
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        if i == 0 and "part" in item:
            header = item
        elif "line" in item:
            records.append(item)
    return header if header is not None else {}, records


def open_install_logs(config: Any, state_dir: Path, node: str,
                      metrics: Registry) -> InstallLogs:
    """The node's install logs at ``STATE_DIR/logs/<node>`` with the
    ``install_log.*`` settings of ``config`` (their defaults when absent)."""
    defaults = {s.key: s.default for s in SETTINGS}

    def value(key: str) -> int:
        return int(config.get(key, defaults[key]))

    return InstallLogs(Path(state_dir) / "logs" / node, metrics,
                       max_bytes=value("install_log.max_bytes"),
                       attempts_kept=value("install_log.attempts"))
