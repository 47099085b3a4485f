"""Network interfaces: name, MAC, driver, speed, link, PCI address and which
one the machine booted from (``BOOTIF=`` or the node's hint).

Physical Ethernet interfaces (those with a ``device`` in sysfs) are listed;
virtual ones (bridges, veths, bonds, tunnels, ifb) are left out, except when
there is no physical NIC at all (a container), where the virtual Ethernet
ones are listed so the machine still has an identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.inventory.disks import pci_address
from agent.inventory.sysfs import AttrError, link_target, list_dir, read_attr, read_attrs
from lpmos.models import ValidationError, normalize_mac

NIC_ATTRS = ("address", "type", "operstate", "carrier", "speed", "addr_assign_type")
ARPHRD_ETHER = "1"


def read_nics(root: Path) -> list[dict[str, Any]]:
    base = root / "sys/class/net"
    out = []
    for name in list_dir(base):
        entry: dict[str, Any] = {
            "name": name,
            "devpath": link_target(root, base / name) or "",
            "attrs": read_attrs(base / name, NIC_ATTRS),
            "has_device": (base / name / "device").exists(),
        }
        driver_link = base / name / "device" / "driver"
        driver = link_target(root, driver_link) if driver_link.exists() else None
        if driver:
            entry["driver"] = driver.rsplit("/", 1)[-1]
        # speed and carrier raise EINVAL when the link is down: keep the reason
        for attr in ("speed", "carrier"):
            if attr not in entry["attrs"]:
                value = read_attr(base / name / attr)
                if isinstance(value, AttrError):
                    entry.setdefault("errors", {})[attr] = value.reason
        out.append(entry)
    return out


def parse_nics(raw: list[dict[str, Any]], boot_mac: str | None = None
               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The schema's ``nics`` list (sorted by name) and the reasons for gaps."""
    unavailable: dict[str, str] = {}
    ether = []
    for entry in sorted(raw, key=lambda e: str(e.get("name", ""))):
        attrs = entry.get("attrs") or {}
        if attrs.get("type") != ARPHRD_ETHER:
            continue
        try:
            mac = normalize_mac(attrs.get("address", ""))
        except ValidationError:
            continue                       # 00:00:00:00:00:00 and friends
        ether.append((entry, mac))
    physical = [(e, m) for e, m in ether if e.get("has_device")]
    chosen = physical
    if not physical:
        chosen = ether
        if ether:
            unavailable["nics.physical"] = "no physical NIC in sysfs (container?); " \
                                           "virtual Ethernet interfaces listed"
    nics = []
    for entry, mac in chosen:
        name = str(entry["name"])
        attrs = entry.get("attrs") or {}
        errors = entry.get("errors") or {}
        nic: dict[str, Any] = {"name": name, "mac": mac, "booted": bool(boot_mac) and
                               mac == boot_mac}
        if entry.get("driver"):
            nic["driver"] = entry["driver"]
        else:
            unavailable[f"nics.{name}.driver"] = "no driver bound in sysfs"
        try:
            speed = int(attrs["speed"])
        except (KeyError, ValueError):
            speed = -1
            if "speed" in errors:
                unavailable[f"nics.{name}.speed_mbps"] = f"{errors['speed']} (link down?)"
        if speed > 0:
            nic["speed_mbps"] = speed
        elif f"nics.{name}.speed_mbps" not in unavailable:
            unavailable[f"nics.{name}.speed_mbps"] = "unknown to the driver"
        if "carrier" in attrs:
            nic["link"] = attrs["carrier"] == "1"
        elif "operstate" in attrs:
            nic["link"] = attrs["operstate"] == "up"
        else:
            unavailable[f"nics.{name}.link"] = errors.get("carrier", "carrier unreadable")
        pci = pci_address(str(entry.get("devpath", "")))
        if pci:
            nic["pci_address"] = pci
        else:
            unavailable[f"nics.{name}.pci_address"] = "not on PCI"
        nics.append(nic)
    if not nics:
        unavailable["nics"] = "no Ethernet interface found"
    return nics, unavailable


def decide_speeds(found: list[dict[str, Any]], unavailable: dict[str, str],
                  speeds: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``found`` and ``unavailable`` with the driver's speeds (psutil, which
    asks through ethtool) filled in where sysfs had none: a positive speed
    for a NIC without ``speed_mbps`` is taken and its reason dropped."""
    why = dict(unavailable)
    out = []
    for nic in found:
        speed = speeds.get(nic["name"], 0)
        if "speed_mbps" not in nic and speed > 0:
            nic = {**nic, "speed_mbps": speed}
            why.pop(f"nics.{nic['name']}.speed_mbps", None)
        out.append(nic)
    return out, why


def parse_default_route_iface(route_text: str) -> str | None:
    """The interface of the IPv4 default route in ``/proc/net/route``."""
    for line in route_text.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 2 and cols[1] == "00000000":
            return cols[0]
    return None


def decide_boot_mac(nics: list[dict[str, Any]], hinted: str | None,
                    default_route_iface: str | None) -> str | None:
    """The MAC the machine most likely booted from: the hint (BOOTIF= or the
    node's), else the NIC of the default route, else the first NIC with link,
    else the first NIC."""
    macs = {n["mac"] for n in nics}
    if hinted:
        return hinted
    for nic in nics:
        if nic["name"] == default_route_iface:
            return str(nic["mac"])
    for nic in nics:
        if nic.get("link"):
            return str(nic["mac"])
    return sorted(macs)[0] if macs else None
