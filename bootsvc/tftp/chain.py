"""The constant configs a regional node serves its boot loaders: the iPXE
script ``boot.ipxe`` and GRUB's ``grub/grub.cfg``.

Both are constant per node (no machine is known at TFTP time: TFTP carries
no MAC) and only hand the machine over to boot HTTP, where the per-machine
script or config is decided; if HTTP cannot be reached they retry after a
pause rather than dropping the machine to a prompt.

GRUB is the signed network image of Debian 12 (``grubnetx64.efi.signed``,
GRUB 2.06), which shim loads on Secure Boot machines.  Its built-in prefix is
``/grub`` on the server it was loaded from (TFTP, or HTTP for HTTP boot), so
it reads ``grub/grub.cfg`` there.  Its HTTP client knows no port other than
80 (``(http,host:port)`` arrived in GRUB 2.12), hence
:func:`grub_http_device` refuses a node URL on another port.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

#: the name the chain script is served under
BOOT_SCRIPT = "boot.ipxe"
#: the name GRUB's network image reads its config under (its prefix is /grub)
GRUB_CONFIG = "grub/grub.cfg"
#: boot files that start GRUB (through shim): a node that offers one serves
#: GRUB's configs and needs its boot HTTP on port 80
GRUB_LOADERS = frozenset({"shimx64.efi", "grubx64.efi"})

#: boot loader files and the timeline stage their transfer is recorded as
#: (any other file: ``tftp``), so a machine stuck at a loader shows where
LOADER_STAGES = {
    "shimx64.efi": "loader shim",
    "grubx64.efi": "loader grub",
    "mmx64.efi": "loader mok manager",
    GRUB_CONFIG: "grub.cfg",
    "ipxe.efi": "loader ipxe",
    "snponly.efi": "loader ipxe",
    "undionly.kpxe": "loader ipxe",
    "undionly.kkpxe": "loader ipxe",
    "ipxe.pxe": "loader ipxe",
}


def transfer_stage(file: str) -> str:
    """The timeline stage of a file sent to a machine (TFTP or HTTP)."""
    return LOADER_STAGES.get(file, "tftp")


_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


class GrubUrlError(ValueError):
    """A URL GRUB 2.06 cannot fetch (not plain http on port 80)."""


def grub_http_device(url: str) -> str:
    """``(http,HOST)`` for an ``http://HOST[:80]/...`` URL, the device GRUB
    names it by; :class:`GrubUrlError` for any other scheme or port, or a
    host that is no plain name or IPv4 address."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or port not in (None, 80):
        raise GrubUrlError(f"{url} is not one Debian 12's signed GRUB (2.06) can fetch: "
                           "it speaks only http:// on port 80")
    host = parts.hostname or ""
    if not _HOST_RE.fullmatch(host):
        raise GrubUrlError(f"{url} names no host GRUB can reach: a host name or IPv4 "
                           "address is needed")
    return f"(http,{host})"


def render_chain_script(advertise_url: str) -> bytes:
    """The constant iPXE script served as ``boot.ipxe`` over TFTP: it chains
    to the node's HTTP ``/boot.ipxe`` and retries with a pause if that fails."""
    url = f"{advertise_url.rstrip('/')}/boot.ipxe"
    return (
        "#!ipxe\n"
        ":retry\n"
        f"chain --autofree --replace {url} || goto failed\n"
        ":failed\n"
        f"echo LPMOS: cannot fetch {url}; retrying in 5 seconds\n"
        "sleep 5\n"
        "goto retry\n"
    ).encode("ascii")


def render_grub_config(advertise_url: str) -> bytes:
    """The constant ``grub/grub.cfg``: it runs this machine's own config from
    the node's HTTP (``/grub/<mac>.cfg``, the same decision as iPXE's
    per-machine script) and, when that fails or returns (a wait), asks again
    after a pause, forever; no menu, no prompt.  Raises
    :class:`GrubUrlError` when GRUB cannot reach ``advertise_url``."""
    device = grub_http_device(advertise_url)
    path = urlsplit(advertise_url).path.rstrip("/")
    config = f"{device}{path}/grub/${{net_default_mac}}.cfg"
    return (
        "# LPMOS constant GRUB config: runs this machine's own config from the node,\n"
        "# and asks again after a pause when it cannot be fetched or returns.\n"
        "set timeout=0\n"
        "set pager=0\n"
        "while [ 1 = 1 ]; do\n"
        f'  source "{config}"\n'
        '  echo "LPMOS: asking the node again in 5 s"\n'
        "  sleep 5\n"
        "done\n"
    ).encode("ascii")


__all__ = ["BOOT_SCRIPT", "GRUB_CONFIG", "GRUB_LOADERS", "GrubUrlError", "grub_http_device",
           "render_chain_script", "render_grub_config", "transfer_stage"]
