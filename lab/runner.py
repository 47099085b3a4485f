"""The QEMU network-boot lab: real firmware against the real regional node.

``with Lab(workdir) as lab:`` (root only) builds, and on exit removes:

* a network namespace ``lpmos-lab-<id>`` holding the lab segment: a bridge
  ``br0`` (10.77.0.1/24, fd77:77::1/64) where the regional node listens, one
  tap per VM, and a veth ``up0`` to the host (169.254.x.y/30) through which
  the node reaches etcd and the host reaches the node;
* a second namespace ``lpmos-lab-<id>-site`` for the site's DHCP server:
  dnsmasq on a veth into the bridge, handing out addresses only (no boot
  options, so the firmware follows our ProxyDHCP) and sending IPv6 router
  advertisements, without which iPXE waits ~13 s for IPv6 autoconfiguration
  (``ipv6_only``: no IPv4 on the segment at all; radvd is the site's router
  there, its advertisements' managed flag sends the firmware and iPXE to
  the node's DHCPv6, ``--dhcp6-mode full``);
* a private etcd on the host (loopback and the host end of the veth), unless
  endpoints are given;
* ``lpmos regional`` inside the lab namespace on br0 (real ports 67, 4011,
  69, 8081);
* QEMU VMs (:meth:`Lab.boot_vm`) with ``-accel tcg``: BIOS (SeaBIOS + the
  NIC's iPXE ROM) or UEFI (OVMF with the NIC ROM disabled, so the firmware's
  own PXE client fetches ``ipxe.efi`` over our TFTP), an empty virtual disk,
  an SMBIOS serial number and the serial console logged to a file that a
  watcher thread turns into a boot timeline (:data:`lab.vm.SERIAL_STAGES`).

Everything is torn down in ``__exit__`` (also after Ctrl-C or an exception):
processes by the PIDs we started, then the namespaces (which removes the
veths, taps and bridge with them).  :func:`cleanup_stale` removes what a lab
killed with SIGKILL left behind (namespaces whose owner PID is gone).

This module is the lab itself; a VM and its timeline are :mod:`lab.vm`,
running tools and stopping children :mod:`lab.process`, the JSON client of
the control-plane API :mod:`lab.client` (re-exported here for the tests
and ``lpmos demo``).
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
from pathlib import Path
from typing import Any

from lab.arm64 import arm64_vm_command
from lab.client import http_json
from lab.process import LabError, run, stop
from lab.vm import VM
from lpmos.procs import pid_alive

__all__ = ["VM", "Lab", "LabError", "cleanup_stale", "control_plane", "http_json"]

REPO = Path(__file__).resolve().parent.parent
NS_PREFIX = "lpmos-lab-"
SUBNET = "10.77.0"
NODE_IP = f"{SUBNET}.1"
SITE_DHCP_IP = f"{SUBNET}.2"
NODE_IP6 = "fd77:77::1"
SITE_IP6 = "fd77:77::2"
PREFIX6 = "fd77:77::/64"
#: the addresses the node's DHCPv6 hands out on an IPv6-only segment
RANGE6 = "fd77:77::100-fd77:77::1ff"
HTTP_PORT = 8081

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
#: Secure Boot: the SMM build of OVMF and a variable store with Microsoft's
#: keys enrolled (it verifies shim, which is signed by Microsoft's UEFI CA)
OVMF_CODE_SB = Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd")
OVMF_VARS_SB = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _stderr_log(msg: str) -> None:
    sys.stderr.write(f"[lab] {msg}\n")
    sys.stderr.flush()


def cleanup_stale(log: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Remove lab namespaces whose owning process (the PID in the name) is
    gone: what a lab killed with SIGKILL left.  Processes still inside such a
    namespace were started by that lab; they are killed by PID first."""
    done = run(["ip", "netns", "list"], check=False)
    removed = []
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(re.escape(NS_PREFIX) + r"(\d+)(?:-\d+)?(?:-site)?", name)
        if not m or pid_alive(int(m.group(1))):
            continue
        pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        run(["ip", "netns", "del", name], check=False)
        removed.append(name)
        log(f"removed stale lab namespace {name} ({len(pids)} processes)")
    return removed


class Lab:
    """The lab segment, its DHCP server, etcd and the regional node.

    ``http_port`` is the node's boot HTTP port (80 for a node that boots
    Secure Boot machines through GRUB, which knows no other port).  Without
    ``site_dhcp`` the site's dnsmasq only sends router advertisements and
    the node is the segment's DHCP server (``--dhcp-mode full``), as GRUB
    2.06 needs: it reads its server from the DHCP ACK and ignores
    ProxyDHCP offers.

    ``ipv6_only``: the segment has no IPv4 at all (no address on br0, no
    DHCPv4 anywhere); radvd in the site namespace advertises ``PREFIX6``
    with the managed flag, and the node boots machines by DHCPv6 (full
    mode), TFTP and boot HTTP on ``[NODE_IP6]`` (``--listen ::``).  The
    node still reaches etcd over the IPv4 uplink, which is no part of the
    segment."""

    _instances = 0

    def __init__(self, workdir: Path, *, etcd_endpoints: Sequence[str] = (),
                 catalog: Path | None = None, node_args: Sequence[str] = (),
                 log: Callable[[str], None] | None = None, python: str = sys.executable,
                 memory_mb: int = 1024, http_port: int = HTTP_PORT,
                 site_dhcp: bool = True, ipv6_only: bool = False) -> None:
        self.workdir = Path(workdir)
        self.owner = os.getpid()
        Lab._instances += 1       # two labs of one process in one second stay apart
        self.lab_id = f"{self.owner}-{(int(time.time() * 1000) + Lab._instances) % 100000}"
        self.ns = NS_PREFIX + self.lab_id
        self.site_ns = self.ns + "-site"
        index = (self.owner * 7 + int(time.time()) + Lab._instances * 131) % 16000
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
        self._taps = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created_ns: list[str] = []
        self._old_handlers: dict[int, Any] = {}
        self.etcd_proc: subprocess.Popen[bytes] | None = None
        self.node_proc: subprocess.Popen[bytes] | None = None
        self.dnsmasq_proc: subprocess.Popen[bytes] | None = None
        self.radvd_proc: subprocess.Popen[bytes] | None = None
        self.etcd_url = ""            # as seen from the host
        self.http_port = http_port
        self.ipv6_only = ipv6_only
        self.site_dhcp = site_dhcp and not ipv6_only
        if ipv6_only:
            self.node_args += ["--listen", "::", "--dhcp-mode", "off", "--dhcp6-mode", "full",
                               "--dhcp6-range", RANGE6]
        elif not site_dhcp:
            self.node_args += ["--dhcp-mode", "full",
                               "--dhcp-range", f"{SUBNET}.100-{SUBNET}.199"]
        host = f"[{NODE_IP6}]" if ipv6_only else NODE_IP
        self.node_url = f"http://{host}" + (f":{http_port}" if http_port != 80 else "")

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, taps, ports 67/69)")
        for tool in ("ip", "radvd" if self.ipv6_only else "dnsmasq", "qemu-system-x86_64"):
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
            if self.ipv6_only:
                self._radvd()
            else:
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
        for proc in (self.node_proc, self.dnsmasq_proc, self.radvd_proc, *self._procs,
                     self.etcd_proc):
            stop(proc)
        for ns in reversed(self._created_ns):
            # processes we did not start cannot be in a namespace we created,
            # but a VM's helper could linger: the namespace goes regardless
            run(["ip", "netns", "del", ns], check=False)
        self._created_ns.clear()
        run(["ip", "link", "del", self.host_if], check=False)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # -- the pieces ---------------------------------------------------------------------------

    def _ns(self, ns: str, *cmd: str) -> None:
        run(["ip", "-n", ns, *cmd])

    def _network(self) -> None:
        for ns in (self.ns, self.site_ns):
            run(["ip", "netns", "add", ns])
            self._created_ns.append(ns)
            self._ns(ns, "link", "set", "lo", "up")
        self._ns(self.ns, "link", "add", "br0", "type", "bridge", "stp_state", "0",
                 "forward_delay", "0")
        if not self.ipv6_only:
            self._ns(self.ns, "addr", "add", f"{NODE_IP}/24", "dev", "br0")
        self._ns(self.ns, "addr", "add", f"{NODE_IP6}/64", "dev", "br0", "nodad")
        self._ns(self.ns, "link", "set", "br0", "up")
        # the site DHCP server's leg on the bridge
        self._ns(self.ns, "link", "add", "site0", "type", "veth", "peer", "name", "eth0",
                 "netns", self.site_ns)
        self._ns(self.ns, "link", "set", "site0", "master", "br0", "up")
        if not self.ipv6_only:
            self._ns(self.site_ns, "addr", "add", f"{SITE_DHCP_IP}/24", "dev", "eth0")
        self._ns(self.site_ns, "addr", "add", f"{SITE_IP6}/64", "dev", "eth0", "nodad")
        self._ns(self.site_ns, "link", "set", "eth0", "up")
        # the uplink to the host: etcd and the control plane live there
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "up0",
              "netns", self.ns])
        run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        self._ns(self.ns, "addr", "add", f"{self.ns_ip}/30", "dev", "up0")
        self._ns(self.ns, "link", "set", "up0", "up")
        segment = PREFIX6 + " (IPv6 only)" if self.ipv6_only else f"{SUBNET}.0/24"
        self.log(f"lab segment {segment} on br0 in namespace {self.ns}; "
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
        dhcp4 = [f"--dhcp-range={SUBNET}.100,{SUBNET}.199,255.255.255.0,1h",
                 "--dhcp-option=3", "--dhcp-option=6",       # no router, no DNS: address only
                 "--dhcp-authoritative"] if self.site_dhcp else []
        self.dnsmasq_proc = self._spawn([
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--user=root", "--group=root", "--interface=eth0", "--bind-interfaces",
            *dhcp4, f"--dhcp-leasefile={leases}", "--log-dhcp", "--enable-ra",
            "--dhcp-range=::,constructor:eth0,ra-only,64,1h",
            "--ra-param=eth0,high,10,0", "--log-facility=-",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
        ], "dnsmasq.log", ns=self.site_ns)
        time.sleep(0.3)
        if self.dnsmasq_proc.poll() is not None:
            raise LabError("dnsmasq exited at start:\n" + self._tail("dnsmasq.log"))

    def _radvd(self) -> None:
        """The site's IPv6 router on an IPv6-only segment: radvd advertising
        ``PREFIX6`` (on-link, SLAAC) with the managed and other-config flags,
        so UEFI PXE and iPXE ask DHCPv6 (the node) for their boot files.
        It routes nowhere: the site namespace has no other link."""
        conf = self.workdir / "radvd.conf"
        conf.write_text(
            "interface eth0 {\n"
            "    AdvSendAdvert on;\n"
            "    MinRtrAdvInterval 3;\n"
            "    MaxRtrAdvInterval 10;\n"
            "    AdvDefaultLifetime 1800;\n"
            "    AdvManagedFlag on;\n"
            "    AdvOtherConfigFlag on;\n"
            f"    prefix {PREFIX6} {{ AdvOnLink on; AdvAutonomous on; }};\n"
            "};\n")
        # radvd wants forwarding on for a router; the namespace has only eth0
        run(["ip", "netns", "exec", self.site_ns, "sysctl", "-qw",
             "net.ipv6.conf.all.forwarding=1"])
        self.radvd_proc = self._spawn([
            "radvd", "--nodaemon", "--config", str(conf), "--logmethod", "stderr",
            "--debug", "1", "--pidfile", str(self.workdir / "radvd.pid")],
            "radvd.log", ns=self.site_ns)
        time.sleep(0.3)
        if self.radvd_proc.poll() is not None:
            raise LabError("radvd exited at start:\n" + self._tail("radvd.log"))

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
               "--http-port", str(self.http_port), *self.node_args]
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

    def api_tokens(self, prefix: str = "/os",
                   roles: Sequence[str] = ("operator", "approver")) -> dict[str, str]:
        """An API token for each of ``roles`` (users ``lab-<role>``, created
        in the lab's etcd): ``{role: token}``."""
        from lpmos.auth import Auth
        from lpmos.store.etcd import EtcdStore
        from lpmos.store.keys import Keys

        store = EtcdStore(self.etcd_endpoints, timeout=5.0)
        try:
            auth = Auth(store, Keys(prefix))
            tokens = {}
            for role in roles:
                auth.put_user(f"lab-{role}", role, f"{role}-password-1")
                tokens[role] = auth.create_token(f"lab-{role}")[0]
            return tokens
        finally:
            store.close()

    def node_health(self) -> str | None:
        """The node's /healthz status, fetched from inside the namespace."""
        done = run(["ip", "netns", "exec", self.ns, "curl", "-gfsS", "-m", "2",
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

    def add_tap(self, *, user: int | None = None) -> str:
        """A new tap on the lab's bridge (removed with the namespace); its
        name.  ``user``: the uid that may open it without privileges (a
        session libvirtd's QEMU, :mod:`tests.power_lab`)."""
        tap = f"tap{self._taps}"
        self._taps += 1
        owner = ["user", str(user)] if user is not None else []
        self._ns(self.ns, "tuntap", "add", "dev", tap, "mode", "tap", *owner)
        self._ns(self.ns, "link", "set", tap, "master", "br0", "up")
        return tap

    def mac(self, index: int) -> str:
        """The lab's MAC number ``index`` (1..255): unique to this lab's owner."""
        return f"52:54:00:77:{(self.owner >> 8) & 0xff:02x}:{index & 0xff:02x}"

    def boot_vm(self, name: str, *, firmware: str = "bios", serial: str | None = None,
                disk_gb: int = 2, memory_mb: int | None = None,
                disk_first: bool | None = None, secure_boot: bool = False,
                http_boot: bool = False, arch: str = "x86_64") -> VM:
        """Start one VM that network-boots; returns at once (see VM.wait_for).

        ``arch="arm64"``: a UEFI arm64 machine (``qemu-system-aarch64 -M
        virt``, AAVMF, no NIC ROM: :func:`lab.arm64.arm64_command`), whose
        firmware PXE-boots what the node offers arm64 clients.

        Boot order: BIOS VMs try the network first and leave to the disk when
        the node says so (iPXE ``sanboot``).  UEFI VMs try the disk first
        (``disk_first``, default for UEFI), as a real UEFI machine does after
        an OS installer put its boot entry in front: the blank disk is
        skipped so the first boot is PXE, and after the install OVMF boots
        the disk instead of walking its other network options (PXE over
        IPv6, HTTP boot) for minutes after iPXE exits.

        UEFI only: ``secure_boot`` runs OVMF with Secure Boot enforced
        (Microsoft's keys enrolled: only signed loaders run); ``http_boot``
        turns OVMF's PXE off (``opt/org.tianocore/IPv4PXESupport``), so the
        firmware boots by its own UEFI HTTP boot over IPv4, with no TFTP.  In an
        ``ipv6_only`` lab OVMF's PXE over IPv4 is off too (a firmware
        setting operators of IPv6-only segments turn off: its DHCPv4 would
        time out for a minute), so a UEFI VM boots by PXE over IPv6.
        """
        if firmware not in ("bios", "uefi"):
            raise ValueError("firmware: bios or uefi")
        if (secure_boot or http_boot) and firmware != "uefi":
            raise ValueError("secure_boot and http_boot need firmware='uefi'")
        if arch not in ("x86_64", "arm64"):
            raise ValueError("arch: x86_64 or arm64")
        if arch == "arm64" and (firmware != "uefi" or secure_boot or http_boot):
            raise ValueError("an arm64 VM is firmware='uefi', PXE, without Secure Boot")
        if disk_first is None:
            disk_first = firmware == "uefi"
        net_index, disk_index = (2, 1) if disk_first else (1, 2)
        n = len(self.vms)
        mac = self.mac(n + 1)
        serial = serial or f"LAB-{'ARM64' if arch == 'arm64' else firmware.upper()}-{n + 1:02d}"
        vm_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{self.lab_id}.{name}.lpmos.lab"))
        vmdir = self.workdir / "vms" / name
        vmdir.mkdir(parents=True, exist_ok=True)
        vm = VM(name, firmware, mac, serial, vm_uuid, vmdir)
        tap = self.add_tap()
        disk = vmdir / "disk.img"
        with disk.open("wb") as fh:
            fh.truncate(disk_gb << 30)
        if arch == "arm64":
            return self._start_vm(vm, arm64_vm_command(
                vm, tap=tap, disk=disk, workdir=vmdir, memory_mb=memory_mb or self.memory_mb,
                disk_index=disk_index, net_index=net_index), "arm64 UEFI (AAVMF)")
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
            shutil.copyfile(OVMF_VARS_SB if secure_boot else OVMF_VARS, vars_fd)
            if secure_boot:
                cmd += ["-machine", "q35,smm=on",
                        "-global", "driver=cfi.pflash01,property=secure,value=on"]
            else:
                cmd += ["-machine", "q35"]
            if self.ipv6_only and not http_boot:
                cmd += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n"]
            if http_boot:
                cmd += ["-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
                        "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
                        "-fw_cfg", "name=opt/org.tianocore/IPv6Support,string=n"]
            code = OVMF_CODE_SB if secure_boot else OVMF_CODE
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_fd}",
                    # romfile= (empty): no iPXE ROM, OVMF's own PXE client boots
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=,"
                               f"bootindex={net_index}"]
        else:
            # QEMU's default ROM for the NIC: Debian's ipxe-qemu (efi-virtio.rom).
            # (An explicit romfile= path silently loads no ROM with this QEMU.)
            cmd += ["-machine", "pc",
                    "-device", f"virtio-net-pci,netdev=n0,mac={mac},bootindex={net_index}"]
        how = " Secure Boot" * secure_boot + " HTTP boot" * http_boot
        return self._start_vm(vm, cmd, f"{firmware}{how}")

    def _start_vm(self, vm: VM, cmd: list[str], how: str) -> VM:
        """Start QEMU for ``vm`` in the lab's namespace and its console watcher."""
        vm.started = time.monotonic()
        vm.proc = self._spawn(cmd, f"vms/{vm.name}/qemu.log", ns=self.ns)
        vm.watch_console()
        self.vms.append(vm)
        self.log(f"VM {vm.name}: {how}, serial {vm.serial}, MAC {vm.mac}, "
                 f"console {vm.serial_log}")
        return vm


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
        stop(proc)
