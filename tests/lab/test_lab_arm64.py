"""arm64 end to end under TCG (issue #20 item 3): an arm64 UEFI VM
(``qemu-system-aarch64 -M virt``, AAVMF, no NIC ROM) on a lab segment goes

    AAVMF PXE → grubaa64.efi (Debian's signed GRUB for arm64, offered for
    option 93 = 11) → grub/grub.cfg → its own grub/<mac>.cfg (the decision)
    → the arm64 live kernel + initramfs (all over TFTP) → the agent registers
    (arch aarch64) → an x86 image is refused for it → the arm64 lab OS task
    approved → the image written → reboot → GRUB from its own disk → the
    lab OS's first-boot callback → ``succeeded``

through a real ``lpmos regional`` (the segment's DHCP server: GRUB 2.06 reads
its TFTP server from the DHCP ACK) and the control plane.  The stage times
are printed (firmware → GRUB, kernel → registration, install, reboot to
disk); the measured ones are in the README's arm64 section.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from lab.runner import VM, Lab, control_plane
from lpmos.catalog import arch_family
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host
from tests.lab.flow import api, create_and_approve, discover, watch_install

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(1200)]

#: the node of an arm64 segment: Debian's signed arm64 GRUB for arch 11, the
#: arm64 live image, its serial console
NODE_ARGS = ("--dhcp-bootfile-arm64", "grubaa64.efi", "--live-image", "live-arm64",
             "--live-kernel-args", "console=ttyAMA0")
#: the loader steps the node's timeline shows for the machine, in order
LOADER_STAGES = ("loader grub", "grub.cfg", "grub config", "kernel fetched",
                 "initrd fetched", "agent registered")
#: (name, from stage, to stage) of the closing note's stage times
SPANS = (("firmware -> GRUB", "firmware", "decision"),
         ("GRUB -> kernel", "decision", "kernel"),
         ("kernel -> agent registered", "kernel", "registered"),
         ("approval -> image written", "approved", "rebooting"),
         ("reboot -> disk boot -> succeeded", "rebooting", "succeeded"))


def stage_times(vm: VM) -> list[tuple[str, float]]:
    """(span, seconds) of :data:`SPANS` that the VM's timeline has both ends of."""
    out = []
    for name, start, end in SPANS:
        a, b = vm.seen(start), vm.seen(end)
        if a is not None and b is not None:
            out.append((name, b.at - a.at))
    return out


def _timeline(cp: str, operator: str, sn: str) -> list[dict[str, Any]]:
    status, body = api(cp, "GET", f"/api/v1/servers/dc1/{sn}/timeline", operator)
    assert status == 200, body
    return list(body["entries"])


def test_arm64_vm_boots_grub_registers_and_installs_lab_os(arm64_images: dict[str, Path],
                                                           tmp_path: Path) -> None:
    require_lab_host()
    started = time.monotonic()
    workdir = tmp_path / "lab"
    # the operator's step on an amd64 node (README: arm64): the signed arm64
    # GRUB into the node's TFTP root, beside what the node places itself
    tftp = workdir / "node" / "tftp"
    tftp.mkdir(parents=True)
    shutil.copy2(arm64_images["netboot"] / "grubaa64.efi", tftp / "grubaa64.efi")
    vm: VM | None = None
    try:
        with Lab(workdir, site_dhcp=False, node_args=NODE_ARGS) as lab:
            tokens = lab.api_tokens()
            operator, approver = tokens["operator"], tokens["approver"]
            with control_plane(lab, port=free_port()) as cp:
                vm = lab.boot_vm("arm64-1", firmware="uefi", arch="arm64")
                discover(vm, cp, operator)
                status, body = api(cp, "GET", f"/api/v1/servers/dc1/{vm.serial}", operator)
                assert status == 200, body
                assert arch_family(body["server"]["arch"]) == "arm64", body["server"]["arch"]

                # an x86 image is never sent to it: the task is refused, naming the image
                status, body = api(cp, "POST", "/api/v1/tasks", operator, {
                    "idc": "dc1", "sn": vm.serial, "mac": vm.mac, "os_type": "LPMOS lab OS",
                    "image": "lab-os"})
                assert status == 400, body
                assert body.get("field") == "image" and "arm64" in str(body), body

                create_and_approve(vm, cp, operator, approver, image="lab-os-arm64")
                result = watch_install(vm, cp, operator)
                assert result["task"]["status"] == "succeeded"
                assert result["task"]["image"] == "lab-os-arm64"
                assert result["percents"], "no progress was ever reported"
                assert vm.seen("disk-boot").at > vm.seen("registered").at  # type: ignore[union-attr]

                entries = _timeline(cp, operator, vm.serial)
                stages = [e["stage"] for e in entries]
                positions = [stages.index(s) for s in LOADER_STAGES if s in stages]
                assert len(positions) == len(LOADER_STAGES), stages
                assert positions == sorted(positions), stages
                offered = [e["detail"].get("file") for e in entries if e["stage"] == "dhcp"]
                assert "grubaa64.efi" in offered, offered
                fetched = [e["detail"] for e in entries if e["stage"] == "kernel fetched"]
                assert fetched and "live-arm64" in str(fetched[0]), fetched
    finally:
        print(f"\narm64 lab: {time.monotonic() - started:.0f} s in all")
        if vm is not None:
            print(vm.timeline())
            for name, seconds in stage_times(vm):
                print(f"  {name:<34} {seconds:6.1f} s")
