"""Hands-off provisioning on libvirt machines behind real BMC emulators
(issue #21): nobody presses a power button.

Two libvirt TCG domains (SeaBIOS, the virtio NIC's iPXE ROM, a blank 2 GiB
disk; :class:`tests.power_lab.Machine` on their boot orders) sit on the
QEMU lab's segment (:class:`lab.runner.Lab`: the real ``lpmos regional``,
dnsmasq as the site's DHCP server), the first behind sushy-tools (Redfish),
the second behind virtualbmc (IPMI) (:class:`tests.power_lab.PowerLab`, its
libvirtd in the lab's namespace).  Only the product's API and CLI are used:

* ``rf`` (Redfish, through the API; it boots its disk alone, as a machine
  with an OS does): BMC record set; PXE once and power on (it is off, and
  its blank disk would boot nothing); the live image registers
  it (discovery); a task is created and approved, and the node's power
  worker sets PXE and power-cycles it (the discovery boot's agent waits for
  that cycle rather than start an install it would cut off); it installs
  the lab OS from the network boot after the cycle, reboots to
  its disk and calls back; redeploy: a new attempt installs again, the
  history kept; release: the agent wipes the disk, the node has the BMC
  power it off, and the disk image holds no partition table or signature.
* ``ipmi`` (IPMI, through the CLI, side by side; network first, then disk):
  BMC record, power on, discovery, then a task whose ``not_before`` is a few seconds
  after its approval: the running power worker cycles it only after that
  time (the request's step and libvirt's own reset event both at or after
  it), then it installs and boots its disk.

libvirt's timestamped domain events (``virsh event``) show every start,
reset and stop the BMCs caused, from the hypervisor's side.
"""

from __future__ import annotations

import concurrent.futures
import pwd
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab.runner import REPO, VM, Lab, LabError, control_plane
from lpmos.schedule import iso_time
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host
from tests.lab.flow import BUDGET, api, create_and_approve, discover, watch_install
from tests.power_lab import LAB_USER, Domain, LabUnavailable, Machine, PowerLab, lpmos_cli

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(1200)]

#: seconds from the IPMI machine's approval to its not_before
SCHEDULE_AHEAD = 15.0


@dataclass
class Bench:
    lab: Lab
    power: PowerLab
    cp: str
    tokens: dict[str, str]

    @property
    def operator(self) -> str:
        return self.tokens["operator"]

    @property
    def approver(self) -> str:
        return self.tokens["approver"]

    def machine(self, name: str, index: int, *, ipmi: bool) -> tuple[Domain, VM]:
        """A domain on a new tap of the lab's bridge, off, and the timeline of its
        serial console."""
        tap = self.lab.add_tap(user=pwd.getpwnam(LAB_USER).pw_uid)
        # in the power lab's directory: the lab user's QEMU cannot enter pytest's
        machine = Machine(tap, self.lab.mac(index), f"LAB-BMC-{index:02d}",
                          self.power.root / "vms" / name,
                          boot=("network", "hd") if ipmi else ("hd",))
        dom = self.power.define(ipmi=ipmi, machine=machine)
        vm = VM(name, "bios", machine.mac, machine.serial, dom.uuid, machine.workdir,
                started=time.monotonic())
        vm.watch_console()
        return dom, vm

    def request(self, vm: VM, ident: str, timeout: float = 120.0) -> dict[str, Any]:
        """Power request ``ident`` once finished (done or failed)."""
        def final() -> Any:
            status, body = api(self.cp, "GET", f"/api/v1/servers/dc1/{vm.serial}/power/"
                               f"{ident}?fresh=1", self.operator)
            assert status == 200, body
            req = body["request"]
            return req if req["state"] in ("done", "failed") else None

        req: dict[str, Any] = vm.wait_until(f"power request {ident} finished", timeout, final,
                                            interval=0.5)
        return req

    def requests(self, vm: VM) -> list[dict[str, Any]]:
        status, body = api(self.cp, "GET", f"/api/v1/servers/dc1/{vm.serial}/power",
                           self.operator)
        assert status == 200, body
        return list(body["items"])

    def task(self, vm: VM) -> dict[str, Any]:
        status, body = api(self.cp, "GET", f"/api/v1/tasks/dc1/{vm.serial}?fresh=1",
                           self.operator)
        assert status == 200, body
        return dict(body["task"])

    def cli(self, role: str, *args: str, stdin: str | None = None) -> str:
        """``lpmos ARGS`` as an operator types it; its standard output."""
        done = lpmos_cli(self.cp, self.tokens[role], *args, stdin=stdin)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout


def pinned_catalog(into: Path) -> Path:
    """The image catalog with this run's copy of the live image and the lab
    OS: the test installs three times over minutes, and a rebuild meanwhile
    (``make -C images`` on the same machine) must not change the image under
    a node that checked its sha256 at the start."""
    images = REPO / "images"
    for name in ("live/vmlinuz", "live/initrd.img", "lab-os/lab-os.img",
                 "lab-os/lab-os.img.sha256"):
        (into / "build" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(images / "build" / name, into / "build" / name)
    shutil.copyfile(images / "catalog.toml", into / "catalog.toml")
    return into / "catalog.toml"


@pytest.fixture
def bench(lab_images: dict[str, Path], tmp_path: Path) -> Iterator[Bench]:
    require_lab_host()
    with Lab(tmp_path / "lab", catalog=pinned_catalog(tmp_path / "images")) as lab:
        try:
            power = PowerLab(netns=lab.ns, bmc_address=lab.host_ip).start()
        except LabUnavailable as exc:      # a blocker to report, not a skip to hide
            pytest.fail(f"the libvirt + BMC emulator lab cannot run here: {exc}")
        try:
            power.watch_events()
            tokens = lab.api_tokens(roles=("operator", "approver", "admin"))
            with control_plane(lab, port=free_port()) as cp:
                yield Bench(lab, power, cp, tokens)
        finally:
            power.close()


def lifecycle(power: PowerLab, dom: Domain, since: float = 0.0) -> list[str]:
    """libvirt's start/stop events of ``dom`` since ``since``: "Started",
    "Stopped Destroyed" (the BMC's hard off), "reboot" (a reset)."""
    out = []
    for e in power.events(dom):
        if e.at < since:
            continue
        if e.kind == "reboot" and (not out or out[-1] != "reboot"):
            out.append("reboot")            # libvirt reports one reset up to three times
        elif e.kind == "lifecycle" and e.detail.startswith(("Started", "Stopped")):
            out.append(e.detail.split()[0] if e.detail.startswith("Started") else e.detail)
    return out


def disk_signatures(path: Path) -> str:
    """What wipefs finds on a disk image ("" when nothing), and blkid's probe."""
    wipefs = subprocess.run(["wipefs", "--no-act", "--all", str(path)], capture_output=True,
                            text=True, timeout=30, check=False)
    blkid = subprocess.run(["blkid", "-p", str(path)], capture_output=True, text=True,
                           timeout=30, check=False)
    return (wipefs.stdout + blkid.stdout).strip()


def redfish_flow(b: Bench, dom: Domain, vm: VM, phases: list[VM]) -> dict[str, Any]:
    """Power on, discovery, install, redeploy and release of the Redfish machine."""
    sn, power = vm.serial, b.power
    status, body = api(b.cp, "PUT", f"/api/v1/servers/dc1/{sn}/bmc", b.tokens["admin"], {
        "driver": "redfish", "address": power.bmc_address, "port": power.sushy_port,
        "user": power.user, "password": power.password,
        "options": {"scheme": "http", "system": power.system_path(dom)}})
    assert status == 200, body
    assert power.state(dom) == "shut off"
    for action in ("pxe-once", "on"):
        status, body = api(b.cp, "POST", f"/api/v1/servers/dc1/{sn}/power", b.operator,
                           {"action": action})
        assert status == 202, body
        done = b.request(vm, body["request"]["id"])
        assert done["state"] == "done", (done["error"], done["steps"])
    vm.mark("powered-on", f"over Redfish by node {done['node']}")
    assert done["power_state"] == "on" and power.state(dom) == "running"
    discover(vm, b.cp, b.operator)

    # approve: the node's power worker sets PXE and power-cycles it
    approved_at = time.time()
    approval = create_and_approve(vm, b.cp, b.operator, b.approver)
    cycle = b.request(vm, approval["power_request"])
    assert cycle["state"] == "done" and cycle["action"] == "provision", cycle
    assert [(s["name"], s["state"]) for s in cycle["steps"]] == [("pxe-once", "done"),
                                                                  ("cycle", "done")]
    assert cycle["boot_override"] == "Pxe"
    vm.mark("power-cycled", f"{cycle['node']}: {cycle['describe']}")
    first = watch_install(vm, b.cp, b.operator)
    assert first["task"]["attempt"] == 1 and first["percents"]
    # the discovery boot's agent did not start the install the cycle would cut off:
    # the install was claimed (approved -> booting) after the cycle, by the network boot
    assert lifecycle(power, dom, approved_at)[:2] == ["Stopped Destroyed", "Started"], \
        lifecycle(power, dom)
    claimed = next(h["at"] for h in first["task"]["history"] if h["to_status"] == "booting")
    assert claimed > cycle["steps"][1]["at"], (claimed, cycle["steps"])
    assert "PTTYPE=\"gpt\"" in disk_signatures(dom.machine.disk)  # type: ignore[union-attr]

    # redeploy: a new attempt that installs again
    vm = vm.next_timeline()
    phases.append(vm)
    status, body = api(b.cp, "POST", f"/api/v1/tasks/dc1/{sn}/redeploy", b.approver,
                       {"notes": "lab redeploy"})
    assert status == 200, body
    assert b.request(vm, body["power_request"])["state"] == "done"
    vm.mark("redeploy", "power-cycled into PXE")
    again = watch_install(vm, b.cp, b.operator)
    assert again["task"]["attempt"] == 2
    moves = [(h["from_status"], h["to_status"]) for h in again["task"]["history"]]
    assert moves.count(("installing", "succeeded")) == 2, moves          # both kept
    assert ("succeeded", "approved") in moves and set(again["task"]["attempt_nodes"]) == \
        {"1", "2"}, again["task"]

    # release: wipe the disk, then the BMC powers it off
    vm = vm.next_timeline()
    phases.append(vm)
    status, body = api(b.cp, "POST", f"/api/v1/tasks/dc1/{sn}/release", b.approver,
                       {"notes": "lab release"})
    assert status == 200, body
    assert b.request(vm, body["power_request"])["state"] == "done"
    vm.mark("release", "power-cycled into PXE")
    vm.wait_for("agent", BUDGET["agent"])

    def released() -> Any:
        task = b.task(vm)
        if task["status"] == "failed":
            raise LabError(f"release failed: {task.get('reason')}\n{vm.describe()}")
        return task if task["status"] == "released" else None

    task = vm.wait_until("task released", 240, released)
    vm.mark("released", f"attempt {task['attempt']}")
    assert task["attempt"] == 3
    assert any("[agent] wiping: /dev/vda: wiped: wipefs" in line for line in task["logs"]), \
        task["logs"]

    def powered_off() -> Any:
        offs = [r for r in b.requests(vm) if r["action"] == "off" and r["task_attempt"] == 3]
        return offs[0] if offs and offs[0]["state"] in ("done", "failed") else None

    off = vm.wait_until("the BMC's power-off after the release", 60, powered_off)
    assert (off["state"], off["power_state"], off["created_by"]) == ("done", "off", "node:lab")
    vm.mark("off", off["describe"])
    assert power.state(dom) == "shut off"
    assert lifecycle(power, dom)[-1] == "Stopped Destroyed"        # the BMC's, not the OS's
    assert disk_signatures(dom.machine.disk) == ""                  # type: ignore[union-attr]
    return {"task": task, "events": lifecycle(power, dom)}


def ipmi_flow(b: Bench, dom: Domain, vm: VM) -> dict[str, Any]:
    """Power on, discovery and a scheduled install of the IPMI machine, through the CLI."""
    sn, power = vm.serial, b.power
    out = b.cli("admin", "server", "bmc-set", f"dc1/{sn}", "--driver", "ipmi", "--address",
                power.bmc_address, "--port", str(dom.ipmi_port), "--user", power.user,
                "--password-file", "-", stdin=power.password + "\n")
    assert power.password not in out
    assert power.state(dom) == "shut off"
    out = b.cli("operator", "server", "power", f"dc1/{sn}", "on", "--wait")
    assert "power on" in out, out
    vm.mark("powered-on", "over IPMI")
    assert power.state(dom) == "running"
    discover(vm, b.cp, b.operator)

    not_before = float(int(time.time() + SCHEDULE_AHEAD))
    approval = create_and_approve(vm, b.cp, b.operator, b.approver,
                                  not_before=iso_time(not_before))
    approved_at = time.time()
    assert approved_at < not_before, "the approval came after not_before: raise SCHEDULE_AHEAD"
    schedule = b.task(vm)["schedule"]
    assert schedule["waiting"] and "not before" in schedule["reason"], schedule
    cycle = b.request(vm, approval["power_request"], timeout=SCHEDULE_AHEAD + 60)
    assert cycle["state"] == "done", cycle
    assert cycle["not_before"] == not_before
    at = {s["name"]: s["at"] for s in cycle["steps"]}
    assert at["pxe-once"] >= not_before and at["cycle"] >= not_before, (at, not_before)
    # libvirt saw no reset before not_before, and one after it
    resets = [e.at for e in power.events(dom) if e.kind == "reboot" and e.at >= approved_at]
    assert resets and min(resets) >= not_before, (resets, not_before)
    vm.mark("power-cycled", f"{cycle['node']}: {cycle['describe']}, "
                            f"{min(resets) - not_before:.1f} s after not_before")
    result = watch_install(vm, b.cp, b.operator)
    assert result["task"]["attempt"] == 1
    return {"task": result["task"], "late": min(resets) - not_before}


def test_machines_behind_redfish_and_ipmi_provision_with_no_hands(bench: Bench) -> None:
    started = time.monotonic()
    rf, rf_vm = bench.machine("rf", 1, ipmi=False)
    ipmi, ipmi_vm = bench.machine("ipmi", 2, ipmi=True)
    vms = [rf_vm, ipmi_vm]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(redfish_flow, bench, rf, rf_vm, vms),
                       pool.submit(ipmi_flow, bench, ipmi, ipmi_vm)]
            results = [f.result() for f in futures]
        assert results[0]["task"]["status"] == "released"
        assert results[1]["task"]["status"] == "succeeded"
        print(f"\nlibvirt events of rf: {results[0]['events']}")
        print(f"IPMI cycle {results[1]['late']:.1f} s after its not_before")
    finally:
        print(f"\nlab bmc: {time.monotonic() - started:.0f} s in all")
        for vm in vms:
            vm.stop_watching()
            print(vm.timeline())
