"""What an operator gives an install, checked; the operator's cloud-config
merged with ours; cloud-init's own schema check; secrets redacted.

The inputs live in a task's ``params`` (and a task template's):

| key             | what                                                         |
| --------------- | ------------------------------------------------------------ |
| ``hostname``    | an RFC 1123 label or FQDN (:func:`lpmos.models.validate_hostname`) |
| ``ssh_keys``    | authorized keys, a list of public key lines                  |
| ``password_hash`` | a crypt hash for the image's default user (a secret)      |
| ``cloud_config``| the operator's ``#cloud-config`` YAML text, merged with ours |
| ``network``     | the installed system's network (:mod:`lpmos.netconfig`)      |

Pure apart from :func:`check_cloud_config`, which runs Debian's
``cloud-init schema -c FILE`` (bounded by a timeout) on a rendered document.

The merge (:func:`merge_cloud_config`) is the one rule for our keys against
the operator's: our entries are *appended* to the list modules that carry
the LPMOS report hook (``write_files``, ``runcmd``), ``reporting`` gains our
``lpmos`` endpoint beside the operator's, and every other key of ours
(``hostname``, ``fqdn``, ``ssh_authorized_keys``, ``user`` ...) is used only
where the operator did not set it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

import yaml

from lpmos.models import (
    ValidationError,
    validate_hostname,
    validate_password_hash,
    validate_ssh_keys,
)
from lpmos.netconfig import parse_network

HEADER = "#cloud-config"
CLOUD_CONFIG_MAX = 16 * 1024       # bytes of the operator's cloud-config text
SCHEMA_TIMEOUT = 20.0              # seconds for one `cloud-init schema` run
SCHEMA_MESSAGE_CHARS = 1000        # characters of cloud-init's error kept
#: our keys whose values are lists the operator's entries come first in
APPEND_KEYS = frozenset({"write_files", "runcmd"})
#: our keys whose values are maps merged with the operator's (ours win per entry)
MERGE_KEYS = frozenset({"reporting"})
#: keys whose values are secrets wherever they appear in a cloud-config
SECRET_KEYS = frozenset({"passwd", "hashed_passwd", "password", "plain_text_passwd"})
SET = "<set>"
REDACTED = "<redacted>"
INSTALL_KEYS = ("hostname", "ssh_keys", "password_hash", "username", "cloud_config", "network")
#: the default user of each OS family's stock cloud images (cloud.cfg's
#: ``system_info.default_user.name``); ``params.username`` overrides it
DEFAULT_USERS = {"debian": "debian", "ubuntu": "ubuntu", "rhel": "cloud-user",
                 "rocky": "rocky", "alma": "almalinux", "fedora": "fedora"}
FALLBACK_USER = "debian"
_USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class CloudConfigRejected(ValidationError):
    """cloud-init's schema check refused a document; ``str()`` quotes it."""

    def __init__(self, message: str) -> None:
        super().__init__("params.cloud_config", message)


class SchemaCheckUnavailable(RuntimeError):
    """The ``cloud-init`` command is missing or did not answer in time."""

    status_code = 503


# --- the operator's cloud-config ---------------------------------------------------------


def parse_cloud_config(text: Any, field_name: str = "params.cloud_config") -> dict[str, Any]:
    """The operator's cloud-config text as a mapping.  It must start with
    ``#cloud-config`` (cloud-init ignores user-data that does not), be at
    most :data:`CLOUD_CONFIG_MAX` bytes and hold a YAML mapping."""
    if not isinstance(text, str):
        raise ValidationError(field_name, "a string: YAML starting with '#cloud-config'")
    if len(text.encode()) > CLOUD_CONFIG_MAX:
        raise ValidationError(field_name, f"at most {CLOUD_CONFIG_MAX} bytes")
    if text.split("\n", 1)[0].rstrip() != HEADER:
        raise ValidationError(field_name, "the first line must be '#cloud-config' "
                              "(a shell script or MIME multipart is not accepted)")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValidationError(field_name, f"not valid YAML{where}: {problem}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(isinstance(k, str) for k in doc):
        raise ValidationError(field_name, "a YAML mapping of cloud-config keys")
    return doc


def merge_cloud_config(ours: Mapping[str, Any], operator: Mapping[str, Any]) -> dict[str, Any]:
    """One cloud-config from ours and the operator's (pure; neither input is
    changed).  The operator's keys come first, in their order."""
    merged: dict[str, Any] = dict(operator)
    for key, value in ours.items():
        if key not in operator:
            merged[key] = value
        elif key in APPEND_KEYS:
            theirs = operator[key]
            if theirs is None:
                theirs = []
            if not isinstance(theirs, list):
                raise ValidationError(f"params.cloud_config.{key}",
                                      "a list (LPMOS appends its own entries to it)")
            merged[key] = [*theirs, *value]
        elif key in MERGE_KEYS:
            theirs = operator[key] or {}
            if not isinstance(theirs, dict):
                raise ValidationError(f"params.cloud_config.{key}", "a mapping")
            merged[key] = {**theirs, **value}
    return merged


def render_cloud_config(doc: Mapping[str, Any]) -> str:
    """A cloud-config document as user-data text (header, then YAML)."""
    return HEADER + "\n" + yaml.safe_dump(dict(doc), default_flow_style=False,
                                          sort_keys=False, width=1000)


# --- the install inputs --------------------------------------------------------------------


def validate_username(value: Any, field_name: str = "params.username") -> str:
    """A login name: 1-32 of a-z, 0-9, '_' and '-', starting with a letter or '_'."""
    if not isinstance(value, str) or not _USERNAME_RE.fullmatch(value) or value == "root":
        raise ValidationError(field_name, "a user name: 1-32 of a-z, 0-9, '_' and '-', "
                              "starting with a letter or '_' (not root)")
    return value


def default_user(params: Mapping[str, Any], os_family: str) -> str:
    """The image's default user, whom the task's keys and password hash are
    for: ``params.username`` when valid, else the OS family's stock name.
    cloud-init's schema wants a ``name`` in ``user`` (the runtime would
    take the distro's), so the seed names it."""
    wanted = params.get("username")
    if isinstance(wanted, str) and _USERNAME_RE.fullmatch(wanted) and wanted != "root":
        return wanted
    return DEFAULT_USERS.get(os_family, FALLBACK_USER)


def parse_install_params(params: Mapping[str, Any], *, mac: str | None,
                         known_macs: frozenset[str] | None = None) -> dict[str, Any]:
    """``params`` with the install inputs checked and normalised (hostname in
    lowercase, ``ssh_keys`` a list of key lines); other keys pass as they are.
    ``mac``: the task's boot MAC (``None`` for a task template).
    ValidationError names the first bad input."""
    out = dict(params)
    if out.get("hostname") not in (None, ""):
        out["hostname"] = validate_hostname(out["hostname"], "params.hostname")
    if out.get("ssh_keys") not in (None, "", []):
        out["ssh_keys"] = validate_ssh_keys(out["ssh_keys"], "params.ssh_keys")
    if out.get("password_hash") not in (None, ""):
        validate_password_hash(out["password_hash"], "params.password_hash")
    if out.get("username") not in (None, ""):
        validate_username(out["username"])
    if out.get("cloud_config") not in (None, ""):
        parse_cloud_config(out["cloud_config"])
    if out.get("network") is not None:
        parse_network(out["network"], boot_mac=mac, known_macs=known_macs)
    return out


# --- cloud-init's schema check ---------------------------------------------------------


def schema_message(output: str) -> str:
    """cloud-init's reason from ``cloud-init schema`` output: the "Cloud
    config schema errors: ..." line (or the last non-empty line), bounded."""
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    picked = [x for x in lines if x.startswith(("Cloud config schema errors",
                                                "Error: Cloud config schema errors"))]
    if not picked:
        picked = [x for x in lines if x not in ("Error:", "Cloud config schema deprecations:")]
    text = " ".join(picked[-1:]) or "cloud-init schema rejected the document"
    return text[:SCHEMA_MESSAGE_CHARS]


def check_cloud_config(text: str, *, command: str = "cloud-init",
                       timeout: float = SCHEMA_TIMEOUT) -> None:
    """Run ``cloud-init schema -c FILE`` on ``text`` (a whole user-data
    document).  Returns when cloud-init calls it valid; raises
    :class:`CloudConfigRejected` quoting cloud-init's error, or
    :class:`SchemaCheckUnavailable` when the command is missing or hangs."""
    exe = shutil.which(command)
    if exe is None:
        raise SchemaCheckUnavailable(
            f"'{command}' is not installed, so a cloud-config cannot be checked: "
            "install Debian's cloud-init package for schema validation")
    fd, path = tempfile.mkstemp(prefix="lpmos-cloud-config-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            done = subprocess.run([exe, "schema", "-c", path], capture_output=True, text=True,
                                  timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise SchemaCheckUnavailable(f"'cloud-init schema' did not answer within "
                                         f"{timeout:.0f} s") from None
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise CloudConfigRejected(schema_message(done.stderr + "\n" + done.stdout)
                                  .replace(path, "cloud_config"))


# --- secrets ---------------------------------------------------------------------------


def _redact(value: Any, parent: str = "") -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if str(k) in SECRET_KEYS or (parent == "chpasswd" and k == "list")
                else _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, parent) for v in value]
    return value


def redact_cloud_config(text: Any) -> Any:
    """The operator's cloud-config with every password-like value replaced
    (``passwd``, ``hashed_passwd``, ``password``, ``plain_text_passwd``,
    ``chpasswd.list``), re-dumped; text that does not parse is withheld."""
    if not isinstance(text, str) or not text:
        return text
    try:
        doc = parse_cloud_config(text)
    except ValidationError:
        return REDACTED + " (not a valid cloud-config)"
    clean = _redact(doc)
    if clean == doc:
        return text
    return render_cloud_config(clean)


def redact_params(params: Any) -> Any:
    """Task or template ``params`` as the API may return them: a set
    ``password_hash`` becomes ``"<set>"``, the cloud-config's secrets
    ``"<redacted>"``.  The stored task keeps the real values."""
    if not isinstance(params, dict):
        return params
    out = dict(params)
    if out.get("password_hash"):
        out["password_hash"] = SET
    if "cloud_config" in out:
        out["cloud_config"] = redact_cloud_config(out["cloud_config"])
    return out
