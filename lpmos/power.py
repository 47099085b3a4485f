"""Power control, the shared model (issue #21): BMC records, power requests
and the pure decisions about them.

Three keys per machine (:class:`lpmos.store.keys.Keys`):

* ``bmc(idc, sn)`` — :class:`BmcRecord`: driver (``redfish`` or ``ipmi``),
  address, port, user and options.  Never the password.
* ``bmc_secret(idc, sn)`` — :class:`BmcSecret`: the password, outside the
  prefix.  The control plane writes it and never reads it back; the regional
  node reads it by key when it acts (it is in no watch cache).
* ``power_request(idc, sn, id)`` — :class:`PowerRequest`: written
  ``queued`` by the control plane, claimed by CAS (``claimed``) by one
  regional node of the IDC, carried out there step by step, and finished
  ``done`` or ``failed`` with the reason and the power state read back.

A request is a list of steps (:data:`ACTION_STEPS`): ``cycle`` is one step,
an approval's ``provision`` is ``pxe-once`` then ``cycle``, so a single node
does both in order.  A step that is not idempotent (``reset``, ``cycle``) is
marked ``running`` in etcd before the BMC is told, so a node that dies
mid-step leaves evidence: whoever reclaims the request fails it rather than
power-cycling the machine a second time (RELIABILITY: a repeated request
never power-cycles a machine twice).

Everything here is pure (no store, no clock but the ``now`` passed in, no
BMC): the node's worker (:mod:`bootsvc.power.worker`) and the API
(:mod:`web.api_power`) call it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from lpmos.models import ValidationError
from lpmos.schedule import decide_start, window_opening

DRIVERS = ("redfish", "ipmi")
DEFAULT_PORTS = {"redfish": 443, "ipmi": 623}
#: what an operator may ask for, and the steps each one is
ACTION_STEPS: dict[str, tuple[str, ...]] = {
    "on": ("on",),
    "off": ("off",),
    "reset": ("reset",),
    "cycle": ("cycle",),
    "pxe-once": ("pxe-once",),
    "status": ("status",),
    # an approval: the next boot from the network, then a power cycle
    # (or power on, for a machine that is off)
    "provision": ("pxe-once", "cycle"),
}
API_ACTIONS = tuple(a for a in ACTION_STEPS if a != "provision")
#: steps that change the machine each time they run: never repeated by a
#: node that reclaims a request another node was carrying out
NOT_IDEMPOTENT = frozenset({"reset", "cycle"})

QUEUED, CLAIMED, DONE, FAILED = "queued", "claimed", "done", "failed"
FINAL = frozenset({DONE, FAILED})

#: seconds a node may hold a claim before another node of the IDC may take
#: the request over (the node is presumed dead); it renews nothing, so this
#: is longer than any request's deadline
CLAIM_TTL = 120.0
#: a request nobody claimed within this long is failed, never carried out
#: late: a power cycle queued an hour ago must not happen when a node comes back
QUEUE_TTL = 600.0
#: the time budget of one request on the node, retries included
DEFAULT_DEADLINE = 60.0
MAX_DEADLINE = 110.0          # below CLAIM_TTL: a live node's claim never expires

_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_SYSTEM_RE = re.compile(r"/redfish/v1/Systems/[A-Za-z0-9._~:@!$&'()*+,;=%-]{1,128}")
_ID_RE = re.compile(r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{8}")


def _printable(value: Any, name: str, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValidationError(name, "a string")
    if not value and not allow_empty:
        raise ValidationError(name, "is required")
    if len(value) > max_len:
        raise ValidationError(name, f"at most {max_len} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValidationError(name, "no control characters")
    return value


def validate_address(value: Any) -> str:
    """A BMC address: an IPv4/IPv6 literal or a DNS name (no scheme, no port)."""
    text = _printable(value, "address", 253)
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    if not _HOST_RE.fullmatch(text):
        raise ValidationError("address", f"{text!r} is not an IP address or a host name "
                                         "(give the port in 'port', not in the address)")
    return text.lower()


@dataclass
class BmcRecord:
    """``/os/{idc}/machines/{sn}/bmc``: how to reach a machine's BMC."""

    idc: str
    sn: str
    driver: str
    address: str
    user: str
    port: int = 0                  # 0: the driver's default (443 Redfish, 623 IPMI)
    #: Redfish: ``scheme`` (https/http), ``verify_tls`` (bool), ``system``
    #: (the ComputerSystem path when the BMC has several)
    options: dict[str, Any] = field(default_factory=dict)
    source: str = "operator"       # operator, or inventory (address pre-filled)
    updated_at: float = 0.0
    updated_by: str = ""
    has_password: bool = False
    schema: int = 1

    def validate(self) -> BmcRecord:
        if self.driver not in DRIVERS:
            raise ValidationError("driver", f"one of {', '.join(DRIVERS)}")
        self.address = validate_address(self.address)
        self.user = _printable(self.user, "user", 16 if self.driver == "ipmi" else 64)
        if isinstance(self.port, bool) or not isinstance(self.port, int) or \
                not 0 <= self.port <= 65535:
            raise ValidationError("port", "an integer 1-65535 (0 or absent: the default)")
        if not isinstance(self.options, dict):
            raise ValidationError("options", "a JSON object")
        allowed = {"scheme", "verify_tls", "system"} if self.driver == "redfish" else set()
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            raise ValidationError("options", f"unknown for {self.driver}: {', '.join(unknown)}"
                                  + (f" (allowed: {', '.join(sorted(allowed))})"
                                     if allowed else ""))
        scheme = self.options.get("scheme", "https")
        if scheme not in ("https", "http"):
            raise ValidationError("options.scheme", "https or http")
        if not isinstance(self.options.get("verify_tls", True), bool):
            raise ValidationError("options.verify_tls", "true or false")
        system = self.options.get("system")
        if system is not None and (not isinstance(system, str)
                                   or not _SYSTEM_RE.fullmatch(system)):
            raise ValidationError("options.system", "a path /redfish/v1/Systems/ID")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.driver]

    def endpoint(self) -> str:
        """Where the node connects: a URL (Redfish) or ``host:port`` (IPMI);
        for messages and the driver, never with credentials."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        if self.driver == "redfish":
            return f"{self.options.get('scheme', 'https')}://{host}:{self.effective_port}"
        return f"{host}:{self.effective_port}"

    def public(self) -> dict[str, Any]:
        """What the API shows (the record holds no secret; this is all of it)."""
        return {**asdict(self), "endpoint": self.endpoint()}

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BmcRecord:
        try:
            data = json.loads(raw)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            return cls(**known).validate()
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValidationError("bmc", f"malformed BMC record: {exc}") from None


@dataclass
class BmcSecret:
    """The BMC password (``keys.bmc_secret``).  Its ``repr`` hides the value,
    so a log line or a traceback that shows the object shows no password."""

    password: str
    updated_at: float = 0.0

    def __repr__(self) -> str:
        return "BmcSecret(password=<hidden>)"

    def to_json(self) -> bytes:
        return json.dumps({"password": self.password, "updated_at": self.updated_at}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BmcSecret:
        try:
            data = json.loads(raw)
            return cls(str(data["password"]), float(data.get("updated_at", 0.0)))
        except (ValueError, TypeError, KeyError):
            raise ValidationError("bmc_secret", "malformed BMC secret record") from None


def parse_bmc_put(body: Any, *, idc: str, sn: str, inventory_address: str | None,
                  existing: BmcRecord | None, by: str, now: float) -> tuple[BmcRecord, str | None]:
    """The record (and the new password, ``None``: keep the stored one) of a
    ``PUT .../bmc`` body ``{"driver", "address"?, "port"?, "user", "password"?,
    "options"?}``.  A field left out keeps its stored value; a first PUT
    without ``address`` takes the inventory's BMC address, and must give a
    ``password``."""
    if not isinstance(body, dict):
        raise ValidationError("bmc", "a JSON object")
    unknown = sorted(set(body) - {"driver", "address", "port", "user", "password", "options"})
    if unknown:
        raise ValidationError(unknown[0], "unknown field (driver, address, port, user, "
                                          "password, options)")
    source = "operator"
    address = body.get("address")
    if address in (None, "") and existing is not None:
        address, source = existing.address, existing.source
    elif address in (None, ""):
        if not inventory_address:
            raise ValidationError("address", "is required: the machine's inventory has no "
                                             "BMC address to pre-fill it from")
        address, source = inventory_address, "inventory"
    password = body.get("password")
    driver = body.get("driver", existing.driver if existing else None)
    if password is not None:
        limit = 20 if driver == "ipmi" else 128    # IPMI 2.0 keys are 20 bytes
        password = _printable(password, "password", limit)
    elif existing is None or not existing.has_password:
        raise ValidationError("password", "is required (the BMC has none stored yet)")
    record = BmcRecord(idc=idc, sn=sn, driver=driver if isinstance(driver, str) else "",
                       address=address, user=body.get("user", existing.user if existing else ""),
                       port=body["port"] if body.get("port") is not None
                       else (existing.port if existing else 0),
                       options=body["options"] if body.get("options") is not None
                       else (dict(existing.options) if existing else {}), source=source,
                       updated_at=now, updated_by=by, has_password=True)
    return record.validate(), password


# -- power requests ----------------------------------------------------------------


@dataclass
class Step:
    name: str
    state: str = "pending"         # pending, running, done, failed
    at: float = 0.0
    detail: str = ""


@dataclass
class PowerRequest:
    """``/os/{idc}/machines/{sn}/power/{id}`` (see the module docstring)."""

    id: str
    idc: str
    sn: str
    action: str
    steps: list[Step]
    state: str = QUEUED
    created_at: float = 0.0
    created_by: str = ""
    #: why it was asked for: the API call, or ``task.approve`` with the attempt
    reason: str = ""
    task_attempt: int = 0          # >0: queued by a task's approval of this attempt
    deadline: float = DEFAULT_DEADLINE
    node: str = ""
    claimed_at: float = 0.0
    claims: int = 0
    finished_at: float = 0.0
    power_state: str = ""          # read back at the end: on, off, unknown
    boot_override: str = ""        # read back when known (Redfish: Pxe/Hdd ...)
    error: str = ""
    error_kind: str = ""           # auth, unreachable, timeout, protocol, unsupported, ...
    tries: int = 0                 # BMC calls made, retries included
    #: the task's schedule (:mod:`lpmos.schedule`), copied by the approval
    #: that queued it: no node carries the request out before it may start
    not_before: float = 0.0
    window: str = ""
    schema: int = 1

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PowerRequest:
        try:
            data = json.loads(raw)
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            known["steps"] = [Step(**s) for s in known.get("steps", [])]
            req = cls(**known)
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValidationError("power", f"malformed power request: {exc}") from None
        if req.action not in ACTION_STEPS or not _ID_RE.fullmatch(req.id):
            raise ValidationError("power", f"malformed power request {req.id!r}")
        return req

    def describe(self) -> str:
        """One line for a log or a CLI."""
        steps = "+".join(s.name for s in self.steps)
        if self.state == DONE:
            return f"power {steps} done on node {self.node}: power {self.power_state or '?'}"
        if self.state == FAILED:
            return f"power {steps} failed" + (f" on node {self.node}" if self.node else "") \
                + f": {self.error}"
        if self.state == CLAIMED:
            return f"power {steps} being carried out by node {self.node}"
        return f"power {steps} queued"


def new_request_id(now: float) -> str:
    """Sortable by time: ``20261203T121005.123456Z-0a1b2c3d``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int((now % 1) * 1e6):06d}Z"
    return f"{stamp}-{secrets.token_hex(4)}"


def valid_request_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def new_request(idc: str, sn: str, action: str, *, by: str, now: float, reason: str = "",
                task_attempt: int = 0, deadline: float = DEFAULT_DEADLINE,
                not_before: float = 0.0, window: str = "") -> PowerRequest:
    if action not in ACTION_STEPS:
        raise ValidationError("action", f"one of {', '.join(API_ACTIONS)}")
    if isinstance(deadline, bool) or not isinstance(deadline, int | float) or \
            not 5 <= deadline <= MAX_DEADLINE:
        raise ValidationError("deadline", f"seconds, 5 to {MAX_DEADLINE:g}")
    return PowerRequest(id=new_request_id(now), idc=idc, sn=sn, action=action,
                        steps=[Step(s) for s in ACTION_STEPS[action]], created_at=now,
                        created_by=by, reason=reason, task_attempt=task_attempt,
                        deadline=float(deadline), not_before=not_before, window=window)


# -- the decisions a node makes ------------------------------------------------------


@dataclass(frozen=True)
class ClaimDecision:
    """``what``: ``claim`` (take it and carry it out), ``fail`` (finish it
    failed with ``reason`` and do nothing to the machine), ``wait`` (another
    node holds a live claim; look again at ``retry_at``), ``none`` (final)."""

    what: str
    reason: str = ""
    retry_at: float = 0.0


def _overdue(req: PowerRequest, now: float, queue_ttl: float) -> float:
    """Seconds ``req`` has been due past ``queue_ttl`` (``<= 0``: not
    late).  Due since the later of its creation and ``not_before``; inside
    a window, since the later of those and the window's opening, and never
    late before the window closes: the operator allowed all of it."""
    due = max(req.created_at, req.not_before)
    if req.window:
        opened, closes = window_opening(req.window, now)
        due = max(due, opened)
        queue_ttl = max(queue_ttl, closes - due)
    return now - due - queue_ttl


def decide_claim(req: PowerRequest, now: float, *, claim_ttl: float = CLAIM_TTL,
                 queue_ttl: float = QUEUE_TTL) -> ClaimDecision:
    """What a node of the IDC does with ``req`` as read (pure).

    A request with a schedule (``not_before``, ``window``) waits until
    :func:`lpmos.schedule.decide_start` lets it start (``wait`` with the
    reason and ``retry_at`` the start), and is late (:func:`_overdue`)
    only once it has been due past ``queue_ttl``: a node that comes back
    late in the window still acts, one that comes back after the window
    closed waits for the next opening."""
    if req.final:
        return ClaimDecision("none")
    if req.state == QUEUED:
        start = decide_start(req.not_before, req.window, now)
        if not start.start:
            return ClaimDecision("wait", start.reason, retry_at=start.at)
        late = _overdue(req, now, queue_ttl)
        if late > 0:
            return ClaimDecision("fail", f"no regional node of IDC {req.idc} took it within "
                                         f"{queue_ttl:g} s (due {late + queue_ttl:.0f} s "
                                         "ago); not carried out late")
        return ClaimDecision("claim")
    # claimed: by a live node until the claim expires
    expires = req.claimed_at + claim_ttl
    if now < expires:
        return ClaimDecision("wait", retry_at=expires)
    running = [s.name for s in req.steps if s.state == "running"]
    if any(name in NOT_IDEMPOTENT for name in running):
        return ClaimDecision("fail", f"node {req.node} stopped while carrying out "
                                     f"{'+'.join(running)}; not repeated, since the machine "
                                     "may already have been power-cycled: check it and ask "
                                     "again")
    start = decide_start(req.not_before, req.window, now)
    if not start.start or _overdue(req, now, queue_ttl) > 0:
        return ClaimDecision("fail", f"node {req.node} stopped while carrying it out, and it "
                                     f"is past its time (due more than {queue_ttl:g} s ago"
                                     f"{', or its window closed' if req.window else ''}); not "
                                     "carried out late")
    return ClaimDecision("claim")


#: seconds after a BMC accepted a power cycle during which an agent still
#: running may be cut off by it: a BMC reports "done" (and often "on") before
#: the machine has reset
CYCLE_SETTLE = 30.0


def coming_cycle(requests: Iterable[PowerRequest], attempt: int, now: float, *,
                 queue_ttl: float = QUEUE_TTL) -> PowerRequest | None:
    """The request queued for a task's ``attempt`` (an approval's or a
    release's) that is yet to power-cycle the machine, or ``None``.

    An agent already running on the machine must not start that attempt's
    install or wipe while one is coming: the cycle would cut it off
    moments later (the approval queues it in the same transaction as the
    move the agent sees).  The machine's next boot, from the network,
    carries the attempt out instead.  A cycle the BMC accepted less than
    :data:`CYCLE_SETTLE` seconds ago is still coming.  A request past its
    time (:func:`decide_claim` says ``fail``), or whose cycle failed or was
    done before that, is not coming.  Pure."""
    for req in requests:
        if req.task_attempt != attempt:
            continue
        cycles = [s for s in req.steps if s.name == "cycle"]
        if any(s.state == "done" and now - s.at < CYCLE_SETTLE for s in cycles):
            return req          # the BMC took it; the machine may not have reset yet
        if req.final or not any(s.state in ("pending", "running") for s in cycles):
            continue
        if decide_claim(req, now, queue_ttl=queue_ttl).what != "fail":
            return req
    return None


def claim(req: PowerRequest, node: str, now: float) -> None:
    """``req`` claimed by ``node`` (the caller writes it by CAS on the
    revision it read: of two nodes, one wins)."""
    req.state = CLAIMED
    req.node = node
    req.claimed_at = now
    req.claims += 1
    for step in req.steps:
        if step.state == "running":      # an idempotent step a dead node began
            step.state = "pending"


def next_step(req: PowerRequest) -> Step | None:
    return next((s for s in req.steps if s.state in ("pending", "running")), None)


def finish(req: PowerRequest, now: float, *, error: str = "", error_kind: str = "") -> None:
    """Finish ``req``: done, or failed with the reason (steps not reached
    stay ``pending``; a running one is marked failed)."""
    req.finished_at = now
    if error:
        req.state = FAILED
        req.error = error[:500]
        req.error_kind = error_kind
        for step in req.steps:
            if step.state == "running":
                step.state = "failed"
                step.detail = error[:200]
    else:
        req.state = DONE


def retry_delay(attempt: int, rand: float, *, first: float = 0.5, cap: float = 8.0,
                jitter: float = 0.25) -> float:
    """Seconds before try ``attempt + 1`` (``attempt`` counts from 1):
    ``first`` doubling up to ``cap``, with +-``jitter`` spread by ``rand``
    (the caller's random number in [0, 1)).  The caller never sleeps past its
    deadline.  Pure."""
    base = min(cap, first * 2 ** max(0, attempt - 1))
    return float(base * (1 - jitter + 2 * jitter * rand))
