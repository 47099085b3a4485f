"""The ``boot`` blueprint: the iPXE scripts and GRUB configs, no token.

``GET /boot.ipxe`` is a constant script that chains to the per-machine
``GET /boot/<mac>.ipxe?uuid=&serial=&arch=&platform=&bootmac=``; GRUB's
constant ``GET /grub/grub.cfg`` (also over TFTP) runs the per-machine
``GET /grub/<mac>.cfg``, the same decision rendered for GRUB.  In a
running node :mod:`bootsvc.http.fastpath` (and the server's inline path)
answer both before Flask sees them; these routes give the same answers
(both call :class:`~bootsvc.http.backend.BootBackend`) for every other way
the app is served.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import text_response

boot_bp = Blueprint("boot", __name__)


@boot_bp.get("/boot.ipxe")
def boot_ipxe() -> Response:
    return text_response(current_boot().constant_script(request.remote_addr))


@boot_bp.get("/boot/<path:name>")
def boot_machine(name: str) -> Response:
    boot = current_boot()
    text = boot.boot_script(name, request.args, request.remote_addr or "")
    return text_response(text or "")


@boot_bp.get("/grub/grub.cfg")
def grub_config() -> Response:
    return text_response(current_boot().constant_grub_config())


@boot_bp.get("/grub/<path:name>")
def grub_machine(name: str) -> Response:
    boot = current_boot()
    text = boot.boot_script(name, request.args, request.remote_addr or "", loader="grub")
    return text_response(text or "")
