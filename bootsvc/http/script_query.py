"""What a machine says about itself when it asks for its boot script:
``/boot/<mac>.ipxe?uuid=&serial=&arch=&platform=&bootmac=`` (iPXE), or its
GRUB config: ``/grub/<mac>.cfg`` (the MAC only: GRUB 2.06 cannot
URI-encode a value).

Pure.  Only the MAC of the path is required (a bad one is refused); every
query value is clamped or dropped, never refused: an iPXE build that sends
a variable we do not understand still boots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bootsvc.http.common import HttpError, sanitize_label
from lpmos.models import ValidationError, normalize_mac, validate_uuid


class BadScriptPath(HttpError):
    """A per-machine script path that names no MAC; ``reason`` is the
    refusal counted in ``http_requests_refused_total``."""

    def __init__(self, status: int, error: str, detail: str, reason: str) -> None:
        super().__init__(status, error, detail)
        self.reason = reason


@dataclass(frozen=True)
class ScriptQuery:
    """A boot script request: ``mac`` normalized; the rest ``""`` when absent or unusable."""

    mac: str
    uuid: str = ""
    serial: str = ""
    arch: str = ""
    platform: str = ""
    bootmac: str = ""


def _or_empty(parse: Callable[[str], str], value: str) -> str:
    try:
        return parse(value)
    except ValidationError:
        return ""


def parse_script_query(name: str, args: Mapping[str, str], *,
                       suffix: str = ".ipxe") -> ScriptQuery:
    """``name`` is the path after ``/boot/`` (``<mac>.ipxe``) or ``/grub/``
    (``<mac>.cfg``, ``suffix=".cfg"``), ``args`` the query."""
    if not name.endswith(suffix) or "/" in name:
        where = "/grub/<mac>.cfg" if suffix == ".cfg" else "/boot/<mac>.ipxe"
        raise BadScriptPath(404, "not_found", f"per-machine configs are {where}",
                            "bad_boot_path")
    try:
        mac = normalize_mac(name[: -len(suffix)])
    except ValidationError as exc:
        raise BadScriptPath(400, "bad_mac", str(exc), "bad_mac") from None
    uuid = args.get("uuid")
    bootmac = args.get("bootmac")
    return ScriptQuery(
        mac=mac,
        uuid=_or_empty(validate_uuid, uuid[:64]) if uuid else "",
        serial=(args.get("serial") or "")[:64],
        arch=sanitize_label(args.get("arch")),
        platform=sanitize_label(args.get("platform")),
        bootmac=_or_empty(normalize_mac, bootmac[:32]) if bootmac else "",
    )
