"""Process liveness, read from the kernel (Linux ``/proc``)."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited.

    A zombie (exited, not yet reaped by its parent) counts as dead: it runs
    nothing and holds nothing, so a lock or registration it left is free.
    Another user's process that signals cannot reach exists; its state is
    read when ``/proc`` shows it and it counts as alive when it does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        unreadable_means = True       # it exists; /proc may hide another user's
    else:
        unreadable_means = False      # it exited between the two looks
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return unreadable_means
    # the state follows the command name, which may hold spaces and ")"
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
