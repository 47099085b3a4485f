"""The constant configs a regional node serves its boot loaders: the iPXE
script ``boot.ipxe`` and GRUB's ``grub/grub.cfg``.

Both are constant per node (no machine is known at TFTP time: TFTP carries
no MAC) and only hand the machine over to its per-machine script or config
(iPXE's over boot HTTP, GRUB's over TFTP, below), where the boot is decided;
if that cannot be fetched they retry after a pause rather than dropping the
machine to a prompt.

GRUB is the signed network image of Debian 12 (``grubnetx64.efi.signed``,
GRUB 2.06), which shim loads on Secure Boot machines.  Its built-in prefix is
``/grub`` on the TFTP server it was loaded from, so it reads
``grub/grub.cfg`` there.  It has no HTTP client built in and Secure Boot
forbids loading one (``http.mod``), so everything GRUB fetches comes over
TFTP: this config, the machine's own ``grub/<mac>.cfg`` and the kernel and
initrd (``images/<name>/<file>``).  It reads its server from the DHCP ACK
and ignores ProxyDHCP offers (GRUB 2.12 reads them), so it boots where the
node is the DHCP server (``--dhcp-mode full``) or the site's DHCP names the
node as next-server.
"""

from __future__ import annotations

import re

from bootsvc.policy.bootfile import GRUB_LOADERS

#: the name the chain script is served under
BOOT_SCRIPT = "boot.ipxe"
#: the name GRUB's network image reads its config under (its prefix is /grub)
GRUB_CONFIG = "grub/grub.cfg"

#: boot loader files and the timeline stage their transfer is recorded as
#: (any other file: ``tftp``), so a machine stuck at a loader shows where
LOADER_STAGES = {
    "shimx64.efi": "loader shim",
    "grubx64.efi": "loader grub",
    "grubaa64.efi": "loader grub",
    "mmx64.efi": "loader mok manager",
    GRUB_CONFIG: "grub.cfg",
    "ipxe.efi": "loader ipxe",
    "snponly.efi": "loader ipxe",
    "undionly.kpxe": "loader ipxe",
    "undionly.kkpxe": "loader ipxe",
    "ipxe.pxe": "loader ipxe",
}


def transfer_stage(file: str, other: str = "tftp") -> str:
    """The timeline stage of a file sent to a machine (TFTP or HTTP);
    ``other`` for a file that is no known loader."""
    return LOADER_STAGES.get(file, other)


#: a machine's own GRUB config over TFTP, as GRUB names it (``$net_default_mac``)
GRUB_MACHINE_RE = re.compile(r"grub/((?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2})\.cfg")
#: a catalog file over TFTP, for GRUB: ``images/<image>/<file>``
IMAGE_FILE_RE = re.compile(r"images/([A-Za-z0-9][A-Za-z0-9._+-]{0,127})/"
                           r"([A-Za-z0-9][A-Za-z0-9._+-]{0,127})")


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


def render_grub_config() -> bytes:
    """The constant ``grub/grub.cfg``: it runs this machine's own config
    from the same TFTP server (``$prefix/<mac>.cfg``: the same decision as
    iPXE's per-machine script) and, when that fails or returns (a wait),
    asks again after a pause, forever; no menu, no prompt."""
    return (
        "# LPMOS constant GRUB config: runs this machine's own config from the node,\n"
        "# and asks again after a pause when it cannot be fetched or returns.\n"
        "set timeout=0\n"
        "set pager=0\n"
        "while [ 1 = 1 ]; do\n"
        '  source "$prefix/${net_default_mac}.cfg"\n'
        '  echo "LPMOS: asking the node again in 5 s"\n'
        "  sleep 5\n"
        "done\n"
    ).encode("ascii")


__all__ = ["BOOT_SCRIPT", "GRUB_CONFIG", "GRUB_LOADERS", "GRUB_MACHINE_RE", "IMAGE_FILE_RE",
           "render_chain_script", "render_grub_config", "transfer_stage"]
