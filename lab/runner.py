"""The QEMU network-boot lab: real firmware against the real regional node.

``with Lab(workdir) as lab:`` (root only) builds, and on exit removes:

* a network namespace ``lpmos-lab-<id>`` holding the lab segment: a bridge
  ``br0`` (10.77.0.1/24, fd77:77::1/64) where the regional node listens, one
  tap per VM, and a veth ``up0`` to the host (169.254.x.y/30) through which
  the node reaches etcd and the host reaches the node;
* a second namespace ``lpmos-lab-<id>-site`` for the site's DHCP server:
  dnsmasq on a veth into the bridge, handing out addresses only (no boot
  options, so the firmware follows our ProxyDHCP) and sending IPv6 router
  advertisements, without which iPXE waits ~13 s for IPv6 autoconfiguration;
* a private etcd on the host (loopback and the host end of the veth), unless
  endpoints are given;
* ``lpmos regional`` inside the lab namespace on br0 (real ports 67, 4011,
  69, 8081);
* QEMU VMs (:meth:`Lab.boot_vm`) with ``-accel tcg``: BIOS (SeaBIOS + the
  NIC's iPXE ROM) or UEFI (OVMF with the NIC ROM disabled, so the firmware's
  own PXE client fetches ``ipxe.efi`` over our TFTP), an empty virtual disk,
  an SMBIOS serial number and the serial console logged to a file that a
  watcher thread turns into a boot timeline (:data:`SERIAL_STAGES`).

Everything is torn down in ``__exit__`` (also after Ctrl-C or an exception):
processes by the PIDs we started, then the namespaces (which removes the
veths, taps and bridge with them).  :func:`cleanup_stale` removes what a lab
killed with SIGKILL left behind (namespaces whose owner PID is gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpmos.procs import pid_alive

REPO = Path(__file__).resolve().parent.parent
NS_PREFIX = "lpmos-lab-"
SUBNET = "10.77.0"
NODE_IP = f"{SUBNET}.1"
SITE_DHCP_IP = f"{SUBNET}.2"
NODE_IP6 = "fd77:77::1"
SITE_IP6 = "fd77:77::2"
HTTP_PORT = 8081

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

#: Boot stages read from a VM's serial console, in the order they happen.
#: Each is searched for only after the previous one matched, so the second
#: PXE boot after the install does not confuse the first; a stage whose line
#: never shows (another firmware's wording) is skipped when a later one does.
SERIAL_STAGES: tuple[tuple[str, str], ...] = (
    ("firmware", r"SeaBIOS|BdsDxe|UEFI|>>Start PXE"),
    ("pxe", r"iPXE \(http://ipxe\.org\)|Start PXE over IPv4|PXE-"),
    ("ipxe", r"iPXE initialising devices"),
    ("boot-script", r"/boot\.ipxe\.\.\. ok"),
    ("decision", r"^LPMOS \S+: "),
    ("kernel", r"Linux version"),
    ("agent", r"lpmos-live: starting agent"),
    ("registered", r"agent\.runner: registered as "),
    ("disk-boot", r"lab-os: booted from disk"),
    ("callback", r"lab-os: callback succeeded"),
)


class LabError(RuntimeError):
    """The lab could not be set up, or a stage did not arrive in time."""


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0,
         input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input_text, check=False)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} not found: run 'scripts/setup.sh system'") from None
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stderr_log(msg: str) -> None:
    sys.stderr.write(f"[lab] {msg}\n")
    sys.stderr.flush()


def _stop(proc: subprocess.Popen[bytes] | None, *, grace: float = 10.0) -> None:
    """SIGTERM our child's process group (started with start_new_session),
    SIGKILL after ``grace`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def cleanup_stale(log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Remove lab namespaces whose owning process (the PID in the name) is
    gone: what a lab killed with SIGKILL left.  Processes still inside such a
    namespace were started by that lab; they are killed by PID first."""
    done = _run(["ip", "netns", "list"], check=False)
    removed = []
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)(?:-\d+)?(?:-site)?", name)
        if not m or pid_alive(int(m.group(1))):
            continue
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
        log(f"removed stale lab namespace {name} ({len(pids)} processes)")
    return removed


@dataclass
class StageEvent:
    stage: str
    at: float            # seconds since the VM started
    line: str


@dataclass
class VM:
    """One QEMU machine of the lab; see :meth:`Lab.boot_vm`."""

    name: str
    firmware: str        # "bios" | "uefi"
    mac: str
    serial: str
    uuid: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    events: list[StageEvent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def mark(self, stage: str, detail: str = "") -> None:
        """Record a stage seen from outside the VM (e.g. through the API)."""
        with self._lock:
            self.events.append(StageEvent(stage, time.monotonic() - self.started, detail))

    def seen(self, stage: str) -> StageEvent | None:
        with self._lock:
            return next((e for e in self.events if e.stage == stage), None)

    def wait_for(self, stage: str, timeout: float) -> StageEvent:
        """Block until ``stage`` is in the timeline; on timeout raise
        :class:`LabError` with the serial console's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.seen(stage)
            if event is not None:
                return event
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"{self.name}: QEMU exited ({self.proc.returncode}) before "
                               f"stage {stage!r}\n{self.describe()}")
            time.sleep(0.2)
        raise LabError(f"{self.name}: stage {stage!r} did not arrive within {timeout:.0f} s"
                       f"\n{self.describe()}")

    def timeline(self) -> str:
        with self._lock:
            events = list(self.events)
        rows = [f"  {e.at:7.1f} s  {e.stage:<16} {e.line[:90]}" for e in events]
        return f"{self.name} ({self.firmware}, {self.serial}, {self.mac}):\n" + "\n".join(rows)

    def console_tail(self, lines: int = 80) -> str:
        try:
            text = self.serial_log.read_bytes().decode(errors="replace")
        except OSError:
            return "(no serial log)"
        text = re.sub(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1bc|\r", "", text)
        return "\n".join(text.splitlines()[-lines:])

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    def qemu_state(self) -> str:
        """What QEMU itself says of the machine: its run state (``running``,
        ``paused`` on an I/O error, ``shutdown``...) and where the CPU is.
        When a console falls silent this tells a firmware loop (running, the
        same RIP region) from a stopped machine."""
        try:
            replies = qmp_call(self.qmp_socket, [
                {"execute": "query-status"},
                {"execute": "human-monitor-command",
                 "arguments": {"command-line": "info registers"}}])
        except (OSError, ValueError) as exc:
            return f"(QMP unavailable: {exc})"
        status = replies[0].get("return", {})
        regs = str(replies[1].get("return", ""))
        words = regs.split()
        ip = next((w for w in words if w.startswith(("RIP=", "EIP="))), "IP=?")
        hlt = next((w for w in words if w.startswith("HLT=")), "HLT=?")
        return (f"QEMU: status {status.get('status', '?')}, running {status.get('running')}, "
                f"CPU0 {ip} {hlt}")

    def describe(self) -> str:
        return (f"{self.timeline()}\n{self.qemu_state()}\n"
                f"--- serial console of {self.name} (last lines) ---\n"
                f"{self.console_tail()}\n--- end of {self.name} ---")

    # -- the serial watcher --------------------------------------------------------------

    def _watch(self) -> None:
        offset = 0
        buffer = ""
        index = 0
        patterns = [(name, re.compile(rx)) for name, rx in SERIAL_STAGES]
        while not self._stop.is_set():
            try:
                with self.serial_log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(1 << 20)
            except OSError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                buffer += chunk.decode(errors="replace")
                lines = buffer.split("\n")
                buffer = lines.pop()[-4096:]
                for raw in lines:
                    line = re.sub(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1bc|\r", "", raw).strip()
                    # the first stage at or after the current one that this
                    # line shows (a stage the console never prints is skipped)
                    while True:
                        hit = next((j for j in range(index, len(patterns))
                                    if patterns[j][1].search(line)), None)
                        if hit is None:
                            break
                        self.mark(patterns[hit][0], line)
                        index = hit + 1
            else:
                time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        _stop(self.proc, grace=5.0)
        if self._watcher is not None:
            self._watcher.join(5)


class Lab:
    """The lab segment, its DHCP server, etcd and the regional node."""

    def __init__(self, workdir: Path, *, etcd_endpoints: Sequence[str] = (),
                 catalog: Path | None = None, node_args: Sequence[str] = (),
                 log: Callable[[str], None] | None = None, python: str = sys.executable,
                 memory_mb: int = 1024) -> None:
        self.workdir = Path(workdir)
        self.owner = os.getpid()
        self.lab_id = f"{self.owner}-{int(time.time() * 1000) % 100000}"
        self.ns = NS_PREFIX + self.lab_id
        self.site_ns = self.ns + "-site"
        index = (self.owner * 7 + int(time.time())) % 16000
        a, b = index // 64 + 1, (index % 64) * 4
        self.host_ip = f"169.254.{a}.{b + 1}"
        self.ns_ip = f"169.254.{a}.{b + 2}"
        self.host_if = f"lpl{hashlib.sha1(self.ns.encode()).hexdigest()[:10]}"  # noqa: S324
        self.etcd_endpoints = list(etcd_endpoints)
        self.catalog = catalog or REPO / "images" / "catalog.toml"
        self.node_args = list(node_args)
        self.log: Callable[[str], None] = log or _stderr_log
        self.python = python
        self.memory_mb = memory_mb
        self.vms: list[VM] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created_ns: list[str] = []
        self._old_handlers: dict[int, Any] = {}
        self.etcd_proc: subprocess.Popen[bytes] | None = None
        self.node_proc: subprocess.Popen[bytes] | None = None
        self.dnsmasq_proc: subprocess.Popen[bytes] | None = None
        self.etcd_url = ""            # as seen from the host
        self.node_url = f"http://{NODE_IP}:{HTTP_PORT}"

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, taps, ports 67/69)")
        for tool in ("ip", "dnsmasq", "qemu-system-x86_64"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} not found: run 'scripts/setup.sh system'")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cleanup_stale(self.log)
        # SIGTERM/SIGHUP unwind like Ctrl-C, so __exit__ removes everything
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, _raise_exit)
        try:
            self._network()
            self._dnsmasq()
            self._etcd()
            self._node()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every VM and process we started, remove the namespaces."""
        for vm in self.vms:
            vm.stop()
        for proc in (self.node_proc, self.dnsmasq_proc, *self._procs, self.etcd_proc):
            _stop(proc)
        for ns in reversed(self._created_ns):
            # processes we did not start cannot be in a namespace we created,
            # but a VM's helper could linger: the namespace goes regardless
            _run(["ip", "netns", "del", ns], check=False)
        self._created_ns.clear()
        _run(["ip", "link", "del", self.host_if], check=False)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- the pieces ---------------------------------------------------------------------------

    def _ns(self, ns: str, *cmd: str) -> None:
        _run(["ip", "-n", ns, *cmd])

    def _network(self) -> None:
        for ns in (self.ns, self.site_ns):
            _run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            self._ns(ns, "link", "set", "lo", "up")
        self._ns(self.ns, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0")
        self._ns(self.ns, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        self._ns(self.ns, "addr", "add", f"{NODE_IP6}/64", "dev", "br0", "nodad")
        self._ns(self.ns, "link", "set", "br0", "up")
        # the site DHCP server's leg on the bridge
        self._ns(self.ns, "link", "add", "site0", "type", "veth", "peer", "name", "eth0",
                 "netns", self.site_ns)
        self._ns(self.ns, "link", "set", "site0", "master", "br0", "up")
        self._ns(self.site_ns, "addr", "add", f"{SITE_DHCP_IP}/24", "dev", "eth0")
        self._ns(self.site_ns, "addr", "add", f"{SITE_IP6}/64", "dev", "eth0", "nodad")
        self._ns(self.site_ns, "link", "set", "eth0", "up")
        # the uplink to the host: etcd and the control plane live there
        _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "up0",
              "netns", self.ns])
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        self._ns(self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", "up0")
        self._ns(self.ns, "link", "set", "up0", "up")
        self.log(f"lab segment {SUBNET}.0/24 on br0 in namespace {self.ns}; "
                 f"uplink {self.host_if} {self.host_ip} <-> {self.ns_ip}")

    def _spawn(self, cmd: Sequence[str], logname: str, *, ns: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        logf = (self.workdir / logname).open("ab")
        proc = subprocess.Popen(full, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env=env, cwd=REPO)
        logf.close()
        return proc

    def _dnsmasq(self) -> None:
        leases = self.workdir / "dnsmasq.leases"
        leases.touch()
        self.dnsmasq_proc = self._spawn([
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--user=root", "--group=root", "--interface=eth0", "--bind-interfaces",
            f"--dhcp-range={SUBNET}.100,{SUBNET}.199,255.255.255.0,1h",
            "--dhcp-option=3", "--dhcp-option=6",       # no router, no DNS: address only
            f"--dhcp-leasefile={leases}", "--dhcp-authoritative", "--log-dhcp",
            "--enable-ra", "--dhcp-range=::,constructor:eth0,ra-only,64,1h",
            "--ra-param=eth0,high,10,0", "--log-facility=-",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
        ], "dnsmasq.log", ns=self.site_ns)
        time.sleep(0.3)
        if self.dnsmasq_proc.poll() is not None:
            raise LabError("dnsmasq exited at start:\n" + self._tail("dnsmasq.log"))

    def _etcd(self) -> None:
        if self.etcd_endpoints:
            self.etcd_url = self.etcd_endpoints[0]
            return
        from lpmos.store.embedded import free_port, start_etcd

        port = free_port()
        urls = f"http://127.0.0.1:{port},http://{self.host_ip}:{port}"
        self.etcd_proc, self.etcd_url = start_etcd(
            self.workdir / "etcd" / "data", client_port=port, log_path=self.workdir / "etcd.log",
            extra_args=["--listen-client-urls", urls, "--advertise-client-urls", urls])
        self.etcd_endpoints = [self.etcd_url]
        self.log(f"etcd at {self.etcd_url} (lab side http://{self.host_ip}:{port})")

    def node_etcd_endpoints(self) -> list[str]:
        """etcd endpoints as the node in the namespace reaches them."""
        return [re.sub(r"//(127\.0\.0\.1|localhost):", f"//{self.host_ip}:", u)
                for u in self.etcd_endpoints]

    def _node(self) -> None:
        cmd = [self.python, "-m", "lpmos", "regional", "--idc", "dc1", "--node-name", "lab",
               "--state-dir", str(self.workdir / "node"),
               "--etcd-endpoints", ",".join(self.node_etcd_endpoints()),
               "--interface", "br0", "--catalog", str(self.catalog),
               "--http-port", str(HTTP_PORT), *self.node_args]
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.node_proc = self._spawn(cmd, "node.log", ns=self.ns, env=env)
        deadline = time.monotonic() + 60
        while True:
            if self.node_proc.poll() is not None:
                raise LabError(f"lpmos regional exited ({self.node_proc.returncode}):\n"
                               + self._tail("node.log"))
            status = self.node_health()
            if status in ("ok", "degraded"):
                break
            if time.monotonic() > deadline:
                raise LabError("lpmos regional did not become healthy in 60 s:\n"
                               + self._tail("node.log"))
            time.sleep(0.3)
        self.log(f"regional node up at {self.node_url} (from the host via {self.ns_ip})")

    def node_health(self) -> str | None:
        """The node's /healthz status, fetched from inside the namespace."""
        done = _run(["ip", "netns", "exec", self.ns, "curl", "-fsS", "-m", "2",
                     f"{self.node_url}/healthz"], check=False, timeout=10)
        try:
            return str(json.loads(done.stdout).get("status"))
        except ValueError:
            return None

    def _tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.workdir / name).read_text(errors="replace")
                             .splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start_process(self, cmd: Sequence[str], logname: str, *,
                      env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A host-side helper process (the control plane) stopped with the lab."""
        proc = self._spawn(cmd, logname, env=env)
        self._procs.append(proc)
        return proc

    # -- VMs -------------------------------------------------------------------------------------

    def boot_vm(self, name: str, *, firmware: str = "bios", serial: str | None = None,
                disk_gb: int = 2, memory_mb: int | None = None,
                disk_first: bool | None = None) -> VM:
        """Start one VM that network-boots; returns at once (see VM.wait_for).

        Boot order: BIOS VMs try the network first and leave to the disk when
        the node says so (iPXE ``sanboot``).  UEFI VMs try the disk first
        (``disk_first``, default for UEFI), as a real UEFI machine does after
        an OS installer put its boot entry in front: the blank disk is
        skipped so the first boot is PXE, and after the install OVMF boots
        the disk instead of walking its other network options (PXE over
        IPv6, HTTP boot) for minutes after iPXE exits.
        """
        if firmware not in ("bios", "uefi"):
            raise ValueError("firmware: bios or uefi")
        if disk_first is None:
            disk_first = firmware == "uefi"
        net_index, disk_index = (2, 1) if disk_first else (1, 2)
        n = len(self.vms)
        mac = f"52:54:00:77:{(self.owner >> 8) & 0xff:02x}:{(n + 1) & 0xff:02x}"
        serial = serial or f"LAB-{firmware.upper()}-{n + 1:02d}"
        vm_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.lab_id}.{name}.lpmos.lab"))
        vmdir = self.workdir / "vms" / name
        vmdir.mkdir(parents=True, exist_ok=True)
        vm = VM(name, firmware, mac, serial, vm_uuid, vmdir)
        tap = f"tap{n}"
        self._ns(self.ns, "tuntap", "add", "dev", tap, "mode", "tap")
        self._ns(self.ns, "link", "set", tap, "master", "br0", "up")
        disk = vmdir / "disk.img"
        with disk.open("wb") as fh:
            fh.truncate(disk_gb << 30)
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-name", name, "-m",
               str(memory_mb or self.memory_mb), "-smp", "1", "-nographic",
               "-monitor", "none", "-serial", f"file:{vm.serial_log}",
               "-qmp", f"unix:{vm.qmp_socket},server=on,wait=off",
               "-smbios", f"type=1,manufacturer=LPMOS,product=lab-vm,serial={serial}",
               "-uuid", vm_uuid,
               "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
               "-drive", f"file={disk},if=none,id=d0,format=raw,cache=unsafe",
               "-device", f"virtio-blk-pci,drive=d0,bootindex={disk_index}"]
        if firmware == "uefi":
            vars_fd = vmdir / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, vars_fd)
            cmd += ["-machine", "q35",
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
                    # romfile= (empty): no iPXE ROM, OVMF's own PXE client boots
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=,"
                               f"bootindex={net_index}"]
        else:
            # QEMU's default ROM for the NIC: Debian's ipxe-qemu (efi-virtio.rom).
            # (An explicit romfile= path silently loads no ROM with this QEMU.)
            cmd += ["-machine", "pc",
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac},bootindex={net_index}"]
        vm.started = time.monotonic()
        vm.proc = self._spawn(cmd, f"vms/{name}/qemu.log", ns=self.ns)
        vm._watcher = threading.Thread(target=vm._watch, name=f"serial-{name}", daemon=True)
        vm._watcher.start()
        self.vms.append(vm)
        self.log(f"VM {name}: {firmware}, serial {serial}, MAC {mac}, console {vm.serial_log}")
        return vm


def qmp_call(path: Path, commands: Sequence[dict[str, Any]], *,
             timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``commands`` to a QEMU QMP socket and return one reply each
    (asynchronous events in between are skipped)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise OSError("QMP closed the connection")
                msg = json.loads(line)
                if "event" not in msg:
                    return dict(msg)

        reply()                                            # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        out = []
        for command in commands:
            sock.sendall(json.dumps(command).encode() + b"\n")
            out.append(reply())
        return out


def http_json(method: str, url: str, body: Any = None, *, token: str | None = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    """A small JSON client for the control-plane API (no dependency)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


@contextlib.contextmanager
def control_plane(lab: Lab, *, port: int, listen: str = "127.0.0.1",
                  extra: Sequence[str] = ()) -> Iterator[str]:
    """``lpmos control-plane`` on the host against the lab's etcd; yields its URL."""
    cmd = [lab.python, "-m", "lpmos", "control-plane", "--listen", f"{listen}:{port}",
           "--etcd-endpoints", ",".join(lab.etcd_endpoints),
           "--state-dir", str(lab.workdir / "control-plane"), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = lab.start_process(cmd, "control-plane.log", env=env)
    host = "127.0.0.1" if listen in ("0.0.0.0", "") else listen
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise LabError("lpmos control-plane exited:\n" + lab._tail("control-plane.log"))
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise LabError("lpmos control-plane did not become healthy in 60 s:\n"
                           + lab._tail("control-plane.log"))
        time.sleep(0.3)
    try:
        yield url
    finally:
        _stop(proc)
