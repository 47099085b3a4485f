"""What a machine boots: one pure function of what the node knows.

:func:`decide_script` is the whole decision table of the boot HTTP API;
the HTTP service only carries the decision out.  It takes the
node's cached view of the machine (:class:`bootsvc.policy.machine.MachineView`),
the catalog image the task asks for and two switches, and returns a
:class:`ScriptDecision`.  It does no I/O.

| what the node knows                                  | action      | script             |
| ---------------------------------------------------- | ----------- | ------------------ |
| unknown machine, or no task; discovery on            | discovery   | discovery (live)   |
| unknown machine, or no task; discovery off           | localboot   | local disk         |
| ... but no live image in the catalog                 | localboot   | local disk         |
| ``pending``                                          | discovery   | discovery, waits   |
| ``pending``, no live image                           | wait        | wait and retry     |
| ``approved``                                         | claim       | install (after a   |
|                                                      |             | fresh read + CAS)  |
| ``booting`` / ``installing``                         | continue    | install (after a   |
|                                                      |             | fresh read)        |
| ``booting`` / ``installing``, step ``rebooting``     | localboot   | local disk: the    |
|                                                      |             | image is written,  |
|                                                      |             | its first boot     |
|                                                      |             | reports success    |
| ``succeeded``                                        | localboot   | local disk         |
| ``failed`` / ``cancelled`` / ``rejected``            | localboot   | local disk         |
| approved/booting/installing, server flagged conflict | wait        | wait (no install)  |
| approved/booting/installing, managed image not ready | wait        | wait (no install): |
| on this node (fetching, failed, not for this IDC)    |             | "image golden-1    |
|                                                      |             | fetching on node   |
|                                                      |             | n1, 42 %"          |
| approved/booting/installing, image not in catalog    | wait        | wait (no install)  |
| approved/booting/installing, image not installable   | wait        | wait (no install)  |
| (the catalog's live image: ``Image.installable``)    |             |                    |
| approved/booting/installing, no install template     | wait        | wait (no install)  |
| approved/booting/installing, the image is built for  | wait        | wait (no install): |
| another architecture than the machine's (``arch``,   |             | "image X is built  |
| else the inventory's)                                |             | for x86_64, and    |
|                                                      |             | this machine is    |
|                                                      |             | arm64"             |
| ``approved``, before its schedule lets it start      | wait        | wait (no install): |
| (``not_before``, window: :mod:`lpmos.schedule`)      |             | "scheduled: not    |
|                                                      |             | before ... UTC"    |
| ``releasing`` (the disks are to be wiped)            | discovery   | the live image,    |
|                                                      |             | whose agent wipes  |
|                                                      |             | (after a fresh     |
|                                                      |             | read + CAS)        |
| ``releasing``, no live image / flagged conflict      | wait        | wait (no wipe)     |
| ``released``                                         | as no task  | discovery / local  |

``claim`` and ``continue`` are *destructive*: the service must confirm them
with a fresh linearizable read (and, for ``claim``, a CAS ``approved →
booting``) before serving an install, and fail closed to ``wait``
otherwise (:mod:`bootsvc.state.claim`).  Every other action is served from the
cache with no etcd request.
"""

from __future__ import annotations

from dataclasses import dataclass

from bootsvc.policy.machine import MachineView
from lpmos.catalog import Image
from lpmos.schedule import decide_start
from lpmos.states import REBOOT_STEP, TaskStatus

DISCOVERY = "discovery"
LOCALBOOT = "localboot"
WAIT = "wait"
CLAIM = "claim"
CONTINUE = "continue"
ACTIONS = (DISCOVERY, LOCALBOOT, WAIT, CLAIM, CONTINUE)


TEMPLATES = {
    DISCOVERY: "ipxe/discovery.ipxe.j2",
    LOCALBOOT: "ipxe/localboot.ipxe.j2",
    WAIT: "ipxe/wait.ipxe.j2",
}

#: installer-mode iPXE scripts per OS family; image mode uses the agent.
INSTALL_TEMPLATES = {
    "image": "ipxe/install-image.ipxe.j2",
    "rhel": "ipxe/install-rhel.ipxe.j2",
    "ubuntu": "ipxe/install-ubuntu.ipxe.j2",
    "debian": "ipxe/install-debian.ipxe.j2",
}

#: ``/config/<sn>/<name>`` → template, per install kind.  ``""`` is an
#: empty document (cloud-init asks for vendor-data and accepts it empty).
CONFIG_TEMPLATES: dict[str, dict[str, str]] = {
    "image": {
        "user-data": "cloud-init/user-data.j2",
        "meta-data": "cloud-init/meta-data.j2",
        "network-config": "cloud-init/network-config.j2",
        "vendor-data": "",
    },
    "ubuntu": {
        "user-data": "autoinstall/user-data.j2",
        "meta-data": "autoinstall/meta-data.j2",
        "vendor-data": "",
    },
    "rhel": {"ks.cfg": "kickstart/rhel9.ks.j2"},
    "debian": {"preseed.cfg": "preseed/debian12.cfg.j2"},
}


#: the boot loaders a decision is rendered for: iPXE's script, or GRUB's
#: config (Secure Boot machines, through shim); the same table, one
#: template directory each
LOADER_SUFFIXES = {"ipxe": ".ipxe", "grub": ".cfg"}


def loader_template(template: str, loader: str) -> str:
    """``template`` (an iPXE template of the table) for ``loader``:
    ``ipxe/wait.ipxe.j2`` is ``grub/wait.cfg.j2`` for GRUB."""
    if loader == "ipxe":
        return template
    stem = template.removeprefix("ipxe/").removesuffix(".ipxe.j2")
    return f"{loader}/{stem}{LOADER_SUFFIXES[loader]}.j2"


@dataclass(frozen=True, slots=True)
class ScriptDecision:
    """What to serve.  ``reason`` is shown on the machine's console and
    recorded on its timeline; ``template`` is the iPXE template to render
    (for ``claim``/``continue``: once the fresh read confirms it)."""

    action: str
    template: str
    reason: str
    sn: str = ""

    @property
    def destructive(self) -> bool:
        return self.action in (CLAIM, CONTINUE)


def install_kind(image: Image) -> str:
    """``image`` for image-mode entries, else the OS family."""
    return "image" if image.mode == "image" else image.os_family


def decide_script(
    view: MachineView | None,
    *,
    discovery: bool,
    image: Image | None,
    live_available: bool,
    now: float,
    image_wait: str = "",
    arch: str = "",
) -> ScriptDecision:
    """The boot script for a machine (see the module table).

    ``view`` is the machine as the cache knows it (``None``: unknown);
    ``image`` is the catalog entry its task asks for (``None`` when there
    is no task or the catalog lacks it); ``discovery`` is ``--discovery``;
    ``live_available`` says whether the catalog has the live agent image;
    ``image_wait`` (with no ``image``) is why the task's managed image is not
    in this node's catalog yet (:func:`bootsvc.policy.images.wait_reason`):
    a copy not verified here is never installed.  ``now`` (server time) is
    judged against an approved task's schedule: before it, the machine waits.
    ``arch`` is the architecture the machine's boot loader reports (iPXE's
    ``${buildarch}``); without it the inventory's is used.  An image built for
    another architecture is never installed (:meth:`Image.arch_mismatch`).
    """
    sn = view.sn if view is not None else ""
    task = view.task if view is not None else None

    def live_or(fallback: str, reason: str, missing: str) -> ScriptDecision:
        if live_available:
            return ScriptDecision(DISCOVERY, TEMPLATES[DISCOVERY], reason, sn)
        return ScriptDecision(fallback, TEMPLATES[fallback], missing, sn)

    if task is not None and task.state is TaskStatus.RELEASED:
        task = None          # wiped and handed back: as a machine with no task
    if task is None:
        if not discovery:
            return ScriptDecision(LOCALBOOT, TEMPLATES[LOCALBOOT],
                            "no task and discovery is off", sn)
        return live_or(LOCALBOOT, "no task: discovery",
                       "no task, and no live image in the catalog for discovery")
    status = task.state
    if status is TaskStatus.PENDING:
        return live_or(WAIT, "task pending approval: discovery, waiting",
                       "task pending approval; no live image in the catalog")
    if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED,
                  TaskStatus.REJECTED):
        return ScriptDecision(LOCALBOOT, TEMPLATES[LOCALBOOT], f"task {status.value}", sn)
    # approved, booting, installing, releasing: destructive territory
    server = view.server if view is not None else None
    if server is not None and server.conflict:
        return ScriptDecision(WAIT, TEMPLATES[WAIT],
                        f"machine flagged as a conflict ({server.conflict}); no install", sn)
    if status is TaskStatus.RELEASING:
        # the live image; its agent's task poll confirms the release with a
        # fresh read and a CAS before it wipes anything (routes_agent)
        return live_or(WAIT, "task releasing: the live agent wipes the disks",
                       "task releasing, but the catalog has no live image to wipe from")
    if status in (TaskStatus.BOOTING, TaskStatus.INSTALLING) \
            and task.progress.step == REBOOT_STEP:
        return ScriptDecision(LOCALBOOT, TEMPLATES[LOCALBOOT],
                        "image written: booting the installed system", sn)
    if image is None and image_wait:
        return ScriptDecision(WAIT, TEMPLATES[WAIT], image_wait, sn)
    if image is None:
        return ScriptDecision(WAIT, TEMPLATES[WAIT],
                        f"task image {task.image or task.os_type} is not in the catalog", sn)
    if not image.installable:
        return ScriptDecision(WAIT, TEMPLATES[WAIT], image.not_installable_reason, sn)
    mismatch = image.arch_mismatch(arch or (server.arch if server is not None else ""))
    if mismatch:
        return ScriptDecision(WAIT, TEMPLATES[WAIT], mismatch, sn)
    template = INSTALL_TEMPLATES.get(install_kind(image))
    if template is None:
        return ScriptDecision(WAIT, TEMPLATES[WAIT],
                        f"no install script for {install_kind(image)} images", sn)
    if install_kind(image) == "image" and not live_available:
        return ScriptDecision(WAIT, TEMPLATES[WAIT],
                        "image install needs the live image, which the catalog lacks", sn)
    if status is TaskStatus.APPROVED:
        start = decide_start(task.not_before, task.window, now)
        if not start.start:
            return ScriptDecision(WAIT, TEMPLATES[WAIT], start.reason, sn)
        return ScriptDecision(CLAIM, template, "task approved: install", sn)
    return ScriptDecision(CONTINUE, template, f"task {status.value}: continue the install", sn)
