"""BMC address through ``ipmitool lan print`` when ipmitool is installed."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

from agent.inventory.sysfs import AttrError
from agent.inventory.system import Section

IPMITOOL_TIMEOUT = 10.0


def read_ipmitool_lan() -> str | AttrError:
    tool = shutil.which("ipmitool")
    if tool is None:
        return AttrError("ipmitool not installed")
    try:
        done = subprocess.run([tool, "lan", "print"], capture_output=True, timeout=IPMITOOL_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        return AttrError(f"ipmitool timed out after {IPMITOOL_TIMEOUT:g} s")
    except OSError as exc:
        return AttrError(f"ipmitool failed: {exc}")
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        return AttrError(f"ipmitool: {err[0] if err else 'exit ' + str(done.returncode)}"[:200])
    return done.stdout.decode(errors="replace")[:64 * 1024]


def parse_ipmitool_lan(text: str) -> str | None:
    """The BMC's IPv4 address from ``ipmitool lan print``; None if unset."""
    m = re.search(r"^IP Address\s*:\s*(\S+)\s*$", text, re.MULTILINE)
    if not m:
        return None
    try:
        addr = ipaddress.ip_address(m.group(1))
    except ValueError:
        return None
    return None if addr.is_unspecified else str(addr)


def parse_bmc(lan: str | AttrError | None) -> Section:
    """``bmc`` from what :func:`read_ipmitool_lan` gave: the address, or the
    reason there is none.  None (the reader failed and its error is already
    recorded) adds nothing."""
    out = Section()
    if isinstance(lan, str):
        address = parse_ipmitool_lan(lan)
        if address:
            out.data["address"] = address
        else:
            out.unavailable["bmc"] = "ipmitool reports no BMC address"
    elif isinstance(lan, AttrError):
        out.unavailable["bmc"] = lan.reason
    return out
