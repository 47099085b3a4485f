"""The DHCP settings record: every setting of the table is read, defaults
come from the table, and the derived values (ports, lab range, policy)."""

from __future__ import annotations

import dataclasses

import pytest

from bootsvc.dhcp.settings import BOOT_FAMILIES, SETTINGS, DhcpSettings
from lpmos.config import Config, ConfigError


def _config(**overrides: object) -> Config:
    return Config({s.key: s.parse(s.default) for s in SETTINGS}, {}).with_values(**overrides)


def test_from_config_reads_every_setting_of_the_table() -> None:
    fields = {f.name for f in dataclasses.fields(DhcpSettings)} - {"bootfiles"}
    keys = {f"dhcp.{name}" for name in fields} | {f"dhcp.bootfile_{f}" for f in BOOT_FAMILIES}
    assert keys == {s.key for s in SETTINGS}


def test_defaults_come_from_the_table() -> None:
    s = DhcpSettings.from_config(_config())
    assert (s.mode, s.port, s.proxy_port, s.range, s.netmask, s.router, s.dns) == (
        "proxy", 67, 4011, None, "255.255.255.0", None, ())
    assert (s.lease_time, s.allow_macs, s.known_only, s.relays, s.rcvbuf) == (
        3600, frozenset(), False, frozenset(), 4 * 1024 * 1024)
    assert dict(s.bootfiles) == {"bios": "undionly.kpxe", "efi32": None, "efi64": "ipxe.efi",
                                 "arm64": None}


def test_a_config_without_the_dhcp_table_is_refused() -> None:
    with pytest.raises(KeyError):
        DhcpSettings.from_config(Config({}, {}))


@pytest.mark.parametrize(("port", "proxy_port", "expected"), [
    (67, 4011, [(67, "dhcp"), (4011, "proxy")]),
    (67, 0, [(67, "dhcp")]),                        # 0 disables the boot server port
    (0, 0, [(0, "dhcp")]),                          # 0 on the DHCP port: an ephemeral port
    (0, 4011, [(0, "dhcp"), (4011, "proxy")]),
])
def test_listen_ports(port: int, proxy_port: int, expected: list[tuple[int, str]]) -> None:
    s = DhcpSettings.from_config(_config(dhcp__port=port, dhcp__proxy_port=proxy_port))
    assert s.listen_ports() == expected


def test_lab_range_is_required_in_lab_mode() -> None:
    with pytest.raises(ConfigError, match=r"dhcp\.range"):
        DhcpSettings.from_config(_config(dhcp__mode="full")).lab_range()
    s = DhcpSettings.from_config(_config(dhcp__range=("10.0.0.10", "10.0.0.20")))
    assert s.lab_range() == ("10.0.0.10", "10.0.0.20")


@pytest.mark.parametrize(("url", "script", "http"), [
    ("http://10.0.0.1:8081", "http://10.0.0.1:8081/boot.ipxe", "http://10.0.0.1:8081/ipxe"),
    ("http://10.0.0.1:8081/", "http://10.0.0.1:8081/boot.ipxe", "http://10.0.0.1:8081/ipxe"),
    ("", "", ""),                                   # no HTTP: no script, no HTTP binaries
])
def test_policy_urls(url: str, script: str, http: str) -> None:
    policy = DhcpSettings.from_config(_config()).policy(url)
    assert (policy.script_url, policy.http_base) == (script, http)
    assert dict(policy.bootfiles) == dict(DhcpSettings.from_config(_config()).bootfiles)
