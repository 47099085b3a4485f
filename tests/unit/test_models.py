from __future__ import annotations

import pytest

from lpmos.models import (
    LOG_LINES_KEPT,
    ProgressEvent,
    Server,
    Task,
    ValidationError,
    clean_message,
    normalize_mac,
    validate_name,
    validate_sn,
)


@pytest.mark.parametrize("raw", ["00:1A:2B:3C:4D:5E", "00-1a-2b-3c-4d-5e", "001a.2b3c.4d5e",
                                 "001A2B3C4D5E", " 00:1a:2b:3c:4d:5e "])
def test_mac_normalised_to_lowercase_colons(raw: str) -> None:
    assert normalize_mac(raw) == "00:1a:2b:3c:4d:5e"


@pytest.mark.parametrize("raw", ["", "00:1a:2b:3c:4d", "00:1a:2b:3c:4d:5e:6f", "zz:1a:2b:3c:4d:5e",
                                 "01:00:5e:00:00:01", None, 12])
def test_bad_macs_refused(raw: object) -> None:
    with pytest.raises(ValidationError) as err:
        normalize_mac(raw)
    assert err.value.field == "mac"


@pytest.mark.parametrize("sn", ["sn-001", "ABC123", "x", "a.b_c-d", "A" * 64])
def test_good_sns(sn: str) -> None:
    assert validate_sn(sn) == sn


@pytest.mark.parametrize("sn", ["", "-lead", "a/b", "../x", "a b", "A" * 65, "sn\n", "<img>",
                                "{{7*7}}"])
def test_bad_sns(sn: str) -> None:
    with pytest.raises(ValidationError):
        validate_sn(sn)


@pytest.mark.parametrize("idc", ["", "DC1", "dc 1", "a" * 33, "audit", "_x", "dc/1"])
def test_bad_idcs(idc: str) -> None:
    with pytest.raises(ValidationError):
        validate_name(idc, "idc")


def test_task_json_roundtrip_and_normalisation() -> None:
    task = Task(idc="dc1", sn="sn-001", mac="00-1A-2B-3C-4D-5E", os_type="Ubuntu 22.04",
                os_version="22.04", params={"k": [1, 2]}).validate()
    assert task.mac == "00:1a:2b:3c:4d:5e"
    again = Task.from_json(task.to_json())
    assert again == task


def test_task_log_is_bounded_and_inert() -> None:
    task = Task(idc="dc1", sn="s", mac="00:00:00:00:00:02", os_type="x")
    for i in range(LOG_LINES_KEPT + 50):
        task.add_log(f"line {i}\n#!ipxe\x00")
    assert len(task.logs) == LOG_LINES_KEPT
    assert task.logs[-1].startswith(f"line {LOG_LINES_KEPT + 49}")
    assert "\n" not in task.logs[-1] and "\x00" not in task.logs[-1]


def test_task_from_dict_requires_fields_and_names_them() -> None:
    with pytest.raises(ValidationError) as err:
        Task.from_dict({"idc": "dc1", "sn": "s"})
    assert err.value.field == "mac"
    with pytest.raises(ValidationError):
        Task.from_json(b"not json")


def test_server_roundtrip() -> None:
    server = Server(idc="dc1", sn="s1", macs=["52:54:00:AA:BB:CC"],
                    uuid="4C4C4544-0042-1234-8056-B2C04F123456", inventory={"cpu": {}}).validate()
    assert server.macs == ["52:54:00:aa:bb:cc"]
    assert server.uuid == "4c4c4544-0042-1234-8056-b2c04f123456"
    assert Server.from_json(server.to_json()) == server


@pytest.mark.parametrize("bad,field", [
    ({"seq": -1}, "seq"), ({"seq": True}, "seq"), ({"percent": 101}, "percent"),
    ({"kind": "boom"}, "kind"), ({"kind": "state", "status": "approved"}, "status"),
    ({"source": "Bad Source"}, "source"), ({"bytes_done": -5}, "bytes_done"),
])
def test_progress_event_validation(bad: dict, field: str) -> None:
    data = {"source": "agent", "seq": 1, **bad}
    with pytest.raises(ValidationError) as err:
        ProgressEvent.from_dict(data)
    assert err.value.field == field


def test_progress_event_message_made_inert() -> None:
    ev = ProgressEvent.from_dict({"source": "agent", "seq": 3, "message": "a\nb\x1b[31m",
                                  "percent": 50})
    assert ev.message == "a b [31m" and ev.percent == 50.0 and ev.event_id == "agent:3"
    assert len(clean_message("x" * 5000)) == 1000
