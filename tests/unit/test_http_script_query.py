"""The boot script request of ``/boot/<mac>.ipxe?...``: the MAC is
required, every query value is clamped or dropped, never refused."""

from __future__ import annotations

import pytest

from bootsvc.http.script_query import BadScriptPath, ScriptQuery, parse_script_query

MAC = "52:54:00:12:34:56"
UUID = "0a1b2c3d-0000-4000-8000-00000000abcd"


@pytest.mark.parametrize(("name", "args", "expected"), [
    (f"{MAC}.ipxe", {}, ScriptQuery(MAC)),
    ("52-54-00-12-34-56.ipxe", {}, ScriptQuery(MAC)),
    ("52:54:00:AB:CD:EF.ipxe", {}, ScriptQuery("52:54:00:ab:cd:ef")),
    (f"{MAC}.ipxe", {"uuid": UUID}, ScriptQuery(MAC, uuid=UUID)),
    (f"{MAC}.ipxe", {"uuid": "not-a-uuid"}, ScriptQuery(MAC)),
    (f"{MAC}.ipxe", {"uuid": ""}, ScriptQuery(MAC)),
    (f"{MAC}.ipxe", {"serial": "S" * 100}, ScriptQuery(MAC, serial="S" * 64)),
    (f"{MAC}.ipxe", {"arch": "X86_64"}, ScriptQuery(MAC, arch="x86_64")),
    (f"{MAC}.ipxe", {"arch": "x86 64;rm -rf /"}, ScriptQuery(MAC, arch="x8664rm-rf")),
    (f"{MAC}.ipxe", {"platform": "efi" * 10}, ScriptQuery(MAC, platform=("efi" * 10)[:16])),
    (f"{MAC}.ipxe", {"bootmac": "52:54:00:AA:BB:CC"},
     ScriptQuery(MAC, bootmac="52:54:00:aa:bb:cc")),
    (f"{MAC}.ipxe", {"bootmac": "junk"}, ScriptQuery(MAC)),
])
def test_parse_script_query_clamps_or_drops_query_values(
        name: str, args: dict[str, str], expected: ScriptQuery) -> None:
    assert parse_script_query(name, args) == expected


@pytest.mark.parametrize(("name", "status", "error", "reason"), [
    (MAC, 404, "not_found", "bad_boot_path"),
    (f"{MAC}.efi", 404, "not_found", "bad_boot_path"),
    ("nomac.ipxe", 400, "bad_mac", "bad_mac"),
    (".ipxe", 400, "bad_mac", "bad_mac"),
    ("52:54:00:12:34.ipxe", 400, "bad_mac", "bad_mac"),
])
def test_parse_script_query_refuses_a_path_without_a_mac(
        name: str, status: int, error: str, reason: str) -> None:
    with pytest.raises(BadScriptPath) as caught:
        parse_script_query(name, {})
    assert (caught.value.status, caught.value.error, caught.value.reason) == \
        (status, error, reason)
