"""Real BMCs for the power tests: libvirt TCG domains behind the emulators
Ironic's CI uses, sushy-tools (Redfish, libvirt driver) and virtualbmc
(IPMI).

:class:`PowerLab` starts, in a private directory under ``/tmp``:

* ``virtlogd`` and ``libvirtd`` as the unprivileged user ``nobody`` in
  session mode (``XDG_RUNTIME_DIR`` in that directory), so they share
  nothing with a system libvirt (there is no systemd here to start one)
  and the tests reach them at ``qemu+unix:///session?socket=...``;
* ``sushy-emulator --config`` on a free loopback port, with an htpasswd
  file (bcrypt), so a wrong password gets the 401 a real BMC gives;
* ``vbmcd`` with its own config (ZMQ port, state directory), through
  :data:`VBMCD_LAUNCHER` (see there), and ``vbmc add/start`` per domain on
  a free loopback UDP port.

Every process is stopped by its PID (its process group for vbmcd, whose
BMCs are child processes) and every domain is destroyed and undefined in
:meth:`PowerLab.close`.  Domains are ``<domain type='qemu'>`` (TCG), 32 MiB,
no disk, one user-mode e1000 NIC (sushy-tools refuses a PXE boot source for a
domain without a NIC).

For machines that really network-boot (``tests/lab/test_lab_bmc.py``) the
lab runs inside a :class:`lab.runner.Lab` segment: ``PowerLab(netns=...,
bmc_address=...)`` starts libvirtd in the lab's network namespace, so its
QEMU processes are there too, and :meth:`PowerLab.define` with a
:class:`Machine` gives the domain a raw disk, a virtio NIC on a tap of the
lab's bridge (``<interface type='ethernet'>`` on a tap created for the lab
user, ``managed='no'``), an SMBIOS serial number and its serial console in
a file.  An unprivileged libvirtd opens that tap through ``/dev/net/tun``,
which is root's alone on this machine (no udev rule makes it 0666): libvirtd
gets a private ``/dev/net`` (a tmpfs holding a ``tun`` node owned by the lab
user) in the mount namespace ``ip netns exec`` already gives it, so nothing
on the host changes.  The emulators listen on ``bmc_address`` (the host end
of the lab's uplink, which the regional node in the namespace reaches: its
BMC network) and reach libvirtd by its Unix socket, which no network
namespace divides.  :meth:`PowerLab.watch_events` records libvirt's own
timestamped domain events (``virsh event``): when a BMC started, reset or
stopped a machine, seen from the hypervisor rather than from our node.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import requests

from lpmos.store.embedded import free_port

VENV_BIN = Path(sys.executable).parent
LAB_USER = "nobody"

#: vbmcd with one fix to its IPMI server (pyghmi 1.6's ServerSession): it
#: answers an RMCP+ open-session request for cipher suite 17 (SHA-256, the
#: suite pyghmi's own client asks first) with the SHA-1 suite 3 and status
#: 0, which the client does not check, so the RAKP exchange then fails with
#: a struct.error.  A BMC is to refuse an algorithm it lacks (IPMI 2.0,
#: table 13-15, status 0x11); with that answer the client falls back to
#: suite 3 as it does against real BMCs.  The fix is the emulator's; the
#: project's driver is unchanged.
VBMCD_LAUNCHER = '''
import sys
from pyghmi.ipmi.private import serversession

_open = serversession.ServerSession.create_open_session_response


def create_open_session_response(self, request):
    if len(request) >= 13 and request[12] != 1:     # an auth algorithm other than HMAC-SHA1
        return bytearray([request[0], 0x11, 0, 0]) + bytearray(request[4:8])
    return _open(self, request)


serversession.ServerSession.create_open_session_response = create_open_session_response
from virtualbmc.cmd.vbmcd import main
sys.exit(main(sys.argv[1:]))
'''

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <interface type='user'><model type='e1000'/></interface>
  </devices>
</domain>
"""


#: a domain that network-boots on a lab segment (:class:`Machine`): SeaBIOS
#: on the serial console (``useserial``), the virtio NIC's iPXE ROM (QEMU's
#: default, as the QEMU lab's BIOS VMs), and the boot order of
#: :attr:`Machine.boot` (libvirt makes it strict: a device left out is not
#: booted, nor even given to the BIOS as a drive)
MACHINE_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <sysinfo type='smbios'>
    <system><entry name='manufacturer'>LPMOS</entry><entry name='product'>lab-vm</entry>
      <entry name='serial'>{serial}</entry></system>
  </sysinfo>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}<smbios mode='sysinfo'/>
    <bios useserial='yes'/></os>
  <on_reboot>restart</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw' cache='unsafe'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='ethernet'><mac address='{mac}'/><target dev='{tap}' managed='no'/>
      <model type='virtio'/></interface>
    <serial type='file'><source path='{serial_log}' append='on'/><target port='0'/></serial>
  </devices>
</domain>
"""

#: ``2026-12-04 18:41:06.602+0000: event 'reboot' for domain 'x'`` (virsh event --timestamp)
_EVENT_RE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+[+-]\d{4}): event '([a-z-]+)' "
                       r"for domain '([^']+)'(?:: (.*))?")


class LabUnavailable(RuntimeError):
    """libvirtd or an emulator cannot run here; the message says why."""


def missing_tools() -> list[str]:
    need = {"libvirtd": shutil.which("libvirtd") or "/usr/sbin/libvirtd",
            "virtlogd": shutil.which("virtlogd") or "/usr/sbin/virtlogd",
            "virsh": shutil.which("virsh") or "", "qemu-system-x86_64":
            shutil.which("qemu-system-x86_64") or "",
            "sushy-emulator": str(VENV_BIN / "sushy-emulator"),
            "vbmc": str(VENV_BIN / "vbmc")}
    return [name for name, path in need.items() if not path or not Path(path).exists()]


def lpmos_cli(url: str, token: str, *args: str, stdin: str | None = None,
              ) -> subprocess.CompletedProcess[str]:
    """``lpmos ARGS --url URL --token TOKEN`` as an operator types it, with
    no profile or ``LPMOS_*`` setting of this environment in the way."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env["LPMOS_CLIENT_CONFIG"] = "/nonexistent/lpmos-profiles.toml"
    return subprocess.run([sys.executable, "-m", "lpmos", *args, "--url", url, "--token", token],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120,
                          check=False)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(fn: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if fn():  # type: ignore[operator]
                return
        except (OSError, requests.RequestException, subprocess.SubprocessError):
            pass
        time.sleep(0.1)
    raise LabUnavailable(f"{what} not up within {timeout:g} s")


@dataclass(frozen=True)
class Machine:
    """What a domain that network-boots has (see :data:`MACHINE_XML`): a tap
    of the lab's bridge (owned by :data:`LAB_USER`), its MAC, a raw disk of
    ``disk_gb`` GiB and the SMBIOS serial number; files live in ``workdir``."""

    tap: str
    mac: str
    serial: str
    workdir: Path
    disk_gb: int = 2
    memory_mb: int = 1024
    #: the boot order.  ``("hd",)``: the disk alone, so a blank disk boots
    #: nothing and only a BMC's PXE override (sushy-tools puts the NIC first
    #: and keeps the disk after it) reaches the network, as on a machine
    #: whose disk holds an OS.  virtualbmc cannot serve that: it makes a
    #: one-time PXE boot permanent and the network the only device, which a
    #: started domain then keeps, so that its disk is gone for good; behind
    #: it a machine boots ``("network", "hd")``, as many BIOS servers do, and
    #: its reset (IPMI's power cycle of a machine that is on) keeps that order.
    boot: tuple[str, ...] = ("hd",)

    @property
    def disk(self) -> Path:
        return self.workdir / "disk.img"

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"


@dataclass(frozen=True)
class DomainEvent:
    """One libvirt domain event: when (epoch seconds, libvirt's clock), the
    kind (``lifecycle``, ``reboot``...) and its detail (``Started Booted``)."""

    at: float
    kind: str
    detail: str


@dataclass
class Domain:
    name: str
    uuid: str
    ipmi_port: int = 0
    machine: Machine | None = None


@dataclass
class PowerLab:
    user: str = "admin"
    password: str = field(default_factory=lambda: "pw-" + uuid.uuid4().hex[:12])
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lpmos-power-")))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    domains: list[Domain] = field(default_factory=list)
    sushy_port: int = 0
    vbmc_port: int = 0
    #: the network namespace libvirtd (and so every domain) runs in; "": the host's
    netns: str = ""
    #: where sushy-emulator and the vbmc BMCs listen
    bmc_address: str = "127.0.0.1"

    # -- where things are
    @property
    def runtime(self) -> Path:
        return self.root / "run"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.runtime}/libvirt/libvirt-sock"

    @property
    def redfish_url(self) -> str:
        return f"http://{self.bmc_address}:{self.sushy_port}"

    def _lab_env(self) -> dict[str, str]:
        home = self.root / "home"
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
                "XDG_RUNTIME_DIR": str(self.runtime),
                "XDG_CONFIG_HOME": str(home / ".config"),
                "XDG_CACHE_HOME": str(home / ".cache")}

    def _vbmc_env(self) -> dict[str, str]:
        return {**os.environ, "VIRTUALBMC_CONFIG": str(self.root / "vbmc.conf")}

    # -- start
    def start(self) -> PowerLab:
        missing = missing_tools()
        if missing:
            raise LabUnavailable("missing: " + ", ".join(missing) + " (scripts/setup.sh "
                                 "installs libvirt-daemon-system, libvirt-clients and the dev "
                                 "extra's sushy-tools and virtualbmc)")
        try:
            self._start_libvirt()
            self._start_sushy()
            self._start_vbmcd()
        except BaseException:
            self.close()
            raise
        return self

    def _start_libvirt(self) -> None:
        entry = pwd.getpwnam(LAB_USER)
        self.root.chmod(0o755)
        for sub in ("run", "home"):
            (self.root / sub).mkdir(mode=0o700)
            os.chown(self.root / sub, entry.pw_uid, entry.pw_gid)
        as_lab = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                  "--clear-groups"]
        for daemon in ("virtlogd", "libvirtd"):
            pid_file = self.runtime / f"{daemon}.pid"
            cmd = [*as_lab, daemon, "-d", "--pid-file", str(pid_file)]
            if daemon == "libvirtd" and self.netns:
                cmd = self._in_netns(cmd, entry.pw_uid, entry.pw_gid)
            log = (self.root / f"{daemon}.out").open("wb")
            with log:
                done = subprocess.run(cmd, env=self._lab_env(), stdout=log, stderr=log,
                                      cwd=self.root, timeout=30, check=False)
            if done.returncode != 0:
                raise LabUnavailable(f"{daemon} did not start (exit {done.returncode}): "
                                     + (self.root / f"{daemon}.out").read_text()[-500:])
            _wait(lambda f=pid_file: f.exists() and f.read_text().strip(), 15,
                  f"{daemon}'s pid file")
            self.pids[daemon] = int(pid_file.read_text().strip())
        _wait(lambda: self.virsh("version").returncode == 0, 30, "libvirtd")

    def _in_netns(self, cmd: list[str], uid: int, gid: int) -> list[str]:
        """``cmd`` in the lab's network namespace with a private ``/dev/net``
        whose ``tun`` the lab user may open (see the module docstring): the
        mounts stay in the mount namespace ``ip netns exec`` makes."""
        script = ("mount -t tmpfs -o mode=755,size=64k lpmos-tun /dev/net && "
                  "mknod -m 600 /dev/net/tun c 10 200 && "
                  f"chown {uid}:{gid} /dev/net/tun && exec \"$@\"")
        return ["ip", "netns", "exec", self.netns, "sh", "-c", script, "sh", *cmd]

    def _start_sushy(self) -> None:
        import bcrypt

        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(4)).decode()
        (self.root / "htpasswd").write_text(f"{self.user}:{hashed}\n")
        self.sushy_port = free_port()
        (self.root / "sushy-state").mkdir(exist_ok=True)
        (self.root / "sushy.conf").write_text(
            f"SUSHY_EMULATOR_LISTEN_IP = '{self.bmc_address}'\n"
            f"SUSHY_EMULATOR_LISTEN_PORT = {self.sushy_port}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = '{self.root / 'htpasswd'}'\n"
            f"SUSHY_EMULATOR_LIBVIRT_URI = '{self.uri}'\n"
            # its sqlite state in our directory, not a shared /tmp/sushy-emulator
            f"SUSHY_EMULATOR_STATE_DIR = '{self.root / 'sushy-state'}'\n")
        self._spawn("sushy", [str(VENV_BIN / "sushy-emulator"), "--config",
                              str(self.root / "sushy.conf")])
        _wait(lambda: requests.get(self.redfish_url + "/redfish/v1/", timeout=2).status_code
              in (200, 401), 30, "sushy-emulator")

    def _start_vbmcd(self) -> None:
        self.vbmc_port = free_port()
        state = self.root / "vbmc"
        state.mkdir()
        (self.root / "vbmc.conf").write_text(
            f"[default]\nconfig_dir = {state}\npid_file = {state}/vbmcd.pid\n"
            f"server_port = {self.vbmc_port}\nserver_response_timeout = 10000\n"
            f"[log]\nlogfile = {state}/vbmcd.log\n")
        launcher = self.root / "vbmcd_launcher.py"
        launcher.write_text(VBMCD_LAUNCHER)
        self._spawn("vbmcd", [sys.executable, str(launcher), "--foreground"],
                    env=self._vbmc_env())
        _wait(lambda: self.vbmc("list").returncode == 0, 30, "vbmcd")

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with (self.root / f"{name}.out").open("ab") as log:
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                env=env, cwd=self.root,
                                                start_new_session=True)

    # -- clients
    def virsh(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    def vbmc(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "vbmc"), *args], capture_output=True, text=True,
                              env=self._vbmc_env(), timeout=30, check=False)

    def define(self, *, ipmi: bool = False, machine: Machine | None = None) -> Domain:
        """A new domain, off; ``ipmi``: with a vbmc BMC of its own.  With a
        ``machine`` it has a disk (created here, sparse, owned by the lab
        user) and a NIC on the machine's tap (the caller's:
        :meth:`lab.runner.Lab.add_tap`)."""
        dom = Domain(f"lpmos-pw-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()), machine=machine)
        xml = self.root / f"{dom.name}.xml"
        if machine is None:
            xml.write_text(DOMAIN_XML.format(name=dom.name, uuid=dom.uuid))
        else:
            xml.write_text(self._machine_xml(dom, machine))
        done = self.virsh("define", str(xml))
        if done.returncode != 0:
            raise LabUnavailable(f"virsh define: {done.stderr.strip()}")
        self.domains.append(dom)
        if ipmi:
            dom.ipmi_port = free_udp_port()
            for args in (("add", dom.name, "--port", str(dom.ipmi_port), "--address",
                          self.bmc_address, "--username", self.user, "--password", self.password,
                          "--libvirt-uri", self.uri), ("start", dom.name)):
                done = self.vbmc(*args)
                if done.returncode != 0:
                    raise LabUnavailable(f"vbmc {args[0]}: {done.stderr.strip()[-300:]}")
        return dom

    def _machine_xml(self, dom: Domain, machine: Machine) -> str:
        entry = pwd.getpwnam(LAB_USER)
        machine.workdir.mkdir(parents=True, exist_ok=True)
        with machine.disk.open("wb") as fh:
            fh.truncate(machine.disk_gb << 30)
        machine.serial_log.touch()
        for path in (machine.workdir, machine.disk, machine.serial_log):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return MACHINE_XML.format(name=dom.name, uuid=dom.uuid, memory_mb=machine.memory_mb,
                                  serial=machine.serial, disk=machine.disk, mac=machine.mac,
                                  tap=machine.tap, serial_log=machine.serial_log,
                                  boot="".join(f"<boot dev='{d}'/>" for d in machine.boot))

    # -- what libvirt saw
    def watch_events(self) -> None:
        """Record every domain event with libvirt's timestamp from now on
        (``virsh event --all --loop --timestamp``; read by :meth:`events`)."""
        self._spawn("events", ["virsh", "-c", self.uri, "event", "--all", "--loop",
                               "--timestamp"])

    def events(self, dom: Domain) -> list[DomainEvent]:
        """``dom``'s events recorded so far, oldest first."""
        try:
            text = (self.root / "events.out").read_text(errors="replace")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            m = _EVENT_RE.fullmatch(line.strip())
            if m and m.group(3) == dom.name:
                at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f%z").timestamp()
                out.append(DomainEvent(at, m.group(2), m.group(4) or ""))
        return out

    def state(self, dom: Domain) -> str:
        return self.virsh("domstate", dom.name).stdout.strip()

    def xml(self, dom: Domain) -> str:
        """The domain's persistent definition: the emulators change it, and
        a running domain takes it at its next start."""
        return self.virsh("dumpxml", "--inactive", dom.name).stdout

    def system_path(self, dom: Domain) -> str:
        return f"/redfish/v1/Systems/{dom.uuid}"

    def redfish_system(self, dom: Domain) -> dict[str, object]:
        r = requests.get(self.redfish_url + self.system_path(dom),
                         auth=(self.user, self.password), timeout=10)
        r.raise_for_status()
        data: dict[str, object] = r.json()
        return data

    # -- stop
    def close(self) -> None:
        for dom in self.domains:
            if dom.ipmi_port:
                with contextlib.suppress(Exception):
                    self.vbmc("delete", dom.name)
            with contextlib.suppress(Exception):
                self.virsh("destroy", dom.name, timeout=15)
            with contextlib.suppress(Exception):
                self.virsh("undefine", dom.name, timeout=15)
        self.domains.clear()
        for name in ("events", "vbmcd", "sushy"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)   # vbmcd's BMCs are its children
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for name in ("libvirtd", "virtlogd"):
            pid = self.pids.pop(name, 0)
            if pid:
                kill_pid(pid)
        shutil.rmtree(self.root, ignore_errors=True)


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM to ``pid`` (one we started), SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
