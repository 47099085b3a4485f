"""The pure parts of power control (issue #21): the BMC record and its
input, the request state machine, the claim/takeover decision, the retry
delays, and the mapping of every driver error to an operator's reason."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import requests
from pyghmi import exceptions as ipmi_exc
from sushy import exceptions as sushy_exc

from bootsvc.power.errors import BmcError, Where, classify
from lpmos.models import ValidationError
from lpmos.power import (
    CLAIM_TTL,
    CYCLE_SETTLE,
    QUEUE_TTL,
    BmcRecord,
    BmcSecret,
    PowerRequest,
    claim,
    coming_cycle,
    decide_claim,
    finish,
    new_request,
    next_step,
    parse_bmc_put,
    retry_delay,
    valid_request_id,
)
from lpmos.store.keys import Keys

NOW = 1_800_000_000.0
REDFISH = Where("https://10.0.0.9:443", "redfish", "admin", 10.0)
IPMI = Where("10.0.0.9:623", "ipmi", "admin", 10.0)


def _response(status: int, body: dict[str, Any] | None = None) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r._content = json.dumps(body or {}).encode()
    r.url = "https://10.0.0.9/redfish/v1/Systems"
    return r


# -- error mapping -------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "where", "kind", "words"), [
    (sushy_exc.AccessError("GET", "https://10.0.0.9/redfish/v1/", _response(401)), REDFISH,
     "auth", "BMC refused the credentials of user 'admin' at https://10.0.0.9:443"),
    (sushy_exc.ConnectionError(url="https://10.0.0.9/redfish/v1/",
                               error="Failed to establish a new connection: [Errno 111] "
                                     "Connection refused (connect timeout=5)"), REDFISH,
     "unreachable", "BMC unreachable at https://10.0.0.9:443: connection refused"),
    (sushy_exc.ConnectionError(url="https://10.0.0.9/redfish/v1/",
                               error="Read timed out. (read timeout=10)"), REDFISH,
     "timeout", "did not answer within 10 s"),
    (sushy_exc.ConnectionError(url="https://10.0.0.9/redfish/v1/",
                               error="[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                                     "failed"), REDFISH, "unreachable", "verify_tls"),
    (sushy_exc.ServerSideError("POST", "https://10.0.0.9/x", _response(503)), REDFISH,
     "bmc_error", "(HTTP 503)"),
    (sushy_exc.BadRequestError("POST", "https://10.0.0.9/x", _response(400)), REDFISH,
     "unsupported", "refused the request (HTTP 400)"),
    (sushy_exc.ResourceNotFoundError("GET", "https://10.0.0.9/x", _response(404)), REDFISH,
     "config", "options.system"),
    (sushy_exc.MissingAttributeError(attribute="PowerState", resource="/redfish/v1/Systems/1"),
     REDFISH, "protocol", "unexpected Redfish reply"),
    (json.JSONDecodeError("Expecting value", "<html>", 0), REDFISH, "protocol",
     "not valid Redfish"),
    (requests.exceptions.JSONDecodeError("Expecting value", "<html>", 0), REDFISH, "protocol",
     "not valid Redfish"),
    (ipmi_exc.IpmiException("Incorrect password provided"), IPMI, "auth",
     "BMC refused the credentials of user 'admin' at 10.0.0.9:623"),
    (ipmi_exc.IpmiException("Unauthorized name"), IPMI, "auth", "refused the credentials"),
    (ipmi_exc.IpmiException(None), IPMI, "timeout", "did not answer over IPMI (UDP)"),
    (ipmi_exc.IpmiException("Session no longer connected: timeout"), IPMI, "timeout",
     "did not answer"),
    (ipmi_exc.IpmiException("Node busy"), IPMI, "bmc_error", "IPMI error: Node busy"),
    (socket.gaierror(-2, "Name or service not known"), IPMI, "unreachable",
     "does not resolve"),
    (ConnectionRefusedError(111, "Connection refused"), IPMI, "unreachable",
     "connection refused"),
    (TimeoutError(), REDFISH, "timeout", "did not answer within 10 s"),
    (OSError(113, "No route to host"), REDFISH, "unreachable", "No route to host"),
    (RuntimeError("odd"), REDFISH, "bmc_error", "RuntimeError: odd"),
])
def test_driver_errors_map_to_a_kind_and_a_reason(exc: BaseException, where: Where, kind: str,
                                                   words: str) -> None:
    err = classify(exc, where)
    assert err.kind == kind
    assert words in err.reason
    assert len(err.reason) <= 300


def test_retryable_only_where_trying_again_may_help() -> None:
    assert BmcError("unreachable", "x").retryable and BmcError("timeout", "x").retryable
    assert BmcError("bmc_error", "x").retryable
    for kind in ("auth", "protocol", "unsupported", "config", "interrupted"):
        assert not BmcError(kind, "x").retryable
    same = BmcError("auth", "kept")
    assert classify(same, REDFISH) is same


# -- records ---------------------------------------------------------------------------


def _put(body: dict[str, Any], **kw: Any) -> tuple[BmcRecord, str | None]:
    args: dict[str, Any] = {"idc": "dc1", "sn": "SN1", "inventory_address": None,
                            "existing": None, "by": "admin1", "now": NOW, **kw}
    return parse_bmc_put(body, **args)


def test_bmc_put_prefills_the_inventory_address_and_keeps_a_stored_password() -> None:
    record, password = _put({"driver": "ipmi", "user": "root", "password": "s3cret"},
                            inventory_address="10.1.2.3")
    assert (record.address, record.source, password) == ("10.1.2.3", "inventory", "s3cret")
    assert record.endpoint() == "10.1.2.3:623" and record.has_password
    again, password = _put({"driver": "ipmi", "user": "admin"}, existing=record)
    assert password is None and again.has_password and again.user == "admin"
    rf, _ = _put({"driver": "redfish", "address": "BMC-7.Example.net", "user": "u",
                  "password": "p", "port": 8443, "options": {"scheme": "https"}})
    assert rf.endpoint() == "https://bmc-7.example.net:8443"
    v6, _ = _put({"driver": "redfish", "address": "[fd00::9]", "user": "u", "password": "p"})
    assert v6.endpoint() == "https://[fd00::9]:443"


@pytest.mark.parametrize(("body", "field"), [
    ([], "bmc"),
    ({"driver": "redfish", "address": "a b", "user": "u", "password": "p"}, "address"),
    ({"driver": "redfish", "address": "10.0.0.1/24", "user": "u", "password": "p"}, "address"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "", "password": "p"}, "user"),
    ({"driver": "ipmi", "address": "10.0.0.1", "user": "u" * 17, "password": "p"}, "user"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": "p\x00"},
     "password"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": "p",
      "port": True}, "port"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": "p",
      "options": {"verify_tls": "no"}}, "options.verify_tls"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": "p",
      "options": {"system": "/etc/passwd"}}, "options.system"),
])
def test_bad_bmc_input_names_its_field(body: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        _put(body)
    assert info.value.field == field


def test_records_round_trip_and_the_secret_hides_itself() -> None:
    record, _ = _put({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": "p",
                      "options": {"system": "/redfish/v1/Systems/abc", "verify_tls": False}})
    assert BmcRecord.from_json(record.to_json()) == record
    assert "password" not in json.loads(record.to_json())
    secret = BmcSecret("hunter2-x", NOW)
    assert "hunter2-x" not in repr(secret) and "hunter2-x" not in str(secret)
    assert BmcSecret.from_json(secret.to_json()).password == "hunter2-x"
    with pytest.raises(ValidationError):
        BmcRecord.from_json(b'{"driver": "redfish"}')


# -- requests and decisions ----------------------------------------------------------------


def _req(action: str = "provision", at: float = NOW) -> PowerRequest:
    return new_request("dc1", "SN1", action, by="op", now=at, task_attempt=1)


def test_a_request_round_trips_and_lists_its_steps() -> None:
    req = _req()
    assert valid_request_id(req.id) and not valid_request_id("../x")
    assert [s.name for s in req.steps] == ["pxe-once", "cycle"]
    again = PowerRequest.from_json(req.to_json())
    assert again == req
    with pytest.raises(ValidationError):
        new_request("dc1", "SN1", "explode", by="op", now=NOW)
    with pytest.raises(ValidationError):
        new_request("dc1", "SN1", "on", by="op", now=NOW, deadline=1000)
    with pytest.raises(ValidationError):
        PowerRequest.from_json(b'{"id": "x", "action": "on"}')


def _claimed(running: str = "", age: float = 0.0) -> PowerRequest:
    req = _req(at=NOW - age - 1)
    claim(req, "n1", NOW - age)
    for step in req.steps:
        if step.name == running:
            step.state = "running"
        elif running and step.name == "pxe-once":
            step.state = "done"
    return req


@pytest.mark.parametrize(("req", "now", "what", "words"), [
    (_req(), NOW + 1, "claim", ""),
    (_req(), NOW + QUEUE_TTL + 1, "fail", "not carried out late"),
    (_claimed(), NOW + 5, "wait", ""),
    (_claimed(age=CLAIM_TTL + 1), NOW, "claim", ""),                    # took no step yet
    (_claimed("pxe-once", age=CLAIM_TTL + 1), NOW, "claim", ""),        # idempotent: again
    (_claimed("cycle", age=CLAIM_TTL + 1), NOW, "fail", "not repeated"),  # never twice
    (_claimed(age=QUEUE_TTL + 1), NOW, "fail", "not carried out late"),
])
def test_claim_decision(req: PowerRequest, now: float, what: str, words: str) -> None:
    decision = decide_claim(req, now)
    assert decision.what == what
    assert words in decision.reason


def _scheduled(not_before: float = 0.0, window: str = "", at: float = NOW,
               claimed_at: float = 0.0, running: str = "") -> PowerRequest:
    req = new_request("dc1", "SN1", "provision", by="op", now=at, task_attempt=1,
                      not_before=not_before, window=window)
    if claimed_at:
        claim(req, "n1", claimed_at)
        for step in req.steps:
            if step.name == running:
                step.state = "running"
    return req


HOUR = 3600.0

#: NOW is 08:00 UTC.  (request, now, what, words in the reason, retry_at)
SCHEDULED = [
    # not_before: waits until it, then has the whole queue TTL from it
    (_scheduled(NOW + HOUR), NOW, "wait", "not before", NOW + HOUR),
    (_scheduled(NOW + HOUR), NOW + HOUR, "claim", "", 0.0),
    (_scheduled(NOW + HOUR), NOW + HOUR + QUEUE_TTL - 1, "claim", "", 0.0),
    (_scheduled(NOW + HOUR), NOW + HOUR + QUEUE_TTL + 1, "fail", "not carried out late", 0.0),
    (_scheduled(NOW - 2 * HOUR, at=NOW - 3 * HOUR), NOW, "fail", "not carried out late", 0.0),
    # a window: closed now (08:00), opens at 22:00; late only once it closes
    (_scheduled(window="22:00-04:00"), NOW, "wait", "window 22:00-04:00", NOW + 14 * HOUR),
    (_scheduled(window="22:00-04:00"), NOW + 14 * HOUR, "claim", "", 0.0),
    (_scheduled(window="22:00-04:00"), NOW + 19 * HOUR, "claim", "", 0.0),   # 03:00, node back
    (_scheduled(window="22:00-04:00"), NOW + 20 * HOUR, "wait", "window", NOW + 38 * HOUR),
    (_scheduled(window="07:00-09:00", at=NOW - 30 * HOUR), NOW, "claim", "", 0.0),
    # both: the first opening after not_before
    (_scheduled(NOW + 16 * HOUR, "22:00-04:00"), NOW + 14 * HOUR, "wait", "not before",
     NOW + 16 * HOUR),
    # a node died holding a scheduled request: taken over inside the window, not outside
    (_scheduled(window="22:00-04:00", claimed_at=NOW + 14 * HOUR),
     NOW + 14 * HOUR + CLAIM_TTL + 1, "claim", "", 0.0),
    (_scheduled(window="22:00-04:00", claimed_at=NOW + 19.9 * HOUR),
     NOW + 20.5 * HOUR, "fail", "window closed", 0.0),
    (_scheduled(window="22:00-04:00", claimed_at=NOW + 14 * HOUR, running="cycle"),
     NOW + 15 * HOUR, "fail", "not repeated", 0.0),
]


@pytest.mark.parametrize(("req", "now", "what", "words", "retry_at"), SCHEDULED)
def test_a_scheduled_request_waits_for_its_time(req: PowerRequest, now: float, what: str,
                                                words: str, retry_at: float) -> None:
    decision = decide_claim(req, now)
    assert (decision.what, decision.retry_at if what == "wait" else 0.0) == (what, retry_at)
    assert words in decision.reason


def test_a_scheduled_request_round_trips_its_schedule() -> None:
    req = _scheduled(NOW + HOUR, "22:00-04:00")
    again = PowerRequest.from_json(req.to_json())
    assert (again.not_before, again.window) == (NOW + HOUR, "22:00-04:00")


def test_final_requests_are_left_alone_and_claims_reset_a_begun_idempotent_step() -> None:
    req = _claimed("pxe-once", age=CLAIM_TTL + 1)
    claim(req, "n2", NOW)
    assert (req.node, req.claims, req.steps[0].state) == ("n2", 2, "pending")
    step = next_step(req)
    assert step is not None and step.name == "pxe-once"
    step.state = "done"
    req.steps[1].state = "running"
    finish(req, NOW + 3, error="BMC refused the credentials", error_kind="auth")
    assert req.state == "failed" and req.steps[1].state == "failed"
    assert decide_claim(req, NOW + 10_000).what == "none"
    assert "failed on node n2: BMC refused the credentials" in req.describe()
    ok = _req("on")
    claim(ok, "n1", NOW)
    ok.steps[0].state = "done"
    finish(ok, NOW + 1)
    assert ok.state == "done" and next_step(ok) is None


def _done(req: PowerRequest) -> PowerRequest:
    for step in req.steps:
        step.state = "done"
    finish(req, NOW)
    return req


def _cycled(req: PowerRequest) -> PowerRequest:
    for step in req.steps:
        step.state = "done"
    return req


def _cycled_at(req: PowerRequest, at: float) -> PowerRequest:
    for step in req.steps:
        step.state, step.at = "done", at
    return req


#: (requests of the machine, the task's attempt, now, the one still coming or None)
COMING = [
    ([], 1, NOW, None),
    ([_req()], 1, NOW, 0),                                 # queued by the approval
    ([_claimed("cycle")], 1, NOW, 0),                      # a node is cycling it now
    ([_claimed()], 1, NOW, 0),                             # claimed, PXE not set yet
    ([_req()], 2, NOW, None),                              # another attempt's
    ([_req("pxe-once")], 1, NOW, None),                    # no cycle in it
    ([_req("on")], 1, NOW, None),
    ([_done(_req())], 1, NOW, None),                       # done: the machine was cycled
    ([_cycled(_claimed())], 1, NOW, None),                 # cycled, result not yet written
    ([_req()], 1, NOW + QUEUE_TTL + 5, None),              # nobody took it: it never will
    ([_scheduled(NOW + HOUR)], 1, NOW, 0),                 # waiting for its schedule
    ([_done(_req()), _req(at=NOW + 1)], 1, NOW + 2, 1),
    ([_done(_cycled_at(_req(), NOW))], 1, NOW + 5, 0),      # the BMC took it 5 s ago
    ([_cycled_at(_claimed(), NOW)], 1, NOW + 5, 0),
    ([_done(_cycled_at(_req(), NOW))], 1, NOW + CYCLE_SETTLE + 1, None),  # it has reset
    ([_done(_cycled_at(_req(), NOW))], 2, NOW + 5, None),   # another attempt's
]


@pytest.mark.parametrize(("requests_", "attempt", "now", "index"), COMING)
def test_a_coming_cycle_is_one_of_the_attempt_still_to_power_cycle(
        requests_: list[PowerRequest], attempt: int, now: float, index: int | None) -> None:
    found = coming_cycle(requests_, attempt, now)
    assert found is (None if index is None else requests_[index])


def test_retry_delays_grow_to_a_cap_with_jitter() -> None:
    assert retry_delay(1, 0.5) == pytest.approx(0.5)
    assert retry_delay(2, 0.5) == pytest.approx(1.0)
    assert retry_delay(10, 0.5) == pytest.approx(8.0)
    assert retry_delay(1, 0.0) == pytest.approx(0.375)
    assert retry_delay(1, 0.999) == pytest.approx(0.625, abs=1e-3)


def test_keys_of_power_control() -> None:
    keys = Keys("/os")
    assert keys.parse(keys.bmc("dc1", "SN1")) is not None
    assert keys.parse(keys.bmc("dc1", "SN1")).kind == "bmc"  # type: ignore[union-attr]
    parsed = keys.parse(keys.power_request("dc1", "SN1", "20261203T000000.000000Z-0a0b0c0d"))
    assert parsed is not None and (parsed.kind, parsed.idc) == ("power", "dc1")
    assert parsed.name == "SN1/20261203T000000.000000Z-0a0b0c0d"
    # the password lives beside the prefix: no range or watch of /os/ sees it
    secret = keys.bmc_secret("dc1", "SN1")
    assert secret == "/os-secrets/bmc/dc1/SN1" and not secret.startswith(keys.root())
    assert keys.parse(secret) is None
