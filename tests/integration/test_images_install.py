"""A task for a managed image waits for its node's copy and then installs
(issue #25): the real regional node and the real agent (``--target`` a
file), on a real etcd.  The image is a managed record whose bytes come
from a slow loopback mirror, so the task is approved while the node is
still fetching: the agent is told to wait (nothing is written), the
node's boot script says why, and once the copy is verified the agent
installs it, the sha256 checked while writing, and the first-boot
callback completes the task."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from lpmos.images import ImageFile, ManagedImage, NodeImageState
from lpmos.models import Task
from lpmos.store.keys import Keys
from tests.integration.test_agent_node import (
    IDC,
    Lab,
    check_events_exactly_once,
    check_installed,
    complete_with_callback,
)
from tests.integration.test_image_sync import ImageSource
from tests.unit.test_agent_install import needs_tools

pytestmark = [needs_tools, pytest.mark.slow]

NAME = "golden-lab"


@pytest.fixture
def lab(tmp_path: Path, etcd_server: object, keys: Keys) -> Iterator[Lab]:
    lab = Lab(tmp_path, etcd_server.url, keys)  # type: ignore[attr-defined]
    lab.node.start()
    try:
        yield lab
    finally:
        lab.close()


def copy_state(lab: Lab) -> NodeImageState | None:
    kv = lab.store.get(lab.keys.node_image(IDC, "n1", NAME))
    return NodeImageState.from_json(kv.value) if kv is not None else None


def test_a_task_waits_for_its_managed_image_then_installs(lab: Lab) -> None:
    data = lab.image.read_bytes()
    source = ImageSource()
    source.files["/golden-lab.img"] = data
    source.rate["/golden-lab.img"] = len(data) // 4          # about 4 s to fetch
    try:
        record = ManagedImage(
            name=NAME, os_type="Golden Lab", os_family="lab", format="raw",
            files={"disk_image": ImageFile(source.url("/golden-lab.img"),
                                           hashlib.sha256(data).hexdigest(), len(data))},
            source="url", state="available", created_at=time.time(), created_by="test")
        lab.store.put(lab.keys.image(NAME), record.to_json())
        lab.tasks.create(Task(idc=IDC, sn=lab.sn, mac=lab.mac, os_type="Golden Lab",
                              image=NAME), by="test")
        lab.tasks.transition(IDC, lab.sn, "approved", by="test")
        lab.start_agent()
        deadline = time.monotonic() + 20
        while (copy_state(lab) is None or copy_state(lab).state != "fetching")\
                and time.monotonic() < deadline:                      # type: ignore[union-attr]
            time.sleep(0.05)
        fetching = copy_state(lab)
        assert fetching is not None and fetching.state == "fetching", lab.logs()
        # while the node fetches: the machine's boot script waits and says why, the agent
        # writes nothing and the task stays approved
        with urllib.request.urlopen(f"http://127.0.0.1:{lab.node.port}/boot/{lab.mac}.ipxe?serial={lab.sn}",
                                    timeout=5) as resp:
            script = resp.read().decode()
        assert f"image {NAME} fetching on node n1" in script, script
        time.sleep(1.0)
        assert not lab.target.exists() or lab.target.stat().st_size == 0
        assert lab.task().status == "approved"
        # the copy is verified, then the agent installs it
        assert lab.wait_agent() == 0, lab.logs()
        ready = copy_state(lab)
        assert ready is not None and ready.state == "ready"
        check_installed(lab)
        check_events_exactly_once(lab)
        assert lab.task().image == NAME
        complete_with_callback(lab)
        assert all(path.startswith("/golden-lab.img") for path, _ in source.seen)
    finally:
        source.close()
