"""Registration's pure decisions as tables: the token, each MAC's index
entry, and the server record written."""

from __future__ import annotations

import json

import pytest

from bootsvc.state.registration import (
    RegisterRequest,
    TokenAction,
    build_server_record,
    decide_mac_owner,
    decide_token,
)
from bootsvc.state.tokens import token_digest
from lpmos.models import Server, ValidationError

BOOT = "0f0e0d0c-0b0a-0908-0706-050403020100"


def record(token: str = "tok", boot_id: str = "") -> bytes:
    data = {"sha256": token_digest(token), "issued_at": 1.0, "node": "n1", "why": "registration"}
    if boot_id:
        data["boot_sha256"] = token_digest(boot_id)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("stored", "presented", "boot_id", "action"), [
    (None, None, "", "issue"),                          # first registration
    (None, "stale", BOOT, "issue"),                     # a token no longer stored
    (record(), "tok", "", "keep"),
    (record(boot_id=BOOT), "tok", "other-boot", "keep"),
    (record(), None, "", "refuse"),
    (record(), "", "", "refuse"),
    (record(), "wrong", "", "refuse"),
    (record(boot_id=BOOT), None, BOOT, "reissue"),      # the same boot, its answer lost
    (record(boot_id=BOOT), "wrong", BOOT, "reissue"),
    (record(boot_id=BOOT), None, "1f0e0d0c-0b0a-0908-0706-050403020100", "refuse"),
    (record(), None, BOOT, "refuse"),                   # issued to no known boot
    (b"not json", "tok", "", "refuse"),                 # an unreadable record holds
    (b"not json", None, BOOT, "refuse"),
    (b'{"sha256": 5}', "tok", "", "refuse"),
])
def test_decide_token(stored: bytes | None, presented: str | None, boot_id: str,
                      action: TokenAction) -> None:
    assert decide_token(stored, presented, boot_id) == action


@pytest.mark.parametrize(("owner", "decision"), [
    ("", "claim"),                      # not indexed yet
    ("SN1", "own"),
    ("mac-525400000001", "claim"),      # this MAC's placeholder identity
    ("mac-525400000099", "claim"),      # any placeholder identity
    ("SN2", "taken"),                   # another machine: the index keeps it
])
def test_decide_mac_owner(owner: str, decision: str) -> None:
    assert decide_mac_owner("SN1", "52:54:00:00:00:01", owner) == decision


def request(*, uuid: str = "", boot_mac: str = "52:54:00:00:00:01") -> RegisterRequest:
    return RegisterRequest(sn="SN1", uuid=uuid, macs=["52:54:00:00:00:01"], boot_mac=boot_mac,
                           arch="x86_64", inventory={"cpu": {"cores": 2}}, agent_version="1")


UUID_A = "8e2b4f36-0000-4e3b-9a1c-0123456789ab"
UUID_B = "8e2b4f36-0000-4e3b-9a1c-0123456789ac"


@pytest.mark.parametrize(("old", "req", "taken", "expect"), [
    (None, request(), [],
     {"first_seen": 5.0, "macs": ["52:54:00:00:00:01"], "conflict": ""}),
    (Server(idc="dc1", sn="SN1", macs=["52:54:00:00:00:02"], first_seen=1.0, uuid=UUID_A),
     request(), [],
     {"first_seen": 1.0, "macs": ["52:54:00:00:00:02", "52:54:00:00:00:01"], "uuid": UUID_A,
      "conflict": ""}),
    (Server(idc="dc1", sn="SN1", uuid=UUID_A), request(uuid=UUID_B), [],
     {"uuid": UUID_B,
      "conflict": f"uuid {UUID_B} registered for SN1, which had uuid {UUID_A}"}),
    (None, request(), [("52:54:00:00:00:01", "SN2")],
     {"conflict": "mac 52:54:00:00:00:01 also belongs to SN2"}),
    (Server(idc="dc1", sn="SN1", uuid=UUID_A), request(uuid=UUID_B),
     [("52:54:00:00:00:01", "SN2")],
     {"conflict": f"uuid {UUID_B} registered for SN1, which had uuid {UUID_A}; "
                  "mac 52:54:00:00:00:01 also belongs to SN2"}),
    (Server(idc="dc1", sn="SN1", conflict="flagged before"), request(),
     [("52:54:00:00:00:01", "SN2")], {"conflict": "flagged before"}),
    (None, request(), [(f"52:54:00:00:00:{i:02x}", "SN" + "x" * 40) for i in range(10)],
     {"conflict_len": 300}),
    (Server(idc="dc1", sn="SN1", macs=[f"52:54:00:00:01:{i:02x}" for i in range(64)]),
     request(), [], {"macs_len": 64}),
])
def test_build_server_record(old: Server | None, req: RegisterRequest,
                             taken: list[tuple[str, str]], expect: dict[str, object]) -> None:
    before = None if old is None else old.to_json()
    server = build_server_record(old, req, idc="dc1", sn="SN1", ip="10.0.0.7" + "9" * 80,
                                 stamp=5.0, taken=taken)
    got = server.to_dict()
    got["conflict_len"] = len(server.conflict)
    got["macs_len"] = len(server.macs)
    assert {k: got[k] for k in expect} == expect
    assert (server.idc, server.sn, server.state, server.last_seen) == ("dc1", "SN1",
                                                                     "registered", 5.0)
    assert (server.arch, server.inventory, server.boot_mac) == (
        "x86_64", {"cpu": {"cores": 2}}, "52:54:00:00:00:01")
    assert server.ip == ("10.0.0.7" + "9" * 80)[:64]
    assert (None if old is None else old.to_json()) == before     # old is not changed


def test_build_server_record_validates() -> None:
    with pytest.raises(ValidationError):
        build_server_record(None, request(boot_mac="nonsense"), idc="dc1", sn="SN1", ip="",
                            stamp=1.0, taken=[])
