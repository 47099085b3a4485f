"""Running the lab's tools and stopping the processes it started.

:func:`run` runs a short command (``ip``, ``curl``) with a deadline and turns
a missing tool or a failure into :class:`LabError`; :func:`stop` ends a
child started with ``start_new_session`` by its process group, SIGTERM
first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence


class LabError(RuntimeError):
    """The lab could not be set up, or a stage did not arrive in time."""


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """``cmd``'s completed process (text output captured); with ``check`` a
    non-zero exit raises :class:`LabError` with the start of its stderr."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input_text, check=False)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found: run 'scripts/setup.sh system'") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done


def stop(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> None:
    """SIGTERM our child's process group (started with start_new_session),
    SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
