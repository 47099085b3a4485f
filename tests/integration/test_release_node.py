"""Release end to end through the REAL regional node (``lpmos regional
--services http`` in its own process, on a real etcd) and the REAL agent
(``lpmos agent`` in its own process) wiping a real loop device: the task
moves releasing → released from the agent's own report, the log names what
was done to the disk, the disk has no signature or partition table left, and
the node queues the BMC's power-off once, audited as the node's."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lpmos.power import BmcRecord, PowerRequest
from lpmos.store.keys import Keys
from tests.integration.test_agent_node import IDC, Lab, lab
from tests.integration.test_release_wipe import loop_disk, pytestmark, sh

__all__ = ["lab", "loop_disk", "pytestmark"]


def test_release_wipes_the_disk_and_ends_released(lab: Lab, loop_disk: tuple[Path, Path],
                                                  keys: Keys) -> None:
    device, _backing = loop_disk
    assert "ext4" in sh("blkid", f"{device}p1").stdout
    lab.add_task()
    for status in ("booting", "succeeded"):
        lab.tasks.transition(IDC, lab.sn, status, by="node:n1")
    record = BmcRecord(idc=IDC, sn=lab.sn, driver="redfish", address="192.0.2.30", user="root",
                       has_password=True)
    lab.store.put(keys.bmc(IDC, lab.sn), record.to_json())
    lab.tasks.transition(IDC, lab.sn, "releasing", by="approver1", reason="decommission")
    lab.target = device
    lab.start_agent()
    assert lab.wait_agent(120) == 0, lab.logs()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and lab.task().status != "released":
        time.sleep(0.2)
    task = lab.task()
    assert task.status == "released", (task.status, task.logs, lab.logs())
    assert (task.attempt, task.claimed_by, task.attempt_nodes[str(task.attempt)]) == (2, "n1", "n1")
    assert any(line.startswith(f"[agent] wiping: {device}: wiped: wipefs on 2 partition(s), "
                               "wipefs on the disk, sgdisk --zap-all, blkdiscard")
               for line in task.logs), task.logs
    assert "release: node n1 has the live agent wipe the disks" in task.logs
    assert sh("wipefs", "--no-act", "--all", str(device)).stdout == ""
    assert sh("blkid", "-p", str(device)).returncode != 0
    # the node queued the BMC's power-off, once, in its own name
    offs = [PowerRequest.from_json(kv.value)
            for kv in lab.store.range(keys.power_requests(IDC, lab.sn)).items]
    assert [(r.action, r.task_attempt, r.created_by) for r in offs] == [("off", 2, "node:n1")]
    audit = [json.loads(kv.value) for kv in lab.store.range(keys.audit_prefix()).items]
    assert any(a["action"] == "power.request" and a["target"] == f"{IDC}/{lab.sn}"
               and a["after"]["id"] == offs[0].id for a in audit)
