"""One machine's install as an operator drives it through the control-plane
API, in steps the lab tests share: :func:`discover` (the live image's agent
registered, its inventory in the API), :func:`create_and_approve` and
:func:`watch_install` (installing, the image written, the machine's own
disk booted, its first-boot callback, ``succeeded``).  A stage that does
not come in time fails with the VM's serial console (:class:`lab.vm.VM`)."""

from __future__ import annotations

from typing import Any

from lab.runner import VM, LabError, http_json

#: Generous per-stage budgets (seconds) for 2 shared cores under TCG; the
#: measured times are in docs/lab.md.
BUDGET = {"agent": 300, "discovered": 180, "installing": 240, "rebooting": 300,
          "disk-boot": 300, "succeeded": 180}


def api(cp: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    return http_json(method, cp + path, body, token=token, timeout=15)


def discover(vm: VM, cp: str, operator: str) -> dict[str, Any]:
    """Wait for the agent and the machine's inventory in the API (checked
    against the VM); returns the inventory."""
    vm.wait_for("agent", BUDGET["agent"])

    def server() -> Any:
        status, body = api(cp, "GET", f"/api/v1/servers/dc1/{vm.serial}", operator)
        return body if status == 200 and body["server"].get("inventory") else None

    found = vm.wait_until("discovery (server with inventory in the API)", BUDGET["discovered"],
                          server)
    inventory: dict[str, Any] = found["server"]["inventory"]
    vm.mark("discovered", f"inventory: {len(inventory.get('disks', []))} disks, "
                          f"{len(inventory.get('nics', []))} NICs")
    assert inventory["system"]["serial"] == vm.serial
    assert inventory["firmware"]["mode"] == vm.firmware
    assert vm.mac in [n["mac"] for n in inventory["nics"]]
    assert any(d["name"] == "vda" and d["size_bytes"] == 2 << 30 for d in inventory["disks"])
    return inventory


def create_and_approve(vm: VM, cp: str, operator: str, approver: str,
                       **fields: Any) -> dict[str, Any]:
    """Create the lab OS task (``fields`` added to the body, e.g.
    ``not_before``) and approve it; returns the approval's answer."""
    status, body = api(cp, "POST", "/api/v1/tasks", operator, {
        "idc": "dc1", "sn": vm.serial, "mac": vm.mac, "os_type": "LPMOS lab OS",
        "image": "lab-os", "notes": "lab e2e", **fields})
    assert status == 201, body
    vm.mark("task-created", "pending")
    status, body = api(cp, "POST", f"/api/v1/tasks/dc1/{vm.serial}/approve", approver,
                       {"notes": "lab e2e"})
    assert status == 200, body
    vm.mark("approved", f"revision {body['revision']}")
    return dict(body)


def watch_install(vm: VM, cp: str, operator: str) -> dict[str, Any]:
    """From an approval (or a redeploy) to ``succeeded``: the task
    installing, the image written (step ``rebooting``), the VM's console
    showing its own disk's OS and the first-boot callback.  Returns
    ``{"task": the succeeded task, "percents": progress seen}``."""
    seen: dict[str, Any] = {}

    def task_status(wanted: tuple[str, ...], step: str | None = None) -> Any:
        status, body = api(cp, "GET", f"/api/v1/tasks/dc1/{vm.serial}", operator)
        if status != 200:
            return None
        task = body["task"]
        progress = task.get("progress") or {}
        seen.setdefault("percents", set()).add(progress.get("percent"))
        if task["status"] == "failed":
            raise LabError(f"{vm.name}: task failed: {task.get('reason')}\n{vm.describe()}")
        if task["status"] in wanted and (step is None or progress.get("step") == step):
            return task
        return None

    task = vm.wait_until("task installing", BUDGET["installing"],
                         lambda: task_status(("installing",)))
    vm.mark("installing", f"{task['progress'].get('step')} {task['progress'].get('percent')}%")

    def rebooting() -> Any:
        task = task_status(("installing", "succeeded"))
        if task and (task["progress"].get("step") == "rebooting"
                     or task["status"] == "succeeded"):
            return task
        return None

    task = vm.wait_until("image written (step rebooting)", BUDGET["rebooting"], rebooting)
    vm.mark("rebooting", f"{task['progress'].get('percent')}%")
    vm.wait_for("disk-boot", BUDGET["disk-boot"])
    vm.wait_for("callback", BUDGET["succeeded"])
    task = vm.wait_until("task succeeded", BUDGET["succeeded"],
                         lambda: task_status(("succeeded",)))
    vm.mark("succeeded", f"attempt {task['attempt']}")
    return {"task": task, "percents": sorted(p for p in seen["percents"] if p is not None)}
