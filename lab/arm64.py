"""arm64 machines in the lab (:meth:`lab.runner.Lab.boot_vm` with
``arch="arm64"``): ``qemu-system-aarch64 -M virt`` under TCG with AAVMF
(Debian's ``qemu-efi-aarch64``, the arm64 build of OVMF) and no NIC ROM, so
the firmware's own PXE client boots what the node offers arm64 UEFI clients
(option 93 = 11): Debian's signed GRUB for arm64 (``grubaa64.efi``).

The machine is a :class:`lab.vm.VM` like the x86 ones (the same serial
timeline, waits and console tail).  The serial console is the virt board's
PL011 (``ttyAMA0``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lab.process import LabError
from lab.vm import VM

AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
QEMU_ARM64 = "qemu-system-aarch64"
#: a Cortex-A57 rather than ``max``: ``max`` has pointer authentication,
#: which TCG emulates at a high cost on every function call
CPU = "cortex-a57"


def arm64_command(vm: VM, *, tap: str, disk: Path, vars_fd: Path, memory_mb: int,
                  disk_index: int = 1, net_index: int = 2) -> list[str]:
    """The QEMU command of one arm64 VM (pure).  By default the (blank) disk
    comes first in the boot order, as on a machine whose installer put its
    entry in front, so the first boot falls through to PXE and the one after
    the install boots the disk (see :meth:`lab.runner.Lab.boot_vm`)."""
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
            "-device", f"virtio-blk-pci,drive=d0,bootindex={disk_index}",
            # romfile= (empty): QEMU's default ROM for the NIC is an x86 iPXE
            "-device", f"virtio-net-pci,netdev=n0,mac={vm.mac},romfile=,"
                       f"bootindex={net_index}"]


def arm64_vm_command(vm: VM, *, tap: str, disk: Path, workdir: Path, memory_mb: int,
                     disk_index: int = 1, net_index: int = 2) -> list[str]:
    """:func:`arm64_command` after checking QEMU and AAVMF are there and
    copying AAVMF's variable store into ``workdir`` (the VM's own)."""
    for need in (AAVMF_CODE, AAVMF_VARS):
        if not need.exists():
            raise LabError(f"{need} missing: apt-get install qemu-efi-aarch64 "
                           "(scripts/setup.sh system)")
    if shutil.which(QEMU_ARM64) is None:
        raise LabError(f"{QEMU_ARM64} missing: apt-get install qemu-system-arm "
                       "(scripts/setup.sh system)")
    vars_fd = workdir / "AAVMF_VARS.fd"
    shutil.copyfile(AAVMF_VARS, vars_fd)
    return arm64_command(vm, tap=tap, disk=disk, vars_fd=vars_fd, memory_mb=memory_mb,
                         disk_index=disk_index, net_index=net_index)
