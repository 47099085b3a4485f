"""Inventory parsers against captured and modelled fixtures (no processes spawned)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from agent.cmdline import parse_bootif, parse_cmdline
from agent.inventory import SCHEMA, collect_inventory
from agent.inventory.bmc import parse_bmc, parse_ipmitool_lan
from agent.inventory.cpu import parse_cpuinfo, parse_psutil_cpu
from agent.inventory.disks import parse_disks, pci_address
from agent.inventory.memory import (
    MalformedSMBIOS,
    build_meminfo,
    parse_meminfo_total,
    parse_memory,
    parse_smbios_memory_device,
)
from agent.inventory.nics import (
    decide_boot_mac,
    decide_speeds,
    parse_default_route_iface,
    parse_nics,
)
from agent.inventory.sysfs import AttrError
from agent.inventory.system import parse_dmi, parse_firmware
from agent.inventory.udev import parse_udev_export

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "agent"


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsers and fixture reads must not spawn anything (ironic-python-agent's rule)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a process was spawned: {args}")
    monkeypatch.setattr(subprocess, "Popen", refuse)


def baremetal(**kw: object) -> dict:
    udev = {"block": parse_udev_export((FIX / "baremetal-udev-export.txt").read_text())}
    return collect_inventory(FIX / "baremetal", udev=udev, use_ipmitool=False, now=1.0, **kw)


def test_baremetal_inventory_full_schema() -> None:
    inv = baremetal(boot_mac="b4:96:91:3a:7c:11")
    assert inv["schema"] == SCHEMA == 1
    assert inv["system"] == {"vendor": "Dell Inc.", "product": "PowerEdge R650",
                             "serial": "7XK2QH3",
                             "uuid": "4c4c4544-0058-4b10-8032-b7c04f514833"}
    assert inv["firmware"] == {"mode": "uefi", "secure_boot": True}
    assert inv["cpu"] == {"model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "sockets": 2,
                          "cores": 4, "threads": 8}
    assert inv["memory"]["total_bytes"] == 131621212 * 1024
    assert [d["slot"] for d in inv["memory"]["dimms"]] == ["A1", "A2"]   # empty B1 left out
    json.dumps(inv)   # JSON-safe


def test_baremetal_disks_with_udev() -> None:
    disks = {d["name"]: d for d in baremetal()["disks"]}
    assert sorted(disks) == ["nvme0n1", "sda", "sdb", "sdc"]       # no sr0, loop0, partitions
    assert disks["nvme0n1"] == {
        "name": "nvme0n1", "size_bytes": 1875385008 * 512,
        "model": "SAMSUNG MZQL21T9HCJR-00A07", "serial": "S64GNE0R601234",
        "wwn": "eui.0025388b11c2a3f4", "by_path": "/dev/disk/by-path/pci-0000:03:00.0-nvme-1",
        "rotational": False, "removable": False}
    assert disks["sda"]["serial"] == "2049300AB1C2"
    assert disks["sda"]["wwn"] == "0x500a0751e5a1b2c3"
    assert disks["sdb"]["rotational"] is True
    assert disks["sdc"]["removable"] is True          # USB, though sysfs says 0


def test_baremetal_disks_without_udev_keep_reasons() -> None:
    inv = collect_inventory(FIX / "baremetal", udev={}, use_ipmitool=False)
    disks = {d["name"]: d for d in inv["disks"]}
    assert "serial" not in disks["sda"]
    assert inv["unavailable"]["disks.sda.serial"] == "not reported by the device"
    assert disks["sda"]["by_path"] == "/dev/disk/by-path/pci-0000:00:17.0-ata-1"  # /dev/disk
    assert "disks.sdb.by_path" in inv["unavailable"]


def test_baremetal_nics_physical_only_and_booted() -> None:
    inv = baremetal(boot_mac="b4:96:91:3a:7c:11")
    nics = {n["name"]: n for n in inv["nics"]}
    assert sorted(nics) == ["eno1", "eno2"]          # docker0 and lo left out
    assert nics["eno1"] == {"name": "eno1", "mac": "b4:96:91:3a:7c:10", "booted": False,
                            "driver": "ixgbe", "speed_mbps": 10000, "link": True,
                            "pci_address": "0000:19:00.0"}
    assert nics["eno2"]["booted"] is True and nics["eno2"]["link"] is False
    assert "speed_mbps" not in nics["eno2"] and "nics.eno2.speed_mbps" in inv["unavailable"]


def test_vm_capture_has_no_dmi_but_reasons() -> None:
    inv = collect_inventory(FIX / "vm-capture", udev={}, use_ipmitool=False)
    assert inv["system"] == {}
    assert inv["unavailable"]["system.serial"].startswith("no DMI")
    assert inv["firmware"] == {"mode": "bios", "secure_boot": False}
    assert [d["name"] for d in inv["disks"]] == ["vda"]       # loop*, zram0 left out
    assert [n["name"] for n in inv["nics"]] == ["eth0"]        # ifb*, lo left out
    assert inv["nics"][0]["driver"] == "virtio_net"
    assert inv["nics"][0]["pci_address"] == "0000:00:03.0"


def test_container_lists_virtual_nic_and_never_crashes() -> None:
    inv = collect_inventory(FIX / "container", udev={}, use_ipmitool=False)
    assert inv["disks"] == []
    assert [n["mac"] for n in inv["nics"]] == ["02:42:ac:11:00:02"]
    assert "driver" not in inv["nics"][0]
    assert "nics.physical" in inv["unavailable"]
    assert inv["unavailable"]["firmware.mode"].startswith("no /sys/firmware")
    assert "cpu.sockets" in inv["unavailable"]


def test_empty_root_gives_reasons_not_errors(tmp_path: Path) -> None:
    inv = collect_inventory(tmp_path, udev={}, use_ipmitool=False)
    assert inv["cpu"] == {} and inv["unavailable"]["cpu"] == "/proc/cpuinfo unreadable"
    assert inv["unavailable"]["nics"] == "no Ethernet interface found"
    assert not any(v.startswith("error:") for v in inv["unavailable"].values())


def test_section_bug_becomes_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.inventory.cpu as cpu

    def boom(*a: object) -> None:
        raise RuntimeError("parser bug")
    monkeypatch.setattr(cpu, "parse_cpuinfo", boom)
    inv = collect_inventory(FIX / "vm-capture", udev={}, use_ipmitool=False)
    assert inv["cpu"] == {} and inv["unavailable"]["cpu"] == "error: RuntimeError: parser bug"
    assert inv["disks"]          # the other sections still there


# --- pure parsers, table style ----------------------------------------------------


@pytest.mark.parametrize(("raw", "data", "why"), [
    ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)",
      "product_serial": "", "product_uuid": "8E2B4F36-0000-4E3B-9A1C-0123456789AB"},
     {"vendor": "QEMU", "product": "Standard PC (Q35 + ICH9, 2009)",
      "uuid": "8e2b4f36-0000-4e3b-9a1c-0123456789ab"}, {"system.serial": "placeholder value ''"}),
    ({"sys_vendor": "Supermicro", "product_name": "To be filled by O.E.M.",
      "product_serial": AttrError("permission denied (run as root)"),
      "product_uuid": "03000200-0400-0500-0006-000700080009"},
     {"vendor": "Supermicro"},
     {"system.product": "placeholder value 'To be filled by O.E.M.'",
      "system.serial": "permission denied (run as root)",
      "system.uuid": "placeholder value '03000200-0400-0500-0006-000700080009'"}),
])
def test_parse_dmi(raw: dict, data: dict, why: dict) -> None:
    sec = parse_dmi(raw)
    assert sec.data == data
    assert sec.unavailable == why


@pytest.mark.parametrize(("raw", "data"), [
    ({"sysfs_firmware": True, "efi": True, "secure_boot_var": b"\x06\0\0\0\x00"},
     {"mode": "uefi", "secure_boot": False}),
    ({"sysfs_firmware": True, "efi": True, "secure_boot_var": AttrError("not present")},
     {"mode": "uefi", "secure_boot": None}),
    ({"sysfs_firmware": True, "efi": False}, {"mode": "bios", "secure_boot": False}),
])
def test_parse_firmware(raw: dict, data: dict) -> None:
    assert parse_firmware(raw).data == data


def test_parse_cpuinfo_arm64_uses_topology() -> None:
    text = (FIX / "cpuinfo-arm64.txt").read_text()
    sec = parse_cpuinfo(text, [("0", "0"), ("0", "1")])
    assert sec.data == {"threads": 2, "sockets": 1, "cores": 2}
    assert sec.unavailable == {"cpu.model": "/proc/cpuinfo names no model"}


def test_parse_cpuinfo_live_capture() -> None:
    sec = parse_cpuinfo((FIX / "vm-capture/proc/cpuinfo").read_text())
    assert sec.data == {"threads": 2, "model": "AMD EPYC", "sockets": 1, "cores": 2}


def test_parse_smbios_sizes_and_strings() -> None:
    from tests.fixtures.agent.make_fixtures import smbios_type17

    dimm = parse_smbios_memory_device(smbios_type17(0x8000 | 512, ["S1", "Micron", "0001",
                                                                  "PN"]))
    assert dimm == {"size_bytes": 512 * 1024, "slot": "S1", "type": "DDR4", "speed_mts": 3200,
                    "manufacturer": "Micron", "serial": "0001", "part_number": "PN"}
    ext = parse_smbios_memory_device(smbios_type17(0x7FFF, ["S2"], ext_size=131072,
                                                   manufacturer=0, serial=0, part=0))
    assert ext == {"size_bytes": 128 * 1024 ** 3, "slot": "S2", "type": "DDR4",
                   "speed_mts": 3200}
    assert parse_smbios_memory_device(smbios_type17(0, ["S3"])) is None


@pytest.mark.parametrize("raw", [b"", b"\x11\x05" + b"\0" * 30, b"\x10\x28" + b"\0" * 40,
                                 b"\x11\x28" + b"\0" * 38 + b"abc"])   # no double NUL
def test_parse_smbios_rejects_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedSMBIOS):
        parse_smbios_memory_device(raw)


def test_parse_memory_reports_malformed_entry() -> None:
    good = (FIX / "baremetal/sys/firmware/dmi/entries/17-0/raw").read_bytes()
    sec = parse_memory("MemTotal: 1024 kB\n", [good, b"\x11\x02"])
    assert len(sec.data["dimms"]) == 1
    assert sec.unavailable["memory.dimms"].startswith("malformed SMBIOS entry")
    assert parse_meminfo_total("MemFree: 3 kB\n") is None


def test_parse_udev_export_keys_by_sys_name() -> None:
    udev = parse_udev_export((FIX / "baremetal-udev-export.txt").read_text())
    assert udev["sda"]["ID_SERIAL_SHORT"] == "2049300AB1C2"
    assert udev["nvme0n1p1"]["DEVTYPE"] == "partition"
    assert "/dev/disk/by-path/pci-0000:00:17.0-ata-1" in udev["sda"]["DEVLINKS"]


def test_parse_disks_excludes_and_sorts() -> None:
    raw = [{"name": n, "devpath": f"/devices/x/{n}", "attrs": {"size": "8", "removable": "0",
                                                                 "queue/rotational": "0"}}
           for n in ("vdb", "loop1", "ram0", "zram0", "dm-0", "md127", "sr0", "nbd0", "vda")]
    raw.append({"name": "vdc", "devpath": "", "attrs": {"size": "0"}})   # no medium
    disks, _ = parse_disks(raw, {})
    assert [d["name"] for d in disks] == ["vda", "vdb"]


def test_parse_nics_ignores_bad_and_multicast_mac() -> None:
    raw = [{"name": "e0", "has_device": True,
            "attrs": {"type": "1", "address": "01:00:5e:00:00:01"}},
           {"name": "e1", "has_device": True, "attrs": {"type": "1", "address": "garbage"}},
           {"name": "ib0", "has_device": True, "attrs": {"type": "32", "address": "80:00:02:08"}}]
    nics, why = parse_nics(raw)
    assert nics == [] and why == {"nics": "no Ethernet interface found"}


def test_decide_boot_mac_order() -> None:
    nics = [{"name": "a", "mac": "02:00:00:00:00:0a", "link": False},
            {"name": "b", "mac": "02:00:00:00:00:0b", "link": True}]
    assert decide_boot_mac(nics, "02:00:00:00:00:0c", "a") == "02:00:00:00:00:0c"
    assert decide_boot_mac(nics, None, "a") == "02:00:00:00:00:0a"
    assert decide_boot_mac(nics, None, None) == "02:00:00:00:00:0b"
    assert decide_boot_mac([], None, None) is None
    route = (FIX / "baremetal/proc/net/route").read_text()
    assert parse_default_route_iface(route) == "eno2"


def test_pci_address_deepest_function() -> None:
    assert pci_address("/devices/pci0000:16/0000:16:02.0/0000:19:00.1/net/eno2") == "0000:19:00.1"
    assert pci_address("/devices/virtual/net/lo") is None


def test_parse_ipmitool_lan() -> None:
    assert parse_ipmitool_lan((FIX / "ipmitool-lan-print.txt").read_text()) == "10.20.30.41"
    assert parse_ipmitool_lan("IP Address              : 0.0.0.0\n") is None
    assert parse_ipmitool_lan("IP Address Source : DHCP\n") is None


@pytest.mark.parametrize(("lan", "data", "why"), [
    ((FIX / "ipmitool-lan-print.txt").read_text(), {"address": "10.20.30.41"}, {}),
    ("IP Address              : 0.0.0.0\n", {}, {"bmc": "ipmitool reports no BMC address"}),
    (AttrError("ipmitool not installed"), {}, {"bmc": "ipmitool not installed"}),
    (None, {}, {}),                                  # the reader failed: already recorded
])
def test_parse_bmc(lan: str | AttrError | None, data: dict, why: dict) -> None:
    sec = parse_bmc(lan)
    assert (sec.data, sec.unavailable) == (data, why)


@pytest.mark.parametrize(("counts", "data", "why"), [
    ({"threads": 8, "cores": 4}, {"threads": 8, "cores": 4}, {}),
    ({"threads": 2}, {"threads": 2}, {}),
    ({}, {}, {"cpu": "/proc/cpuinfo unreadable"}),
])
def test_parse_psutil_cpu(counts: dict, data: dict, why: dict) -> None:
    sec = parse_psutil_cpu(counts)
    assert (sec.data, sec.unavailable) == (data, why)


@pytest.mark.parametrize(("total", "text", "parsed"), [
    (8 * 1024 ** 3, "MemTotal: 8388608 kB\n", 8 * 1024 ** 3),
    (1536, "MemTotal: 1 kB\n", 1024),                # whole kB, as /proc/meminfo says
    (0, None, None),
    (None, None, None),
])
def test_build_meminfo(total: int | None, text: str | None, parsed: int | None) -> None:
    assert build_meminfo(total) == text
    assert (parse_meminfo_total(text) if text else None) == parsed


@pytest.mark.parametrize(("found", "why", "speeds", "nics", "left"), [
    ([{"name": "eth0"}], {"nics.eth0.speed_mbps": "unknown to the driver"}, {"eth0": 1000},
     [{"name": "eth0", "speed_mbps": 1000}], {}),
    ([{"name": "eth0", "speed_mbps": 100}], {}, {"eth0": 1000},       # sysfs wins
     [{"name": "eth0", "speed_mbps": 100}], {}),
    ([{"name": "eth0"}], {"nics.eth0.speed_mbps": "x"}, {"eth0": 0},  # psutil: unknown
     [{"name": "eth0"}], {"nics.eth0.speed_mbps": "x"}),
    ([{"name": "eth0"}], {"nics.eth0.speed_mbps": "x"}, {"eth0": -1},
     [{"name": "eth0"}], {"nics.eth0.speed_mbps": "x"}),
    ([{"name": "eth0"}, {"name": "eth1"}], {"nics.eth0.speed_mbps": "x", "nics": "y"},
     {"eth1": 25000}, [{"name": "eth0"}, {"name": "eth1", "speed_mbps": 25000}],
     {"nics.eth0.speed_mbps": "x", "nics": "y"}),
    ([], {}, {"eth0": 1000}, [], {}),
])
def test_decide_speeds(found: list, why: dict, speeds: dict, nics: list, left: dict) -> None:
    before = (json.dumps(found), json.dumps(why))
    assert decide_speeds(found, why, speeds) == (nics, left)
    assert (json.dumps(found), json.dumps(why)) == before       # the inputs are not changed


@pytest.mark.parametrize(("text", "server", "mac", "live"), [
    ("BOOT_IMAGE=/vmlinuz lpmos.server=http://10.77.0.1:8081/ BOOTIF=01-52-54-00-12-34-56 quiet",
     "http://10.77.0.1:8081", "52:54:00:12:34:56", True),
    ("root=/dev/sda1 ro", None, None, False),
    ("lpmos.server=ftp://x BOOTIF=zz", None, None, False),
    ("lpmos.mac=52:54:00:AA:BB:CC -- lpmos.server=http://ignored", None, "52:54:00:aa:bb:cc",
     False),
    ('unbalanced "quote lpmos.server=http://h:1', "http://h:1", None, True),
])
def test_parse_cmdline(text: str, server: str | None, mac: str | None, live: bool) -> None:
    params = parse_cmdline(text)
    assert (params.server, params.boot_mac, params.live) == (server, mac, live)


def test_parse_bootif_forms() -> None:
    assert parse_bootif("01-aa-bb-cc-dd-ee-ff") == "aa:bb:cc:dd:ee:ff"
    assert parse_bootif("01-01-bb-cc-dd-ee-ff") is None          # multicast bit set
    assert parse_bootif("52-54-00-12-34-56") == "52:54:00:12:34:56"
    assert parse_bootif("") is None


def test_smbios_fixture_is_struct_sane() -> None:
    raw = (FIX / "baremetal/sys/firmware/dmi/entries/17-2/raw").read_bytes()
    assert raw[0] == 17 and struct.unpack_from("<H", raw, 0x0C)[0] == 0x7FFF
