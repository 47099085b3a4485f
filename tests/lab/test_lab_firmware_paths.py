"""Firmware paths beyond UEFI PXE with iPXE, proven on OVMF: two labs side
by side, each a Debian 12 install that is logged into.

* **Secure Boot on** (``OVMF_CODE_4M.ms.fd`` with a copy of
  ``OVMF_VARS_4M.ms.fd``: Microsoft's keys enrolled, only signed code runs).
  The node offers ``shimx64.efi`` to x86-64 UEFI machines and is the
  segment's DHCP server (Debian 12's signed GRUB finds its TFTP server in
  the DHCP ACK only).  The VM goes

      PXE → shim (Microsoft-signed) → Debian's signed GRUB → grub/grub.cfg →
      its own grub/<mac>.cfg (the decision) → Debian's signed kernel + the
      live agent, under kernel lockdown (all over TFTP) → the real Debian
      image written → reboot → shim + GRUB from the disk → cloud-init → its
      report says Secure Boot is on

  and the test checks that the agent's inventory and the installed system
  both say Secure Boot is on, that the unsigned iPXE was never offered, and
  that the timeline has each loader step; over SSH, the SecureBoot EFI
  variable and the kernel's lockdown.
* **UEFI HTTP boot**: OVMF with its PXE turned off and no iPXE ROM boots by
  its own HTTP boot: our ProxyDHCP gives it an ``http://`` URL, it fetches
  ``ipxe.efi`` over HTTP, iPXE fetches its script over HTTP, and the agent
  installs.  That node's TFTP metrics show it never saw a TFTP packet.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from lab.runner import Lab, LabError, control_plane
from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host
from tests.lab.test_lab_real_os import DISK_GB, Machine, _api, print_lab_times

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(2400)]

SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
#: the loader steps a Secure Boot machine's timeline shows, in order
SB_STAGES = ("loader shim", "loader grub", "grub.cfg", "grub config", "kernel fetched",
             "initrd fetched", "agent registered")


def _metric(lab: Lab, name: str) -> float:
    """The sum of a metric's samples on the lab's node (0 when absent)."""
    out = subprocess.run(["ip", "netns", "exec", lab.ns, "curl", "-sf", "--max-time", "10",
                          f"{lab.node_url}/metrics"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    total = 0.0
    for line in out.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
        if m:
            total += float(m.group(2))
    return total


def _timeline(m: Machine) -> list[dict[str, Any]]:
    status, body = _api(m.cp, "GET", f"/api/v1/servers/dc1/{m.vm.serial}/timeline",
                        m.tokens["operator"])
    assert status == 200, body
    return list(body["entries"])


def _inventory(m: Machine) -> dict[str, Any]:
    status, body = _api(m.cp, "GET", f"/api/v1/servers/dc1/{m.vm.serial}", m.tokens["operator"])
    assert status == 200, body
    return dict(body["server"].get("inventory") or {})


def _flow(m: Machine, hostname: str, probes: dict[str, str]) -> dict[str, Any]:
    task = m.install(hostname)
    facts: dict[str, Any] = m.login()
    for name, cmd in probes.items():
        done = m.ssh(cmd)
        assert done.returncode == 0, f"{m.vm.name}: {cmd}: {done.stderr}"
        facts[name] = done.stdout.strip()
    facts["task"] = task
    return facts


def test_secure_boot_and_uefi_http_boot_install_debian(
        lab_images: dict[str, Path], cloud_image: Path, tmp_path: Path) -> None:
    require_lab_host()
    started = time.monotonic()
    key = tmp_path / "id_lab"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lpmos-lab",
                    "-f", str(key)], check=True)
    machines: list[Machine] = []
    with contextlib.ExitStack() as stack:
        sb_lab = stack.enter_context(Lab(tmp_path / "sb", site_dhcp=False, node_args=[
            "--dhcp-bootfile-efi64", "shimx64.efi"]))
        http_lab = stack.enter_context(Lab(tmp_path / "http"))
        sb_cp = stack.enter_context(control_plane(sb_lab, port=free_port()))
        http_cp = stack.enter_context(control_plane(http_lab, port=free_port()))
        sb_vm = sb_lab.boot_vm("sb-os", firmware="uefi", secure_boot=True, disk_gb=DISK_GB,
                               serial="LAB-SB-01")
        http_vm = http_lab.boot_vm("httpboot-os", firmware="uefi", http_boot=True,
                                   disk_gb=DISK_GB, serial="LAB-HTTP-01")
        sb = Machine(sb_lab, sb_vm, sb_cp, sb_lab.api_tokens(), "debian-12-generic-zst",
                     "10.77.0.213", "fd77:77::213", key)
        http = Machine(http_lab, http_vm, http_cp, http_lab.api_tokens(), "debian-12-generic",
                       "10.77.0.214", "fd77:77::214", key)
        machines += [sb, http]
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                sb_run = pool.submit(_flow, sb, "sb-os", {
                    "secure_boot_var": f"od -An -tu1 {SECURE_BOOT_VAR}",
                    "lockdown": "cat /sys/kernel/security/lockdown"})
                http_run = pool.submit(_flow, http, "httpboot-os", {})
                sb_facts, http_facts = sb_run.result(), http_run.result()
        except (LabError, AssertionError):
            for m in machines:
                print(m.vm.describe())
            raise
        finally:
            print_lab_times("firmware paths lab", started, machines, [m.vm for m in machines])

        # --- Secure Boot: signed all the way, and everyone says so
        assert sb_facts["hostname"] == "sb-os" and sb_facts["efi"] == "uefi", sb_facts
        assert sb_facts["secure_boot_var"].split()[-1] == "1", sb_facts   # the variable's value
        assert "[integrity]" in sb_facts["lockdown"] or "[confidentiality]" in \
            sb_facts["lockdown"], sb_facts["lockdown"]
        assert _inventory(sb)["firmware"]["secure_boot"] is True          # the live agent's
        logs = "\n".join(map(str, sb_facts["task"].get("logs") or []))
        assert "installed system booted UEFI, Secure Boot on" in logs, logs[-2000:]
        entries = _timeline(sb)
        result = [e for e in entries if e["stage"] == "cloud-init result"]
        assert result and result[-1]["detail"]["secure_boot"] is True, (result, logs)
        stages = [e["stage"] for e in entries]
        positions = [stages.index(s) for s in SB_STAGES if s in stages]
        assert len(positions) == len(SB_STAGES), stages
        assert positions == sorted(positions), stages
        offered = [e["detail"].get("file") for e in entries if e["stage"] == "dhcp"]
        assert "shimx64.efi" in offered and not any(
            f and "ipxe" in f for f in offered), offered            # never the unsigned iPXE
        assert "loader ipxe" not in stages
        assert "Secure boot enabled" in sb_vm.serial_log.read_text(errors="replace")

        # --- UEFI HTTP boot: the loader over HTTP, and not one TFTP packet
        assert http_facts["hostname"] == "httpboot-os", http_facts
        assert _metric(http_lab, "lpmos_tftp_requests_total") == 0
        entries = _timeline(http)
        loaders = [e for e in entries if e["stage"] == "loader ipxe"]
        assert loaders and loaders[0]["detail"].get("via") == "http", entries
        http_offers = [e["detail"] for e in entries if e["stage"] == "dhcp"]
        assert any(str(d.get("file", "")).startswith("http://") for d in http_offers), \
            http_offers
        console = http_vm.serial_log.read_text(errors="replace")
        assert "Start HTTP Boot over IPv4" in console and "Start PXE over IPv4" not in console
        assert _inventory(http)["firmware"]["secure_boot"] is False
