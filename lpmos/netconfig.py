"""The installed system's network: the operator's ``params.network``,
checked, and the NoCloud network-config (version 2) built from it.

The shape an operator writes (docs/install-inputs.md has the examples)::

    {"mode": "dhcp"}                       # the default: DHCP on the boot NIC
    {"mode": "static",
     "interface": "eth0",                  # where the addresses go (default eth0)
     "addresses": ["192.0.2.10/24", "2001:db8::10/64"],
     "gateway4": "192.0.2.1", "gateway6": "2001:db8::1",
     "dns": {"servers": ["192.0.2.53"], "search": ["example.com"]},
     "bonds": {"bond0": {"members": ["52:54:00:12:34:56", "52:54:00:12:34:57"],
                         "mode": "802.3ad", "lacp_rate": "fast",
                         "hash_policy": "layer3+4"}},
     "vlans": {"vlan100": {"id": 100, "link": "bond0"}}}

NICs are named by MAC: the boot NIC (the task's MAC) is ``eth0``, every
other MAC a bond member or VLAN link names is ``eth1``, ``eth2`` ... in the
order they first appear, each matched by ``macaddress`` and renamed with
``set-name`` so the names are the same on every boot.  A boot NIC that is
neither addressed, nor a bond member, nor a VLAN link keeps DHCP.

The gateways are rendered as v2's ``gateway4``/``gateway6`` keys, not as
``routes: [{to: default}]``: Debian 12's cloud-init (22.4) stops with
"Address default is not a valid ip address" when it renders ``to: default``
for ifupdown or networkd, and renders ``to: ::/0`` as a ``::/64`` route
through net-tools' ``route``, which a Debian cloud image does not have.
``gateway4``/``gateway6`` become ifupdown's and networkd's own gateway
settings (tests/unit/test_cloud_config.py runs ``cloud-init devel
net-convert`` on every shape).

Pure and stdlib-only; :class:`lpmos.models.ValidationError` names the field.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from lpmos.models import ValidationError, normalize_mac, validate_hostname

MODES = ("dhcp", "static")
BOND_MODES = ("balance-rr", "active-backup", "balance-xor", "broadcast", "802.3ad",
              "balance-tlb", "balance-alb")
LACP_RATES = ("slow", "fast")
HASH_POLICIES = ("layer2", "layer2+3", "layer3+4", "encap2+3", "encap3+4")
BOOT_NIC = "eth0"
ADDRESSES_MAX = 16
DNS_SERVERS_MAX = 8
DNS_SEARCH_MAX = 6
BONDS_MAX = 8
BOND_MEMBERS_MAX = 8
VLANS_MAX = 32
MII_MONITOR_MS = 100

#: bond and VLAN names: a Linux interface name (at most 15 characters)
_IFNAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,14}")
_ETH_RE = re.compile(r"eth[0-9]+")
_STATIC_KEYS = frozenset({"mode", "interface", "addresses", "gateway4", "gateway6", "dns",
                          "bonds", "vlans"})
_BOND_KEYS = frozenset({"members", "mode", "lacp_rate", "hash_policy"})

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Bond:
    name: str
    members: tuple[str, ...]          # MACs, lowercase with colons
    mode: str
    lacp_rate: str = ""
    hash_policy: str = ""


@dataclass(frozen=True)
class Vlan:
    name: str
    id: int
    link: str                         # a bond's name, or a MAC


@dataclass(frozen=True)
class Network:
    """A checked ``params.network``."""

    mode: str = "dhcp"
    interface: str = BOOT_NIC
    addresses: tuple[str, ...] = ()
    gateway4: str = ""
    gateway6: str = ""
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    bonds: tuple[Bond, ...] = ()
    vlans: tuple[Vlan, ...] = ()


def _fail(where: str, message: str) -> ValidationError:
    return ValidationError(f"params.network{where}", message)


def _object(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "a JSON object")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r}; the keys are "
                    + ", ".join(sorted(allowed)))
    return value


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, "a JSON list")
    if len(value) > limit:
        raise _fail(where, f"at most {limit} entries")
    return value


def _ifname(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value):
        raise _fail(where, "an interface name: 1-15 of a-z, 0-9, '.', '_', '-', "
                    "starting with a letter")
    return value


def _mac(value: Any, where: str) -> str:
    try:
        return normalize_mac(value, "mac")
    except ValidationError as exc:
        raise _fail(where, exc.message) from None


def parse_address(value: Any, where: str) -> Interface:
    """An interface address in CIDR form (``192.0.2.10/24``, ``2001:db8::10/64``)."""
    if not isinstance(value, str) or "/" not in value:
        raise _fail(where, f"{str(value)[:60]!r} is not an address in CIDR form "
                    "such as 192.0.2.10/24 or 2001:db8::10/64")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise _fail(where, f"{value[:60]!r}: {exc}") from None
    ip, net = iface.ip, iface.network
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback:
        raise _fail(where, f"{value} is not a host address")
    if ip.version == 4 and net.prefixlen < 31 and ip in (net.network_address,
                                                         net.broadcast_address):
        which = "network" if ip == net.network_address else "broadcast"
        raise _fail(where, f"{value} is the subnet's {which} address, not a host address")
    return iface


def _gateway(value: Any, version: int, addresses: list[Interface], where: str) -> str:
    if value in (None, ""):
        return ""
    try:
        gw = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        gw = None
    if gw is None or gw.version != version:
        raise _fail(where, f"an IPv{version} address")
    mine = [a for a in addresses if a.version == version]
    if not mine:
        raise _fail(where, f"there is no IPv{version} address for this gateway")
    if version == 6 and gw.is_link_local:
        return str(gw)                  # fe80::1 is a common IPv6 router address
    if not any(gw in a.network for a in mine):
        raise _fail(where, f"{gw} is in none of the IPv{version} subnets "
                    + ", ".join(str(a.network) for a in mine))
    if any(gw == a.ip for a in mine):
        raise _fail(where, f"{gw} is this machine's own address")
    return str(gw)


def _dns(value: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if value is None:
        return (), ()
    dns = _object(value, ".dns", frozenset({"servers", "search"}))
    servers: list[str] = []
    for i, s in enumerate(_list(dns.get("servers", []), ".dns.servers", DNS_SERVERS_MAX)):
        try:
            servers.append(str(ipaddress.ip_address(s if isinstance(s, str) else "")))
        except ValueError:
            raise _fail(f".dns.servers[{i}]", f"{str(s)[:60]!r} is not an IP address") from None
    search: list[str] = []
    for i, d in enumerate(_list(dns.get("search", []), ".dns.search", DNS_SEARCH_MAX)):
        try:
            search.append(validate_hostname(d, "search"))
        except ValidationError as exc:
            raise _fail(f".dns.search[{i}]", exc.message) from None
    return tuple(servers), tuple(search)


def _bond(name: str, value: Any) -> Bond:
    where = f".bonds.{name}"
    body = _object(value, where, _BOND_KEYS)
    members = tuple(_mac(m, f"{where}.members[{i}]") for i, m in
                    enumerate(_list(body.get("members"), f"{where}.members", BOND_MEMBERS_MAX)))
    if not members:
        raise _fail(f"{where}.members", "at least one member NIC, by MAC")
    if len(set(members)) != len(members):
        raise _fail(f"{where}.members", "a MAC is listed twice")
    mode = body.get("mode")
    if mode not in BOND_MODES:
        raise _fail(f"{where}.mode", "one of " + ", ".join(BOND_MODES))
    lacp = body.get("lacp_rate", "")
    if lacp and (mode != "802.3ad" or lacp not in LACP_RATES):
        raise _fail(f"{where}.lacp_rate", "slow or fast, for an 802.3ad bond")
    policy = body.get("hash_policy", "")
    if policy and policy not in HASH_POLICIES:
        raise _fail(f"{where}.hash_policy", "one of " + ", ".join(HASH_POLICIES))
    return Bond(name, members, str(mode), str(lacp), str(policy))


def _vlan(name: str, value: Any, bonds: set[str]) -> Vlan:
    where = f".vlans.{name}"
    body = _object(value, where, frozenset({"id", "link"}))
    vid = body.get("id")
    if isinstance(vid, bool) or not isinstance(vid, int) or not 1 <= vid <= 4094:
        raise _fail(f"{where}.id", "a VLAN id from 1 to 4094")
    link = body.get("link")
    if link == BOOT_NIC or link in bonds:
        return Vlan(name, vid, str(link))
    if isinstance(link, str) and ":" in link:
        return Vlan(name, vid, _mac(link, f"{where}.link"))
    raise _fail(f"{where}.link", f"{str(link)[:40]!r} is not a bond of this network, "
                f"{BOOT_NIC} (the boot NIC) or a NIC's MAC")


def _names(value: Any, where: str, limit: int) -> list[tuple[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise _fail(where, "a JSON object of name to settings")
    if len(value) > limit:
        raise _fail(where, f"at most {limit}")
    out = []
    for name, body in value.items():
        _ifname(name, f"{where}.{str(name)[:20]}")
        if _ETH_RE.fullmatch(name):
            raise _fail(f"{where}.{name}", "eth<N> names the machine's NICs; choose another name")
        out.append((name, body))
    return out


def parse_network(value: Any, *, boot_mac: str | None,
                  known_macs: frozenset[str] | None = None) -> Network:
    """``params.network`` checked (ValidationError naming the key and why).

    ``boot_mac``: the task's MAC (``None`` for a task template, which has
    none).  ``known_macs``: the machine's MACs when its server record is
    known; bond members and VLAN links must then be among them (the boot MAC
    always is).
    """
    if value is None:
        return Network()
    if not isinstance(value, dict):
        raise _fail("", 'a JSON object such as {"mode": "dhcp"}')
    mode = value.get("mode", "dhcp")
    if mode not in MODES:
        raise _fail(".mode", "dhcp or static")
    if mode == "dhcp":
        _object(value, "", frozenset({"mode"}))
        return Network()
    body = _object(value, "", _STATIC_KEYS)
    addresses = [parse_address(a, f".addresses[{i}]") for i, a in
                 enumerate(_list(body.get("addresses"), ".addresses", ADDRESSES_MAX))]
    if not addresses:
        raise _fail(".addresses", "at least one address in CIDR form for a static network")
    if len({a.ip for a in addresses}) != len(addresses):
        raise _fail(".addresses", "an address is listed twice")
    servers, search = _dns(body.get("dns"))
    bonds = tuple(_bond(n, b) for n, b in _names(body.get("bonds"), ".bonds", BONDS_MAX))
    bond_names = {b.name for b in bonds}
    vlan_items = _names(body.get("vlans"), ".vlans", VLANS_MAX)
    clash = sorted(bond_names & {n for n, _ in vlan_items})
    if clash:
        raise _fail(f".vlans.{clash[0]}", "a bond has the same name")
    vlans = tuple(_vlan(n, v, bond_names) for n, v in vlan_items)
    if len({(v.link, v.id) for v in vlans}) != len(vlans):
        raise _fail(".vlans", "two VLANs have the same id on the same link")
    seen: dict[str, str] = {}
    for b in bonds:
        for m in b.members:
            if m in seen:
                raise _fail(f".bonds.{b.name}.members", f"{m} is already a member of {seen[m]}")
            seen[m] = b.name
    macs = [m for b in bonds for m in b.members] + [v.link for v in vlans if ":" in v.link]
    boot = normalize_mac(boot_mac) if boot_mac else ""
    if known_macs is not None:
        known = set(known_macs) | ({boot} if boot else set())
        for m in macs:
            if m not in known:
                raise _fail("", f"{m} is not a NIC of this machine (its MACs: "
                            + ", ".join(sorted(known)) + ")")
    for v in vlans:
        if ":" in v.link and v.link in seen:
            raise _fail(f".vlans.{v.name}.link", f"{v.link} is a member of bond {seen[v.link]}; "
                        f"link the VLAN to {seen[v.link]}")
    interface = body.get("interface", BOOT_NIC)
    candidates = {BOOT_NIC, *bond_names, *(v.name for v in vlans)}
    if interface not in candidates:
        raise _fail(".interface", f"{str(interface)[:40]!r} is none of "
                    + ", ".join(sorted(candidates)))
    if interface == BOOT_NIC and boot and boot in seen:
        raise _fail(".interface", f"the boot NIC is a member of bond {seen[boot]}; "
                    "put the addresses on the bond or a VLAN")
    return Network(
        mode="static", interface=str(interface),
        addresses=tuple(str(a) for a in addresses),
        gateway4=_gateway(body.get("gateway4"), 4, addresses, ".gateway4"),
        gateway6=_gateway(body.get("gateway6"), 6, addresses, ".gateway6"),
        dns_servers=servers, dns_search=search, bonds=bonds, vlans=vlans)


def _nic_names(net: Network, boot_mac: str) -> dict[str, str]:
    """MAC → ``ethN``: the boot NIC first, then in order of appearance."""
    names = {boot_mac: BOOT_NIC}
    order = [m for b in net.bonds for m in b.members] + [v.link for v in net.vlans
                                                         if ":" in v.link]
    for mac in order:
        names.setdefault(mac, f"eth{len(names)}")
    return names


def _addressing(net: Network) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": list(net.addresses)}
    if net.gateway4:
        out["gateway4"] = net.gateway4
    if net.gateway6:
        out["gateway6"] = net.gateway6
    if net.dns_servers or net.dns_search:
        ns: dict[str, Any] = {}
        if net.dns_servers:
            ns["addresses"] = list(net.dns_servers)
        if net.dns_search:
            ns["search"] = list(net.dns_search)
        out["nameservers"] = ns
    return out


def build_network_config(net: Network, boot_mac: str, *, rename: bool = True) -> dict[str, Any]:
    """NoCloud network-config v2 for ``net`` (pure).  ``rename``: give each
    NIC its ``ethN`` name with ``set-name`` (the cloud-init seed); Ubuntu's
    autoinstall leaves the names to netplan (``rename=False``)."""
    boot = normalize_mac(boot_mac)
    names = _nic_names(net, boot)
    ethernets: dict[str, dict[str, Any]] = {}
    for mac, name in names.items():
        entry: dict[str, Any] = {"match": {"macaddress": mac}}
        if rename:
            entry["set-name"] = name
        ethernets[name] = entry
    doc: dict[str, Any] = {"version": 2, "ethernets": ethernets}
    if net.mode == "dhcp":
        ethernets[BOOT_NIC]["dhcp4"] = True
        return doc
    used = {net.interface} | {names[m] for b in net.bonds for m in b.members} | \
        {names.get(v.link, v.link) for v in net.vlans}
    if BOOT_NIC not in used:
        ethernets[BOOT_NIC]["dhcp4"] = True
    if net.bonds:
        bonds: dict[str, Any] = {}
        for b in net.bonds:
            params: dict[str, Any] = {"mode": b.mode, "mii-monitor-interval": MII_MONITOR_MS}
            if b.lacp_rate:
                params["lacp-rate"] = b.lacp_rate
            if b.hash_policy:
                params["transmit-hash-policy"] = b.hash_policy
            bonds[b.name] = {"interfaces": [names[m] for m in b.members], "parameters": params}
        doc["bonds"] = bonds
    if net.vlans:
        doc["vlans"] = {v.name: {"id": v.id, "link": names.get(v.link, v.link)}
                        for v in net.vlans}
    section = "ethernets" if net.interface == BOOT_NIC else \
        "bonds" if net.interface in {b.name for b in net.bonds} else "vlans"
    doc[section][net.interface].update(_addressing(net))
    return doc
