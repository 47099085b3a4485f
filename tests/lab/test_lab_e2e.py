"""End to end on real firmware: a BIOS VM (SeaBIOS + the NIC's iPXE ROM) and
a UEFI VM (OVMF's own PXE client fetching ipxe.efi over our TFTP) each go

    PXE → iPXE → discovery (live image, agent) → inventory in the control-plane
    API → task created and approved through the API → image installed with
    progress events → reboot → boots its own disk → first-boot callback →
    task ``succeeded``

through the real ProxyDHCP, TFTP, boot HTTP, agent and control plane, next to
dnsmasq as the site's DHCP server.  Both VMs run at once (TCG, one vCPU each).
Each VM's boot timeline is printed; a stage that does not arrive in time fails
the test with that VM's serial console.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from pathlib import Path
from typing import Any

import pytest

from lab.runner import VM, Lab, control_plane
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host
from tests.lab.flow import create_and_approve, discover, watch_install

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(1500)]


def _install_flow(vm: VM, cp: str, operator: str, approver: str) -> dict[str, Any]:
    discover(vm, cp, operator)
    create_and_approve(vm, cp, operator, approver)
    return watch_install(vm, cp, operator)


def test_bios_and_uefi_vms_install_lab_os_end_to_end(lab_images: dict[str, Path],
                                                     tmp_path: Path) -> None:
    require_lab_host()
    started = time.monotonic()
    vms: list[VM] = []
    try:
        with Lab(tmp_path / "lab") as lab:
            tokens = lab.api_tokens()
            operator, approver = tokens["operator"], tokens["approver"]
            with control_plane(lab, port=free_port()) as cp:
                vms = [lab.boot_vm("bios-1", firmware="bios"),
                       lab.boot_vm("uefi-1", firmware="uefi")]
                with concurrent.futures.ThreadPoolExecutor(len(vms)) as pool:
                    futures = {vm.name: pool.submit(_install_flow, vm, cp, operator, approver)
                               for vm in vms}
                    results = {name: f.result() for name, f in futures.items()}
                # the node's own view: tokens revoked, tasks done; the second
                # boot went to the disk, not to the live image again
                for vm in vms:
                    result = results[vm.name]
                    assert result["task"]["status"] == "succeeded"
                    assert result["percents"], "no progress was ever reported"
                    assert vm.seen("disk-boot") and vm.seen("callback")
                    assert vm.seen("disk-boot").at > vm.seen("agent").at  # type: ignore[union-attr]
                    # the live image's scripts call only what the image has
                    # (sh says "script: LINE: command: not found" otherwise)
                    missing = re.findall(r"^\S+: \d+: \S+: not found$", vm.console_tail(100000),
                                         re.MULTILINE)
                    assert missing == [], missing
    finally:
        print(f"\nlab e2e: {time.monotonic() - started:.0f} s in all")
        for vm in vms:
            print(vm.timeline())
