"""The iPXE script a regional node serves as ``boot.ipxe`` over TFTP.

It is constant per node (no machine is known at TFTP time: TFTP carries no
MAC) and only hands the machine over to boot HTTP, where the per-machine
script is decided; if HTTP cannot be reached it retries after a pause rather
than dropping the machine to an iPXE prompt.
"""

from __future__ import annotations

#: the name the chain script is served under
BOOT_SCRIPT = "boot.ipxe"


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


__all__ = ["BOOT_SCRIPT", "render_chain_script"]
