"""A real operating system, installed and logged into: a BIOS VM and a UEFI
VM each install the Debian 12 cloud image that images/ builds from Debian's
packages (the BIOS VM from qcow2, the UEFI VM from raw.zst), through

    PXE → iPXE → live agent → task with hostname, SSH key and a static
    address → image streamed and converted on the fly → cidata seed
    partition added at the disk's end → reboot → GRUB (BIOS) / shim + GRUB
    (UEFI) from the disk → systemd → real cloud-init → its final report →
    task ``succeeded``

and then the test logs in over SSH from the lab segment with the key it put
in the task and checks, on the machine itself: the hostname, ``cloud-init
status`` done, the static addresses on the NIC, the root file system grown
to the disk, and that it booted from its disk.  The BIOS VM is then
redeployed under another hostname: it installs again (a new attempt, the
history kept) and a new login sees the new name.

One lab run proves all of it, both VMs side by side (TCG, one vCPU each).
The time from approval to the first SSH login of each VM is printed (it is
the number bench/README.md quotes).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lab.runner import VM, Lab, LabError, control_plane, http_json
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(2700)]

#: per-stage budgets (seconds) for 2 shared cores under TCG
BUDGET = {"agent": 300, "discovered": 180, "written": 900, "succeeded": 900, "ssh": 300}
DISK_GB = 4
GIB = 1 << 30

#: (VM name, firmware, catalog image, static IPv4, static IPv6)
MACHINES = (("bios-os", "bios", "debian-12-generic", "10.77.0.211", "fd77:77::211"),
            ("uefi-os", "uefi", "debian-12-generic-zst", "10.77.0.212", "fd77:77::212"))


def _api(cp: str, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    return http_json(method, cp + path, body, token=token, timeout=15)




class Machine:
    """One VM's install flow through the API and its logins."""

    def __init__(self, lab: Lab, vm: VM, cp: str, tokens: dict[str, str], image: str,
                 ipv4: str, ipv6: str, key: Path) -> None:
        self.lab, self.vm, self.cp, self.tokens = lab, vm, cp, tokens
        self.image, self.ipv4, self.ipv6, self.key = image, ipv4, ipv6, key
        self.times: dict[str, float] = {}

    def params(self, hostname: str) -> dict[str, Any]:
        return {
            "hostname": hostname,
            "ssh_keys": [(self.key.with_suffix(".pub")).read_text().strip()],
            "network": {"mode": "static",
                        "addresses": [f"{self.ipv4}/24", f"{self.ipv6}/64"],
                        "gateway4": "10.77.0.1",
                        "dns": {"servers": ["10.77.0.1"], "search": ["lab.lpmos"]}},
        }

    def task(self) -> dict[str, Any] | None:
        status, body = _api(self.cp, "GET", f"/api/v1/tasks/dc1/{self.vm.serial}",
                            self.tokens["operator"])
        return body["task"] if status == 200 else None

    def wait_status(self, what: str, budget: str, wanted: tuple[str, ...],
                    attempt: int = 1) -> dict[str, Any]:
        def probe() -> Any:
            task = self.task()
            if task is None or task.get("attempt", 1) < attempt:
                return None
            if task["status"] == "failed":
                raise LabError(f"{self.vm.name}: task failed: {task.get('reason')}\n"
                               f"{self.vm.describe()}")
            return task if task["status"] in wanted else None
        return self.vm.wait_until(what, BUDGET[budget], probe)  # type: ignore[no-any-return]

    def install(self, hostname: str) -> dict[str, Any]:
        vm = self.vm
        vm.wait_for("agent", BUDGET["agent"])

        def server() -> Any:
            status, body = _api(self.cp, "GET", f"/api/v1/servers/dc1/{vm.serial}",
                                self.tokens["operator"])
            return body if status == 200 and body["server"].get("inventory") else None

        inventory = vm.wait_until("discovery", BUDGET["discovered"], server)["server"]["inventory"]
        assert any(d["name"] == "vda" and d["size_bytes"] == DISK_GB * GIB
                   for d in inventory["disks"])
        status, body = _api(self.cp, "POST", "/api/v1/tasks", self.tokens["operator"], {
            "idc": "dc1", "sn": vm.serial, "mac": vm.mac, "os_type": "Debian 12 cloud",
            "image": self.image, "params": self.params(hostname), "notes": "real OS lab"})
        assert status == 201, body
        status, body = _api(self.cp, "POST", f"/api/v1/tasks/dc1/{vm.serial}/approve",
                            self.tokens["approver"], {"notes": "real OS lab"})
        assert status == 200, body
        self.times["approved"] = time.monotonic()
        vm.mark("approved", self.image)
        task = self.wait_status("image written", "written", ("installing", "succeeded"))
        vm.wait_until("image written (step rebooting)", BUDGET["written"],
              lambda: (t := self.task()) and (t["status"] == "succeeded"
                                              or (t.get("progress") or {}).get("step")
                                              == "rebooting"))
        vm.mark("written", self.image)
        task = self.wait_status("cloud-init's report (task succeeded)", "succeeded",
                                ("succeeded",))
        vm.mark("succeeded", f"attempt {task['attempt']}")
        return task

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.lab.ns, "ssh", "-i", str(self.key),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
             f"debian@{self.ipv4}", command],
            capture_output=True, text=True, timeout=timeout, check=False)

    def login(self) -> dict[str, str]:
        """Log in and collect the facts the test checks (one command each)."""
        probes = {
            "hostname": "hostname",
            "cloud_init": "cloud-init status --long",
            "addresses": "ip -o addr show",
            "root_source": "findmnt -no SOURCE /",
            "root_bytes": "df -B1 --output=size / | tail -n 1",
            "cmdline": "cat /proc/cmdline",
            "efi": "test -d /sys/firmware/efi && echo uefi || echo bios",
            "partitions": "lsblk -bno NAME,SIZE,PARTLABEL,LABEL /dev/vda",
        }

        def first_login() -> Any:
            done = self.ssh("true", timeout=30)
            return done.returncode == 0
        self.vm.wait_until(f"SSH login to {self.ipv4}", BUDGET["ssh"], first_login)
        self.times.setdefault("ssh", time.monotonic())
        facts = {}
        for name, cmd in probes.items():
            done = self.ssh(cmd)
            assert done.returncode == 0, f"{self.vm.name}: {cmd}: {done.stderr}"
            facts[name] = done.stdout.strip()
        return facts


def print_lab_times(what: str, started: float, machines: list[Machine],
                    vms: list[VM]) -> None:
    """The lab's time in all, each machine's approval to its first SSH login
    (the number bench/README.md quotes), each VM's stage timeline."""
    print(f"\n{what}: {time.monotonic() - started:.0f} s in all")
    for m in machines:
        if "ssh" in m.times and "approved" in m.times:
            print(f"{m.vm.name}: approval to SSH login "
                  f"{m.times['ssh'] - m.times['approved']:.0f} s")
    for vm in vms:
        print(vm.timeline())


def _check_installed(m: Machine, facts: dict[str, str], hostname: str) -> None:
    assert facts["hostname"] == hostname, facts
    assert "status: done" in facts["cloud_init"], facts["cloud_init"]
    assert f"inet {m.ipv4}/24" in facts["addresses"], facts["addresses"]
    assert f"inet6 {m.ipv6}/64" in facts["addresses"], facts["addresses"]
    # booted from its own disk: the root is the image's third partition,
    # found by GRUB through its UUID
    assert facts["root_source"] == "/dev/vda3", facts
    assert "root=UUID=" in facts["cmdline"], facts["cmdline"]
    assert facts["efi"] == m.vm.firmware, facts
    # growpart grew the root to the disk, up to the seed partition at its end
    assert int(facts["root_bytes"]) > (DISK_GB - 1) * GIB, facts
    assert "cidata" in facts["partitions"].lower(), facts["partitions"]


def test_bios_and_uefi_vms_install_debian_and_are_logged_into(
        lab_images: dict[str, Path], cloud_image: Path, tmp_path: Path) -> None:
    require_lab_host()
    started = time.monotonic()
    key = tmp_path / "id_lab"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lpmos-lab",
                    "-f", str(key)], check=True)
    vms: list[VM] = []
    machines: list[Machine] = []
    try:
        with Lab(tmp_path / "lab") as lab:
            tokens = lab.api_tokens()
            with control_plane(lab, port=free_port()) as cp:
                for name, firmware, image, ipv4, ipv6 in MACHINES:
                    vm = lab.boot_vm(name, firmware=firmware, disk_gb=DISK_GB)
                    vms.append(vm)
                    machines.append(Machine(lab, vm, cp, tokens, image, ipv4, ipv6, key))

                def flow(m: Machine) -> dict[str, str]:
                    m.install(f"{m.vm.name}-one")
                    return m.login()

                with concurrent.futures.ThreadPoolExecutor(len(machines)) as pool:
                    facts = dict(zip([m.vm.name for m in machines],
                                     pool.map(flow, machines), strict=True))
                for m in machines:
                    _check_installed(m, facts[m.vm.name], f"{m.vm.name}-one")

                # redeploy the BIOS VM (its boot order is network first) under
                # another name: a new attempt, then a new login sees it
                bios = machines[0]
                status, body = _api(cp, "POST", f"/api/v1/tasks/dc1/{bios.vm.serial}/redeploy",
                                    tokens["approver"],
                                    {"params": {"hostname": "bios-os-two"},
                                     "notes": "real OS lab redeploy"})
                assert status == 200, body
                assert body["task"]["attempt"] == 2 and body["task"]["status"] == "approved"
                bios.ssh("sudo systemctl reboot")
                bios.wait_status("the redeploy's install", "succeeded", ("succeeded",),
                                 attempt=2)
                again = bios.login()
                assert again["hostname"] == "bios-os-two", again
                assert "status: done" in again["cloud_init"], again
                history = bios.task() or {}
                assert history.get("attempt") == 2
    finally:
        print_lab_times("real OS lab", started, machines, vms)
