from __future__ import annotations

from lpmos.store.etcd import prefix_end
from lpmos.store.keys import Keys, ParsedKey


def test_keys_follow_design_schema_and_parse_back() -> None:
    k = Keys("/os")
    assert k.task("dc1", "sn-1") == "/os/dc1/machines/sn-1/task"
    assert k.lease("dc1", "sn-1") == "/os/dc1/machines/sn-1/lease"
    assert k.server("dc1", "sn-1") == "/os/dc1/servers/sn-1"
    assert k.mac("dc1", "00:11:22:33:44:55") == "/os/dc1/macs/00:11:22:33:44:55"
    assert k.node("dc1", "n1") == "/os/dc1/nodes/n1"
    assert k.audit("20261127T000000.000000Z", "ab").startswith("/os/audit/")
    assert k.parse(k.task("dc1", "sn-1")) == ParsedKey("task", "dc1", "sn-1")
    assert k.parse(k.server("dc2", "x")) == ParsedKey("server", "dc2", "x")
    assert k.parse(k.mac("dc1", "00:11:22:33:44:55")).kind == "mac"
    assert k.parse("/os/_auth/users/bob") is None
    assert k.parse("/other/dc1/machines/x/task") is None


def test_prefix_is_configurable_and_normalised() -> None:
    assert Keys("custom/").task("dc1", "s") == "/custom/dc1/machines/s/task"


def test_prefix_end() -> None:
    assert prefix_end("/os/") == b"/os0"
    assert prefix_end("ab") == b"ac"
