"""When a task may start: its ``not_before`` time and its maintenance window
(issue #21), as pure functions of the schedule and a clock the caller passes.

The model an operator sets, both optional, both in UTC:

* ``not_before`` — an instant, given as ISO 8601 with a time zone
  (``2026-12-04T22:00:00Z``, ``2026-12-05T00:00+02:00``); stored as epoch
  seconds (``0``: none).  A time without a zone is refused: a schedule that
  means one thing in Berlin and another in Tokyo is not a schedule.
* ``window`` — a daily maintenance window ``HH:MM-HH:MM`` in UTC
  (``22:00-04:00`` crosses midnight: from 22:00 to 04:00 the next morning);
  stored in that canonical form (``""``: none).  Start and end must differ.

A task may *start* (its power cycle be carried out, its machine be claimed
for install) at an instant ``t`` when ``t >= not_before`` and ``t`` lies in
the window.  Only the start is scheduled: an install that began inside the
window finishes even if the window closes meanwhile.

:func:`decide_start` is the one rule; the boot decision
(:mod:`bootsvc.policy.script`), the install claim (:mod:`bootsvc.policy.claim`),
the power worker's claim (:func:`lpmos.power.decide_claim`) and the reaper
(:mod:`bootsvc.policy.reaping`) call it.  Stdlib only (the models import it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

DAY = 86400
#: the instants a not_before may name (a typo such as year 20226 is refused)
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
LATEST = datetime(2100, 1, 1, tzinfo=UTC).timestamp()

_WINDOW_RE = re.compile(r"\s*([0-9]{1,2}):([0-9]{2})\s*-\s*([0-9]{1,2}):([0-9]{2})\s*")
_ISO_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
                     r"(Z|[+-][0-9]{2}:?[0-9]{2})")


class ScheduleError(ValueError):
    """A schedule value that cannot be used; ``field`` names it, ``str()`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_not_before(value: object) -> float:
    """Epoch seconds of an ISO 8601 instant with a zone; ``None``/``""``/``0``
    is "none" (``0.0``).  A number is taken as epoch seconds (the stored
    form, as a task read back carries it)."""
    if value is None or value == "" or value == 0:
        return 0.0
    if isinstance(value, bool):
        raise ScheduleError("not_before", "an ISO 8601 time such as 2026-12-04T22:00:00Z")
    if isinstance(value, int | float):
        stamp = float(value)
    elif isinstance(value, str):
        text = value.strip(" ")
        if len(text) > 40 or not _ISO_RE.fullmatch(text):
            raise ScheduleError("not_before", f"{value[:40]!r} is not an ISO 8601 time with a "
                                "time zone, such as 2026-12-04T22:00:00Z or "
                                "2026-12-04T23:00+01:00")
        try:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError as exc:
            raise ScheduleError("not_before", f"{text!r}: {exc}") from None
    else:
        raise ScheduleError("not_before", "an ISO 8601 time such as 2026-12-04T22:00:00Z")
    if not EARLIEST <= stamp < LATEST:
        raise ScheduleError("not_before", "a time between 2000 and 2100")
    return stamp


def parse_window(value: object) -> str:
    """The canonical ``HH:MM-HH:MM`` of a daily UTC window; ``None``/``""``
    is "none" (``""``)."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or len(value) > 40:
        raise ScheduleError("window", "a daily UTC window HH:MM-HH:MM such as 22:00-04:00")
    found = _WINDOW_RE.fullmatch(value)
    if found is None:
        raise ScheduleError("window", f"{value!r} is not HH:MM-HH:MM (a daily UTC window "
                            "such as 22:00-04:00)")
    sh, sm, eh, em = (int(g) for g in found.groups())
    if sh > 23 or eh > 23 or sm > 59 or em > 59:
        raise ScheduleError("window", f"{value!r}: hours 00-23, minutes 00-59")
    if (sh, sm) == (eh, em):
        raise ScheduleError("window", f"{value!r}: the end must differ from the start (a "
                            "window of the whole day is no window: leave it out)")
    return f"{sh:02d}:{sm:02d}-{eh:02d}:{em:02d}"


def _bounds(window: str) -> tuple[int, int]:
    """The window's start and length in seconds after midnight UTC."""
    start_text, end_text = window.split("-")
    start = int(start_text[:2]) * 3600 + int(start_text[3:]) * 60
    end = int(end_text[:2]) * 3600 + int(end_text[3:]) * 60
    return start, (end - start) % DAY


def window_opening(window: str, at: float) -> tuple[float, float]:
    """The occurrence of ``window`` that contains ``at`` or, when ``at`` lies
    outside it, the next one: ``(opens, closes)`` in epoch seconds."""
    start, length = _bounds(window)
    midnight = at - at % DAY
    for day in (-1, 0, 1):
        opens = midnight + day * DAY + start
        if at < opens + length:
            return opens, opens + length
    raise AssertionError("unreachable: one of three days holds the next opening")


def next_start(not_before: float, window: str, at: float) -> float:
    """The earliest instant at or after ``at`` at which the task may start."""
    t = max(at, not_before)
    if not window:
        return t
    opens, _closes = window_opening(window, t)
    return max(t, opens)


def format_time(stamp: float) -> str:
    """``2026-12-04 22:00 UTC`` (seconds shown only when not zero)."""
    moment = datetime.fromtimestamp(stamp, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC" if moment.second else "%Y-%m-%d %H:%M UTC")


def iso_time(stamp: float) -> str:
    """``2026-12-04T22:00:00Z``, the form the API takes and returns ("" for 0)."""
    if not stamp:
        return ""
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StartDecision:
    """``start``: the task may start now.  Otherwise ``at`` is the next
    instant it may, and ``reason`` says why it waits, in absolute times
    only (a boot script rendered from it stays the same while it waits)."""

    start: bool
    at: float
    reason: str = ""


def decide_start(not_before: float, window: str, now: float) -> StartDecision:
    """May a task with this schedule start at ``now``?  Pure."""
    at = next_start(not_before, window, now)
    if at <= now:
        return StartDecision(True, now)
    parts = []
    if not_before > now:
        parts.append(f"not before {format_time(not_before)}")
    if window:
        parts.append(f"maintenance window {window} UTC daily")
    return StartDecision(False, at, f"scheduled: {', '.join(parts)}; starts at "
                                    f"{format_time(at)}")


def describe(not_before: float, window: str) -> str:
    """The schedule in words, for a log line or the CLI ("" when none)."""
    parts = []
    if not_before:
        parts.append(f"not before {format_time(not_before)}")
    if window:
        parts.append(f"window {window} UTC daily")
    return ", ".join(parts)
