"""The boot decision table (bootsvc.policy.script), row by row."""

from __future__ import annotations

import pytest

from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import (
    CLAIM,
    CONTINUE,
    DISCOVERY,
    LOCALBOOT,
    WAIT,
    ScriptDecision,
    decide_script,
)
from lpmos.catalog import Image
from lpmos.models import Progress, Server, Task

IMAGE = Image("lab-os", "Lab OS", "lab", "1", mode="image", disk_image="lab-os/disk.img")
RHEL = Image("rocky-9", "Rocky Linux 9", "rhel", "9", mode="installer",
             kernel="https://mirror.invalid/vmlinuz", initrd="https://mirror.invalid/initrd")
ODD = Image("odd", "Odd", "lab", "1", mode="installer", kernel="k", initrd="i")
LIVE = Image("live", "LPMOS live", "lab", role="live", mode="installer", kernel="k",
             initrd="i")


#: the clock of every decision: 08:00 UTC
NOW = 1_800_000_000.0


def view(status: str | None, *, conflict: str = "", step: str = "",
         server: bool = True, not_before: float = 0.0, window: str = "") -> MachineView:
    task = None
    if status is not None:
        task = Task(idc="dc1", sn="SN1", mac="52:54:00:00:00:01", os_type="Lab OS",
                    status=status, progress=Progress(step=step), not_before=not_before,
                    window=window).validate()
    srv = Server(idc="dc1", sn="SN1", macs=["52:54:00:00:00:01"], conflict=conflict) \
        if server else None
    return MachineView("SN1", task, 7 if task else 0, srv)


# (view, discovery, image, live available) -> (action, words in the reason, template)
TABLE: list[tuple[str, MachineView | None, bool, Image | None, bool, str, str]] = [
    ("unknown, discovery on", None, True, None, True, DISCOVERY, "no task"),
    ("unknown, discovery off", None, False, None, True, LOCALBOOT, "discovery is off"),
    ("unknown, no live image", None, True, None, False, LOCALBOOT, "no live image"),
    ("known server, no task", view(None), True, None, True, DISCOVERY, "no task"),
    ("known server, no task, discovery off", view(None), False, None, True, LOCALBOOT,
     "discovery is off"),
    ("pending", view("pending"), True, IMAGE, True, DISCOVERY, "pending"),
    ("pending, discovery off still discovers", view("pending"), False, IMAGE, True, DISCOVERY,
     "pending"),
    ("pending, no live image", view("pending"), True, IMAGE, False, WAIT, "no live image"),
    ("approved, image mode", view("approved"), True, IMAGE, True, CLAIM, "approved"),
    ("approved, installer mode", view("approved"), True, RHEL, True, CLAIM, "approved"),
    ("approved, discovery off", view("approved"), False, RHEL, True, CLAIM, "approved"),
    ("approved, image not in catalog", view("approved"), True, None, True, WAIT,
     "not in the catalog"),
    ("approved, no script for family", view("approved"), True, ODD, True, WAIT,
     "no install script"),
    ("approved, the live image (not installable)", view("approved"), True, LIVE, True, WAIT,
     "cannot be installed"),
    ("approved, image mode without live", view("approved"), True, IMAGE, False, WAIT,
     "live image"),
    ("approved, conflict", view("approved", conflict="mac reused"), True, IMAGE, True, WAIT,
     "conflict"),
    ("booting", view("booting"), True, IMAGE, True, CONTINUE, "continue"),
    ("installing", view("installing"), True, RHEL, True, CONTINUE, "continue"),
    ("installing, conflict", view("installing", conflict="x"), True, IMAGE, True, WAIT,
     "conflict"),
    ("installing, image written", view("installing", step="rebooting"), True, IMAGE, True,
     LOCALBOOT, "image written"),
    ("booting, image written", view("booting", step="rebooting"), True, IMAGE, True,
     LOCALBOOT, "image written"),
    ("installing, image gone from catalog", view("installing"), True, None, True, WAIT,
     "not in the catalog"),
    ("succeeded", view("succeeded"), True, IMAGE, True, LOCALBOOT, "succeeded"),
    ("succeeded, discovery off", view("succeeded"), False, IMAGE, True, LOCALBOOT, "succeeded"),
    ("succeeded, conflict", view("succeeded", conflict="x"), True, IMAGE, True, LOCALBOOT,
     "succeeded"),
    ("failed", view("failed"), True, IMAGE, True, LOCALBOOT, "failed"),
    ("cancelled", view("cancelled"), True, IMAGE, True, LOCALBOOT, "cancelled"),
    ("rejected", view("rejected"), True, IMAGE, True, LOCALBOOT, "rejected"),
    ("releasing", view("releasing"), True, IMAGE, True, DISCOVERY, "wipes the disks"),
    ("releasing, no live image", view("releasing"), True, IMAGE, False, WAIT, "no live image"),
    ("releasing, conflict", view("releasing", conflict="x"), True, IMAGE, True, WAIT,
     "conflict"),
    ("released", view("released"), True, IMAGE, True, DISCOVERY, "no task"),
    ("released, discovery off", view("released"), False, IMAGE, True, LOCALBOOT,
     "discovery is off"),
    ("approved, not before a later time", view("approved", not_before=NOW + 60), True, IMAGE,
     True, WAIT, "scheduled: not before"),
    ("approved, outside its window", view("approved", window="22:00-04:00"), True, IMAGE,
     True, WAIT, "maintenance window 22:00-04:00"),
    ("approved, inside its window", view("approved", window="07:00-09:00"), True, IMAGE,
     True, CLAIM, "approved"),
    ("approved, past its not_before", view("approved", not_before=NOW - 60), True, IMAGE,
     True, CLAIM, "approved"),
    ("installing, outside its window: goes on", view("installing", window="22:00-04:00"),
     True, IMAGE, True, CONTINUE, "continue"),
    ("no server record, approved", view("approved", server=False), True, IMAGE, True, CLAIM,
     "approved"),
]

TEMPLATE_OF = {DISCOVERY: "ipxe/discovery.ipxe.j2", LOCALBOOT: "ipxe/localboot.ipxe.j2",
               WAIT: "ipxe/wait.ipxe.j2"}


@pytest.mark.parametrize("name,v,discovery,image,live,action,why", TABLE,
                         ids=[row[0] for row in TABLE])
def test_decision_table(name: str, v: MachineView | None, discovery: bool, image: Image | None,
                        live: bool, action: str, why: str) -> None:
    d = decide_script(v, discovery=discovery, image=image, live_available=live, now=NOW)
    assert isinstance(d, ScriptDecision)
    assert d.action == action, d.reason
    assert why in d.reason
    assert d.sn == (v.sn if v is not None else "")
    if action in TEMPLATE_OF:
        assert d.template == TEMPLATE_OF[action]
        assert not d.destructive
    else:
        expected = "ipxe/install-image.ipxe.j2" if image is IMAGE else "ipxe/install-rhel.ipxe.j2"
        assert d.template == expected
        assert d.destructive


def test_every_status_has_a_row() -> None:
    from lpmos.states import TaskStatus

    covered = {row[1].task.status for row in TABLE if row[1] is not None and row[1].task}
    assert covered == {s.value for s in TaskStatus}


def test_only_claim_and_continue_are_destructive() -> None:
    destructive = {row[5] for row in TABLE
                   if decide_script(row[1], discovery=row[2], image=row[3],
                                  live_available=row[4], now=NOW).destructive}
    assert destructive == {CLAIM, CONTINUE}


def test_decision_is_pure() -> None:
    v = view("approved")
    first = decide_script(v, discovery=True, image=IMAGE, live_available=True, now=NOW)
    again = decide_script(v, discovery=True, image=IMAGE, live_available=True, now=NOW)
    assert first == again
    assert v.task is not None and v.task.status == "approved"


ARM_IMAGE = Image("debian-12-arm64", "Debian 12", "debian", "12", arch="arm64", mode="installer",
                  kernel="https://mirror.invalid/arm64/linux",
                  initrd="https://mirror.invalid/arm64/initrd.gz")


def arch_view(status: str, inventory_arch: str) -> MachineView:
    base = view(status)
    assert base.server is not None
    base.server.arch = inventory_arch
    return base


# (status, image, boot loader's arch, inventory's arch) -> action, words in the reason
ARCH_TABLE: list[tuple[str, Image, str, str, str, str]] = [
    ("approved", RHEL, "x86_64", "", CLAIM, "approved"),
    ("approved", RHEL, "i386", "x86_64", CLAIM, "approved"),          # undionly.kpxe on BIOS
    ("approved", RHEL, "arm64", "", WAIT, "built for x86_64, and this machine is arm64"),
    ("approved", RHEL, "", "aarch64", WAIT, "built for x86_64, and this machine is arm64 "
     "(aarch64)"),
    ("approved", RHEL, "", "", CLAIM, "approved"),                    # unknown: not judged
    ("approved", RHEL, "riscv64", "", CLAIM, "approved"),             # not one we know
    ("approved", ARM_IMAGE, "arm64", "aarch64", CLAIM, "approved"),
    ("approved", ARM_IMAGE, "x86_64", "", WAIT, "built for arm64, and this machine is x86_64"),
    ("approved", ARM_IMAGE, "", "x86_64", WAIT, "built for arm64"),
    # the boot loader's word wins over a stale inventory
    ("approved", ARM_IMAGE, "arm64", "x86_64", CLAIM, "approved"),
    ("installing", RHEL, "arm64", "", WAIT, "built for x86_64"),
    ("succeeded", ARM_IMAGE, "x86_64", "", LOCALBOOT, "succeeded"),
]


@pytest.mark.parametrize("status,image,arch,inventory,action,words", ARCH_TABLE)
def test_an_image_goes_only_to_a_machine_of_its_architecture(
        status: str, image: Image, arch: str, inventory: str, action: str, words: str) -> None:
    d = decide_script(arch_view(status, inventory), discovery=True, image=image,
                      live_available=True, now=NOW, arch=arch)
    assert d.action == action, d
    assert words in d.reason
    assert d.destructive == (action in (CLAIM, CONTINUE))
