"""Typed records stored in etcd, with validation and a JSON round trip.

Records are plain dataclasses: ``to_dict()`` gives JSON-safe data,
``from_dict()`` validates and rebuilds.  Everything that came from a peer (an
operator's API call, a machine's agent) passes through the ``validate_*``
functions here, so a bad SN or MAC is refused with one clear message before
it reaches a key or a template.

This module is stdlib-only: the agent imports it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import time
import uuid as uuidlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lpmos.schedule import ScheduleError, parse_not_before, parse_window
from lpmos.states import TaskStatus
from lpmos.store.keys import RESERVED_IDC_NAMES

SCHEMA_VERSION = 1
LOG_LINES_KEPT = 200          # newest lines kept in the task document
HISTORY_KEPT = 50             # newest transitions kept in the task document
ATTEMPT_NODES_KEPT = 50       # newest attempts whose serving node the task remembers
MESSAGE_MAX = 1000            # characters of one log line / progress message
PARAMS_MAX_BYTES = 32 * 1024  # JSON size of a task's parameters (keys, cloud-config, network)
SSH_KEYS_MAX = 16             # authorized keys in params.ssh_keys
SSH_KEY_CHARS = 2048          # characters of one key line (an 8192-bit RSA key is ~1,400)


class ValidationError(ValueError):
    """A field has a value that is not allowed.  ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAC_HEX_RE = re.compile(r"[0-9a-f]{12}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def validate_name(value: Any, field_name: str = "idc") -> str:
    """IDC and node names: 1-32 of ``a-z 0-9 _ -``, starting alphanumeric."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationError(
            field_name, "1-32 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    if field_name == "idc" and value in RESERVED_IDC_NAMES:
        raise ValidationError(field_name, f"'{value}' is reserved")
    return value


def validate_sn(value: Any, field_name: str = "sn") -> str:
    """Serial numbers: 1-64 of ``A-Z a-z 0-9 . _ -``, starting alphanumeric."""
    if not isinstance(value, str) or not _SN_RE.fullmatch(value):
        raise ValidationError(
            field_name, "1-64 characters of A-Z, a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def normalize_mac(value: Any, field_name: str = "mac") -> str:
    """Any common MAC spelling → lowercase with colons (``00:1a:2b:3c:4d:5e``).

    Accepts colons, dashes, Cisco dots or bare hex; refuses anything else,
    including multicast addresses, which no NIC boots from.
    """
    if not isinstance(value, str):
        raise ValidationError(field_name, "a MAC address such as 00:1a:2b:3c:4d:5e")
    text = value.strip().lower()
    if re.fullmatch(r"([0-9a-f]{2}[:-]){5}[0-9a-f]{2}|([0-9a-f]{4}\.){2}[0-9a-f]{4}|[0-9a-f]{12}",
                    text) is None:
        raise ValidationError(field_name, "a MAC address such as 00:1a:2b:3c:4d:5e")
    hexdigits = re.sub(r"[^0-9a-f]", "", text)
    assert _MAC_HEX_RE.fullmatch(hexdigits)
    if int(hexdigits[:2], 16) & 1:
        raise ValidationError(field_name, "a unicast MAC address (this one is multicast)")
    return ":".join(hexdigits[i:i + 2] for i in range(0, 12, 2))


def validate_uuid(value: Any, field_name: str = "uuid") -> str:
    """A SMBIOS/PXE UUID, returned in canonical lowercase form."""
    try:
        return str(uuidlib.UUID(str(value)))
    except ValueError:
        raise ValidationError(field_name, "a UUID such as 4c4c4544-0042-...") from None


def validate_text(value: Any, field_name: str, max_len: int = 200, *,
                  single_line: bool = True, allow_empty: bool = True) -> str:
    """Free text from a user: bounded, and single-line text has no control characters."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationError(field_name, "a string")
    if len(value) > max_len:
        raise ValidationError(field_name, f"at most {max_len} characters")
    if single_line and _CONTROL_RE.search(value):
        raise ValidationError(field_name, "no newlines or control characters")
    if not allow_empty and not value.strip():
        raise ValidationError(field_name, "must not be empty")
    return value


_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def validate_hostname(value: Any, field_name: str = "hostname") -> str:
    """An RFC 1123 host name: one label (``web-01``) or an FQDN
    (``web-01.dc1.example.com``), at most 253 characters; returned in
    lowercase (host names are case-insensitive), without a trailing dot."""
    if not isinstance(value, str) or not value:
        raise ValidationError(field_name, "a host name such as web-01 or web-01.example.com")
    name = value.lower().removesuffix(".")
    if len(name) > 253:
        raise ValidationError(field_name, "at most 253 characters")
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise ValidationError(field_name, f"{value[:80]!r} is not an RFC 1123 host name: "
                                  "labels of 1-63 of a-z, 0-9 and '-', not starting or "
                                  "ending with '-', joined by '.'")
    return name


#: the OpenSSH public key types an authorized_keys line may name
SSH_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                 "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
                 "sk-ecdsa-sha2-nistp256@openssh.com")


def validate_ssh_key(value: Any, field_name: str = "ssh_keys") -> str:
    """One public key line, ``TYPE BASE64 [COMMENT]``: the type is one of
    :data:`SSH_KEY_TYPES`, the base64 decodes, and the blob inside names the
    same type (so a key pasted under the wrong type, or a truncated one, is
    refused here rather than ignored by sshd on the installed system).
    Options before the type (``from="..."``) are not accepted."""
    if not isinstance(value, str):
        raise ValidationError(field_name, "a public key line such as 'ssh-ed25519 AAAA... me@host'")
    line = value.strip()
    if len(line) > SSH_KEY_CHARS:
        raise ValidationError(field_name, f"a key line of at most {SSH_KEY_CHARS} characters")
    if _CONTROL_RE.search(line.replace("\t", " ")):
        raise ValidationError(field_name, "one key per line: no newlines or control characters")
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
        raise ValidationError(field_name, f"{line[:40]!r} does not start with a key type: "
                              + ", ".join(SSH_KEY_TYPES))
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(field_name, f"the {parts[0]} key's base64 does not decode") from None
    try:
        (length,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + length].decode("ascii")
    except (struct.error, UnicodeDecodeError):
        inner = ""
    if inner != parts[0] or len(blob) < 4 + length + 4:
        raise ValidationError(field_name, f"the base64 is not a {parts[0]} public key "
                              "(truncated, or pasted under the wrong type)")
    return " ".join(parts)


def validate_ssh_keys(value: Any, field_name: str = "ssh_keys") -> list[str]:
    """A list of key lines (a string: one key per line), each checked, in
    order, duplicates dropped; at most :data:`SSH_KEYS_MAX`."""
    if isinstance(value, str):
        value = [x for x in value.splitlines() if x.strip()]
    if not isinstance(value, list):
        raise ValidationError(field_name, "a list of public key lines")
    if len(value) > SSH_KEYS_MAX:
        raise ValidationError(field_name, f"at most {SSH_KEYS_MAX} keys")
    keys: list[str] = []
    for i, item in enumerate(value):
        key = validate_ssh_key(item, f"{field_name}[{i}]")
        if key not in keys:
            keys.append(key)
    return keys


_CRYPT_RE = re.compile(
    r"\$(6|5)\$(rounds=[0-9]{4,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{43,86}"
    r"|\$y\$[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{1,64}\$[./A-Za-z0-9]{43}"
    r"|\$2[aby]\$[0-9]{2}\$[./A-Za-z0-9]{53}")


def validate_password_hash(value: Any, field_name: str = "password_hash") -> str:
    """A crypt(3) hash: SHA-512 ``$6$``, SHA-256 ``$5$``, yescrypt ``$y$`` or
    bcrypt ``$2b$``.  A plain password is refused: make a hash with
    ``openssl passwd -6`` or ``mkpasswd -m sha-512``."""
    if not isinstance(value, str) or not _CRYPT_RE.fullmatch(value):
        raise ValidationError(field_name, "a crypt hash ($6$..., $5$..., $y$... or $2b$...), "
                              "not a password: make one with 'openssl passwd -6' or "
                              "'mkpasswd -m sha-512'")
    return value


def clean_message(value: Any, max_len: int = MESSAGE_MAX) -> str:
    """A log line or progress message from a machine: never refused, made inert.

    Control characters other than tab become spaces; the text is cut to
    ``max_len``.  Machines report what they like; we store it as data.
    """
    text = str(value) if value is not None else ""
    text = re.sub(r"[\x00-\x08\x0a-\x1f\x7f]", " ", text)
    return text[:max_len]


def now() -> float:
    """Server wall time in seconds; never taken from an agent."""
    return time.time()


def _pick(cls: type[Any], data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class Transition:
    """One state change, as kept in a task's bounded history."""

    from_status: str
    to_status: str
    at: float
    by: str = ""
    reason: str = ""


@dataclass
class Progress:
    """The latest progress of a task, as shown by a progress bar."""

    percent: float = 0.0
    step: str = ""
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0     # bytes per second, as reported
    updated_at: float = 0.0


@dataclass
class Task:
    """An install task: ``/os/{idc}/machines/{sn}/task``.

    The whole document changes only by compare-and-swap on its etcd
    ``mod_revision`` (see :mod:`lpmos.tasks`).  ``event_seq`` keeps, per event
    source, the highest sequence number applied: an event at or below it is a
    duplicate and changes nothing (RELIABILITY L2).
    """

    idc: str
    sn: str
    mac: str
    os_type: str
    os_version: str = ""
    image: str = ""
    status: str = TaskStatus.PENDING.value
    params: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    created_by: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    approved_by: str = ""
    approved_at: float = 0.0
    claimed_by: str = ""           # regional node that served the install
    started_at: float = 0.0        # approved → booting
    finished_at: float = 0.0       # reached succeeded / failed
    reason: str = ""               # why it failed / was cancelled / rejected
    attempt: int = 0               # incremented by each approval
    #: the regional node that served each attempt (str(attempt) → node name,
    #: the newest ATTEMPT_NODES_KEPT): that node keeps the attempt's full log
    attempt_nodes: dict[str, str] = field(default_factory=dict)
    progress: Progress = field(default_factory=Progress)
    logs: list[str] = field(default_factory=list)
    history: list[Transition] = field(default_factory=list)
    event_seq: dict[str, int] = field(default_factory=dict)
    template: str = ""
    #: the schedule (:mod:`lpmos.schedule`): epoch seconds before which the
    #: task does not start (0: none), and a daily UTC window ``HH:MM-HH:MM``
    not_before: float = 0.0
    window: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def state(self) -> TaskStatus:
        return TaskStatus(self.status)

    def validate(self) -> Task:
        validate_name(self.idc, "idc")
        validate_sn(self.sn, "sn")
        self.mac = normalize_mac(self.mac)
        validate_text(self.os_type, "os_type", 64, allow_empty=False)
        validate_text(self.os_version, "os_version", 32)
        validate_text(self.image, "image", 64)
        validate_text(self.notes, "notes", 1000, single_line=False)
        validate_text(self.template, "template", 64)
        try:
            self.not_before = parse_not_before(self.not_before)
            self.window = parse_window(self.window)
        except ScheduleError as exc:
            raise ValidationError(exc.field, exc.message) from None
        if not isinstance(self.params, dict):
            raise ValidationError("params", "a JSON object")
        if len(json.dumps(self.params)) > PARAMS_MAX_BYTES:
            raise ValidationError("params", f"at most {PARAMS_MAX_BYTES} bytes of JSON")
        try:
            TaskStatus(self.status)
        except ValueError:
            raise ValidationError("status", "one of " + ", ".join(s.value for s in TaskStatus)) \
                from None
        return self

    def add_log(self, line: str) -> None:
        self.logs.append(clean_message(line))
        del self.logs[:-LOG_LINES_KEPT]

    def add_transition(self, t: Transition) -> None:
        self.history.append(t)
        del self.history[:-HISTORY_KEPT]

    def served_by(self, node: str) -> None:
        """Record that regional node ``node`` serves the current attempt
        (its install claim): the attempt's full log lives there."""
        self.claimed_by = node
        self.attempt_nodes[str(self.attempt)] = node
        for old in sorted(self.attempt_nodes, key=int)[:-ATTEMPT_NODES_KEPT]:
            del self.attempt_nodes[old]

    def node_of_attempt(self, attempt: int) -> str:
        """The node that served ``attempt`` (``""``: none known).  Tasks
        claimed before ``attempt_nodes`` existed name only the current
        attempt's node, in ``claimed_by``."""
        node = self.attempt_nodes.get(str(attempt), "")
        if not node and attempt == self.attempt:
            node = self.claimed_by
        return node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        if not isinstance(data, dict):
            raise ValidationError("task", "a JSON object")
        values = _pick(cls, data)
        for required in ("idc", "sn", "mac", "os_type"):
            if required not in values:
                raise ValidationError(required, "is required")
        progress = values.pop("progress", None) or {}
        history = values.pop("history", None) or []
        task = cls(**values)
        task.progress = Progress(**_pick(Progress, progress)) if isinstance(progress, dict) \
            else Progress()
        task.history = [Transition(**_pick(Transition, h)) for h in history if isinstance(h, dict)]
        task.logs = [str(x) for x in task.logs] if isinstance(task.logs, list) else []
        task.event_seq = {str(k): int(v) for k, v in task.event_seq.items()} \
            if isinstance(task.event_seq, dict) else {}
        nodes = task.attempt_nodes if isinstance(task.attempt_nodes, dict) else {}
        task.attempt_nodes = {str(k): v for k, v in nodes.items()
                              if str(k).isdigit() and isinstance(v, str)}
        return task.validate()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Task:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("task", "not valid JSON") from None
        return cls.from_dict(data)


@dataclass
class Server:
    """A discovered machine: ``/os/{idc}/servers/{sn}``.

    ``conflict`` is set when the same MAC was seen with another machine
    identity (a cloned VM): no install is served to a flagged machine.
    """

    idc: str
    sn: str
    macs: list[str] = field(default_factory=list)
    uuid: str = ""
    arch: str = ""
    inventory: dict[str, Any] = field(default_factory=dict)
    first_seen: float = 0.0
    last_seen: float = 0.0
    state: str = "discovered"
    conflict: str = ""
    boot_mac: str = ""
    ip: str = ""
    schema: int = SCHEMA_VERSION

    def validate(self) -> Server:
        validate_name(self.idc, "idc")
        validate_sn(self.sn, "sn")
        self.macs = [normalize_mac(m, "macs") for m in self.macs]
        if self.boot_mac:
            self.boot_mac = normalize_mac(self.boot_mac, "boot_mac")
        if self.uuid:
            self.uuid = validate_uuid(self.uuid)
        if not isinstance(self.inventory, dict):
            raise ValidationError("inventory", "a JSON object")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Server:
        if not isinstance(data, dict):
            raise ValidationError("server", "a JSON object")
        values = _pick(cls, data)
        for required in ("idc", "sn"):
            if required not in values:
                raise ValidationError(required, "is required")
        return cls(**values).validate()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Server:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValidationError("server", "not valid JSON") from None
        return cls.from_dict(data)


EVENT_KINDS = ("progress", "log", "state")


@dataclass
class ProgressEvent:
    """One event from an agent or installer hook about a task.

    ``source`` names the sender (``agent``, ``installer``, ``firstboot`` ...)
    and ``seq`` is its strictly increasing sequence number; together they are
    the event id used for deduplication.  ``at`` is the sender's clock and is
    informational only: ordering is by ``seq`` and etcd revision.
    """

    source: str
    seq: int
    kind: str = "progress"
    step: str = ""
    percent: float | None = None
    message: str = ""
    status: str = ""          # for kind == "state": installing / succeeded / failed
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    at: float = 0.0

    @property
    def event_id(self) -> str:
        return f"{self.source}:{self.seq}"

    def log_line(self) -> str:
        """The line this event adds to its task's log (``""``: none), as the
        task document and the node's full install log both write it."""
        if not self.message:
            return ""
        return f"[{self.source}] {self.step + ': ' if self.step else ''}{self.message}"

    def validate(self) -> ProgressEvent:
        if not isinstance(self.source, str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}",
                                                                self.source):
            raise ValidationError("source", "1-32 characters of a-z, 0-9, '_' and '-'")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not \
                0 <= self.seq < 2**53:
            raise ValidationError("seq", "a non-negative integer")
        if self.kind not in EVENT_KINDS:
            raise ValidationError("kind", "one of " + ", ".join(EVENT_KINDS))
        if self.percent is not None:
            if isinstance(self.percent, bool) or not isinstance(self.percent, int | float) \
                    or not 0 <= self.percent <= 100:
                raise ValidationError("percent", "a number from 0 to 100")
            self.percent = float(self.percent)
        if self.kind == "state" and self.status not in ("installing", "succeeded", "failed",
                                                        "released"):
            raise ValidationError("status", "one of installing, succeeded, failed, released")
        for name in ("bytes_done", "bytes_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValidationError(name, "a non-negative integer")
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float) or self.rate < 0:
            raise ValidationError("rate", "a non-negative number")
        if isinstance(self.at, bool) or not isinstance(self.at, int | float):
            raise ValidationError("at", "a number")
        self.step = clean_message(self.step, 64)
        self.message = clean_message(self.message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ProgressEvent:
        if not isinstance(data, dict):
            raise ValidationError("event", "a JSON object")
        for required in ("source", "seq"):
            if required not in data:
                raise ValidationError(required, "is required")
        try:
            event = cls(**_pick(cls, data))
        except TypeError as exc:
            raise ValidationError("event", str(exc)) from None
        return event.validate()
