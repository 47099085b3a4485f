"""arm64 machines in the lab: ``qemu-system-aarch64 -M virt`` under TCG with
AAVMF (Debian's ``qemu-efi-aarch64``, the arm64 build of OVMF) and no NIC ROM,
so the firmware's own PXE client boots what the node offers arm64 UEFI
clients (option 93 = 11): Debian's signed GRUB for arm64 (``grubaa64.efi``).

The machine is a :class:`lab.vm.VM` like the x86 ones (the same serial
timeline, waits and console tail) on the lab's bridge, started and stopped
with the lab.  The serial console is the virt board's PL011 (``ttyAMA0``).
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from lab.process import LabError
from lab.runner import Lab
from lab.vm import VM

AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
QEMU_ARM64 = "qemu-system-aarch64"
#: a Cortex-A57 rather than ``max``: ``max`` has pointer authentication,
#: which TCG emulates at a high cost on every function call
CPU = "cortex-a57"
#: the fourth byte of an arm64 VM's MAC (x86 VMs of a lab use 0x77)
MAC_TAG = 0xA6


def arm64_command(vm: VM, *, tap: str, disk: Path, vars_fd: Path, memory_mb: int) -> list[str]:
    """The QEMU command of one arm64 VM: the (blank) disk first in the boot
    order, as on a machine whose installer put its entry in front, so the
    first boot falls through to PXE and the one after the install boots the
    disk (see :meth:`lab.runner.Lab.boot_vm`)."""
    return [QEMU_ARM64, "-accel", "tcg", "-machine", "virt", "-cpu", CPU,
            "-name", vm.name, "-m", str(memory_mb), "-smp", "1", "-nographic",
            "-monitor", "none", "-serial", f"file:{vm.serial_log}",
            "-qmp", f"unix:{vm.qmp_socket},server=on,wait=off",
            "-smbios", f"type=1,manufacturer=LPMOS,product=lab-vm-arm64,serial={vm.serial}",
            "-uuid", vm.uuid,
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-drive", f"file={disk},if=none,id=d0,format=raw,cache=unsafe",
            "-device", "virtio-blk-pci,drive=d0,bootindex=1",
            # romfile= (empty): QEMU's default ROM for the NIC is an x86 iPXE
            "-device", f"virtio-net-pci,netdev=n0,mac={vm.mac},romfile=,bootindex=2"]


def boot_arm64_vm(lab: Lab, name: str, *, serial: str | None = None, disk_gb: int = 2,
                  memory_mb: int = 1024) -> VM:
    """Start one arm64 UEFI VM on ``lab``'s segment that network-boots;
    returns at once (see :meth:`VM.wait_for`).  Its tap (``arm<n>``) is on
    the lab's bridge and goes with the lab's namespace; the VM is stopped
    with the lab."""
    for need in (AAVMF_CODE, AAVMF_VARS):
        if not need.exists():
            raise LabError(f"{need} missing: apt-get install qemu-efi-aarch64 "
                           "(scripts/setup.sh system)")
    if shutil.which(QEMU_ARM64) is None:
        raise LabError(f"{QEMU_ARM64} missing: apt-get install qemu-system-arm")
    n = sum(1 for vm in lab.vms if vm.mac.startswith(f"52:54:00:{MAC_TAG:02x}:"))
    mac = f"52:54:00:{MAC_TAG:02x}:{(lab.owner >> 8) & 0xff:02x}:{(n + 1) & 0xff:02x}"
    serial = serial or f"LAB-ARM64-{n + 1:02d}"
    vm_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{lab.lab_id}.{name}.arm64.lpmos.lab"))
    vmdir = lab.workdir / "vms" / name
    vmdir.mkdir(parents=True, exist_ok=True)
    vm = VM(name, "uefi", mac, serial, vm_uuid, vmdir)
    tap = f"arm{n}"
    lab._ns(lab.ns, "tuntap", "add", "dev", tap, "mode", "tap")
    lab._ns(lab.ns, "link", "set", tap, "master", "br0", "up")
    disk = vmdir / "disk.img"
    with disk.open("wb") as fh:
        fh.truncate(disk_gb << 30)
    vars_fd = vmdir / "AAVMF_VARS.fd"
    shutil.copyfile(AAVMF_VARS, vars_fd)
    cmd = arm64_command(vm, tap=tap, disk=disk, vars_fd=vars_fd, memory_mb=memory_mb)
    vm.started = time.monotonic()
    vm.proc = lab._spawn(cmd, f"vms/{name}/qemu.log", ns=lab.ns)
    vm.watch_console()
    lab.vms.append(vm)
    lab.log(f"VM {name}: arm64 UEFI (AAVMF, {CPU}, TCG), serial {serial}, MAC {mac}, "
            f"console {vm.serial_log}")
    return vm
