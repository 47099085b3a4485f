"""The Vagrant libvirt lab, as docs/lab.md tells it.

* The Vagrantfile passes ``vagrant validate`` (with Debian's vagrant-libvirt
  plugin), and validation does catch a wrong provider setting, so the pass
  means something.
* The whole procedure of the doc's "Vagrant libvirt lab" section: its ``sh``
  blocks, taken from the doc and run as they are, in order, in one shell
  (as root, in the checkout): libvirt, ``vagrant up`` (TCG), the regional
  node on the network's bridge next to libvirt's dnsmasq (both hold UDP 67
  there: checked from /proc while it runs), the control plane, a task for
  each VM, a power-cycle, both installs (BIOS and UEFI) through to the lab
  OS's first-boot callback, ``vagrant destroy``; then no domain, volume,
  network or NVRAM file of the lab is left.
* Two UEFI VMs get two NVRAM files of their own, copied from OVMF's
  template, which stays as it was; ``vagrant destroy`` removes them.

The system libvirt daemons are started by the doc's first block when none
runs; the fixture stops them afterwards only then (by the PIDs in their pid
files), and undoes the block's other changes it found not made before (the
``default`` storage pool, the group of /dev/kvm).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootsvc.dhcp.sockets import udp_port_holders
from lab.process import stop
from lab.vm import VM
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host
from tests.power_lab import kill_pid

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "lab.md"
SECTION = "## Vagrant libvirt lab (`Vagrantfile`)"
SERIAL_DIR = Path("/var/log/libvirt/qemu")
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: the doc's VMs: (domain, firmware, SMBIOS serial, MAC)
DOC_VMS = (("lpmos-bios-01", "bios", "VAG-BIOS-01", "52:54:00:78:00:01"),
           ("lpmos-uefi-02", "uefi", "VAG-UEFI-02", "52:54:00:78:00:02"))
#: the whole procedure, solo on 2 cores under TCG, takes 4-6 minutes
PROCEDURE_TIMEOUT = 1500

pytestmark = pytest.mark.slow


def doc_blocks() -> list[str]:
    """The ``sh`` blocks of the doc's Vagrant section, in order."""
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:] if end == -1 else text[start:end]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)


def _require_vagrant() -> None:
    for tool in ("vagrant", "virsh", "libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run 'scripts/setup.sh system' (Debian's vagrant, "
                        "vagrant-libvirt and libvirt-daemon-system)")


def _virsh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _names(*args: str) -> set[str]:
    return {n.strip() for n in _virsh(*args).stdout.split() if n.strip()}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, LAB=str(tmp_path / "lab"), VAGRANT_HOME=str(tmp_path / "vagrant.d"),
                VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"),
                VAGRANT_CHECKPOINT_DISABLE="1", **extra)


def _bash(script: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["bash", "-c", "set -eo pipefail\n" + script], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _destroy(env: dict[str, str]) -> None:
    """``vagrant destroy -f`` after a failure (harmless when nothing is left)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(["vagrant", "destroy", "-f"], cwd=REPO, env=env, capture_output=True,
                       timeout=300, check=False)


def _leftovers(domains: list[str]) -> list[str]:
    """What of the lab's domains, volumes, network and NVRAM files libvirt still has."""
    left = sorted(set(domains) & _names("list", "--all", "--name"))
    left += sorted(v for v in _names("vol-list", "default") if v.startswith(tuple(domains)))
    left += sorted({"lpmos-lab"} & _names("net-list", "--all", "--name"))
    left += [str(p) for d in domains if (p := NVRAM_DIR / f"{d}_VARS.fd").exists()]
    return left


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class HostState:
    """What the doc's libvirt block may change, as found before it ran."""

    libvirtd: bool
    virtlogd: bool
    pool: bool
    kvm_gid: int | None


def _kill_pidfile(path: Path) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    kill_pid(pid)


@pytest.fixture(scope="module")
def system_libvirt() -> Iterator[HostState]:
    """The host as found; afterwards, undo what the doc's libvirt block did."""
    require_lab_host()
    _require_vagrant()
    kvm = Path("/dev/kvm")
    state = HostState(libvirtd=_virsh("uri", timeout=15).returncode == 0,
                      virtlogd=Path("/run/libvirt/virtlogd-sock").exists(),
                      pool=False, kvm_gid=kvm.stat().st_gid if kvm.exists() else None)
    state.pool = state.libvirtd and _virsh("pool-info", "default").returncode == 0
    yield state
    if not state.pool and _virsh("pool-info", "default").returncode == 0:
        _virsh("pool-destroy", "default")
        _virsh("pool-undefine", "default")
    if not state.libvirtd:
        _kill_pidfile(Path("/run/libvirtd.pid"))
    if not state.virtlogd:
        _kill_pidfile(Path("/run/virtlogd.pid"))
    if state.kvm_gid is not None and kvm.stat().st_gid != state.kvm_gid:
        os.chown(kvm, -1, state.kvm_gid)


def _serial_watchers(tmp_path: Path, started: float) -> list[VM]:
    """A VM (lab.vm) per doc VM that turns its libvirt serial log into the
    boot timeline; stale logs of an earlier run are removed first."""
    vms = []
    for name, firmware, serial, mac in DOC_VMS:
        log = SERIAL_DIR / f"{name}-serial.log"
        log.unlink(missing_ok=True)
        workdir = tmp_path / "vms" / name
        workdir.mkdir(parents=True)
        (workdir / "serial.log").symlink_to(log)
        vm = VM(name, firmware, mac, serial, "", workdir, started=started)
        vm.watch_console()
        vms.append(vm)
    return vms


def test_vagrantfile_validates_with_libvirt_provider(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant missing: run 'scripts/setup.sh system' (Debian's vagrant and "
                    "vagrant-libvirt)")
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(REPO / "Vagrantfile", good / "Vagrantfile")
    done = _validate(good, tmp_path / "home")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    text = (REPO / "Vagrantfile").read_text()
    assert "lv.cpus = 1" in text
    (bad / "Vagrantfile").write_text(text.replace("lv.cpus = 1", "lv.cpuz = 1"))
    done = _validate(bad, tmp_path / "home")
    assert done.returncode != 0
    assert "cpuz" in done.stdout + done.stderr


def _validate(project: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VAGRANT_HOME=str(home), VAGRANT_CWD=str(project),
               VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_CHECKPOINT_DISABLE="1")
    return subprocess.run(["vagrant", "validate"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


@pytest.mark.lab
@pytest.mark.timeout(PROCEDURE_TIMEOUT + 600)
def test_the_docs_vagrant_procedure_installs_a_bios_and_a_uefi_vm(
        lab_images: dict[str, Path], system_libvirt: HostState, tmp_path: Path) -> None:
    blocks = doc_blocks()
    assert len(blocks) == 6, "docs/lab.md's Vagrant section: six sh blocks expected"
    assert "vagrant up --provider=libvirt" in blocks[1] and "vagrant destroy -f" in blocks[5]
    domains = [d for d, *_ in DOC_VMS]
    if system_libvirt.libvirtd:
        assert _leftovers(domains) == [], \
            "a Vagrant lab of an earlier run is still defined: vagrant destroy -f it first"
    env = _env(tmp_path, CP_PORT=str(free_port()))
    started = time.monotonic()
    vms = _serial_watchers(tmp_path, started)
    log = tmp_path / "procedure.log"
    # the blocks as they are; between them only a line saying when each began
    script = "\n".join(f'echo "== block {i} at $SECONDS s"\n{block}'
                       for i, block in enumerate(blocks, 1))
    proc = _bash(script + 'echo "== done at $SECONDS s"\n', env, log)
    port67: set[str] = set()
    try:
        while proc.poll() is None and time.monotonic() - started < PROCEDURE_TIMEOUT:
            port67.update(h.split(" (pid")[0] for h in udp_port_holders(67))
            time.sleep(1)
        timed_out = proc.poll() is None
    finally:
        stop(proc)
        if proc.returncode != 0:
            _destroy(env)
        for vm in vms:
            vm.stop()
        print(f"\nvagrant lab: {time.monotonic() - started:.0f} s in all; "
              + ", ".join(re.findall(r"^== (.*)$", log.read_text(errors="replace"),
                                     re.MULTILINE)))
        for vm in vms:
            print(vm.timeline())
    out = log.read_text(errors="replace")
    assert not timed_out, f"the procedure took over {PROCEDURE_TIMEOUT} s:\n{out[-4000:]}"
    assert proc.returncode == 0, out[-4000:]
    # both installs succeeded: the doc's own report, and each VM's console
    assert "dc1/VAG-BIOS-01: succeeded" in out and "dc1/VAG-UEFI-02: succeeded" in out, \
        out[-4000:]
    for vm in vms:
        booted = vm.seen("disk-boot")
        assert booted and f"firmware {vm.firmware}" in booted.line, vm.describe()
        assert vm.seen("callback"), vm.describe()
        assert vm.seen("agent") and vm.seen("agent").at < booted.at  # type: ignore[union-attr]
    # libvirt's dnsmasq and the node held UDP 67 on the bridge at once
    assert {"dnsmasq", "lpmos"} <= port67, port67
    regional = (tmp_path / "lab" / "regional.log").read_text()
    assert re.search(r"dhcp: proxy mode on 0\.0\.0\.0 \(virbr\d+\) ports 67,4011", regional)
    # vagrant destroy left nothing of the lab
    assert _leftovers(domains) == []


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_each_uefi_vm_gets_its_own_nvram(system_libvirt: HostState, tmp_path: Path) -> None:
    domains = ["lpmos-uefi-01", "lpmos-uefi-02"]
    template = _sha256(OVMF_VARS)
    env = _env(tmp_path, LPMOS_VAGRANT_FIRMWARE="uefi,uefi", LPMOS_VAGRANT_DRIVER="qemu")
    # the doc's libvirt block, then two UEFI VMs
    proc = _bash(doc_blocks()[0] + "\nvagrant up --provider=libvirt --no-parallel\n", env,
                 tmp_path / "up.log")
    try:
        proc.wait(600)
        assert proc.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
        paths = []
        for name in domains:
            xml = _virsh("dumpxml", name).stdout
            found = re.search(r"<nvram[^>]*>([^<]+)</nvram>", xml)
            assert found, xml
            paths.append(Path(found.group(1)))
        assert paths == [NVRAM_DIR / f"{d}_VARS.fd" for d in domains]
        # each a file of its own, copied from the template, that its OVMF writes
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(
                p.exists() and _sha256(p) != template for p in paths):
            time.sleep(2)
        assert all(p.exists() and _sha256(p) != template for p in paths), \
            "OVMF did not write its variables within 300 s"
        assert os.stat(paths[0]).st_ino != os.stat(paths[1]).st_ino
        assert _sha256(OVMF_VARS) == template
    finally:
        stop(proc)
        done = subprocess.run(["vagrant", "destroy", "-f"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _leftovers(domains) == []
    assert _sha256(OVMF_VARS) == template
