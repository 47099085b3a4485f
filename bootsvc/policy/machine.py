"""What a boot decision is made from: the node's record of one machine."""

from __future__ import annotations

from dataclasses import dataclass

from lpmos.models import Server, Task


@dataclass(frozen=True)
class MachineView:
    """What the node knows of one machine: its task (with the revision it was
    read at) and its server record."""

    sn: str
    task: Task | None = None
    task_revision: int = 0
    server: Server | None = None
