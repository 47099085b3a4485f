"""The regional node's TFTP service: a :class:`TftpServer` configured from
the node's settings, counting into the node's registry and recording each
transfer in the node's timeline."""

from __future__ import annotations

import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootsvc.http.common import HttpError
from bootsvc.netif import plain_address
from bootsvc.tftp.chain import (
    BOOT_SCRIPT,
    GRUB_CONFIG,
    GRUB_MACHINE_RE,
    IMAGE_FILE_RE,
    render_chain_script,
    render_grub_config,
    transfer_stage,
)
from bootsvc.tftp.root import prepare_tftp_root
from bootsvc.tftp.server import TftpServer
from bootsvc.tftp.settings import TftpSettings

if TYPE_CHECKING:
    from bootsvc.context import NodeContext
    from bootsvc.http.backend import BootBackend

log = logging.getLogger("lpmos.tftp")

#: the names made per request: the constant configs, a machine's GRUB
#: config, a catalog kernel or initrd (for GRUB)
VIRTUAL_PATTERN = "|".join((re.escape(BOOT_SCRIPT), re.escape(GRUB_CONFIG),
                            GRUB_MACHINE_RE.pattern, IMAGE_FILE_RE.pattern))
#: threads that answer GRUB configs needing etcd (an install claim)
CLAIM_THREADS = 4

class TftpService:
    """Serves ``tftp.root`` (default ``STATE_DIR/tftp``, prepared from
    Debian's iPXE builds and signed Secure Boot loaders at start) on
    ``--listen``, plus the node's chain script as ``boot.ipxe`` when the node
    has an advertised URL, and what
    GRUB fetches (it has no other way to the node): ``grub/grub.cfg``,
    ``grub/<mac>.cfg`` and ``images/<name>/<kernel or initrd>``, the last two
    from the boot HTTP's backend once :meth:`attach` gave it.  Transfers are
    recorded under ``ip:<addr>`` (TFTP knows no MAC), the boot loaders under
    their own stage (:func:`transfer_stage`)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        root = cfg.get("tftp.root")
        self.root = Path(root) if root else Path(cfg["state_dir"]) / "tftp"
        self.prepare = not root
        self._script = render_chain_script(ctx.advertise_url) if ctx.advertise_url else None
        self._grub = render_grub_config()
        self._boot: BootBackend | None = None
        self._claims: ThreadPoolExecutor | None = None
        self.server = TftpServer(
            self.root, TftpSettings.from_config(cfg),
            host=cfg.get("regional.listen", "0.0.0.0"), metrics=ctx.metrics,
            virtual=self._virtual, on_transfer=self._on_transfer,
            virtual_pattern=VIRTUAL_PATTERN)
        self.server.threads_busy = ctx.threads_busy

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        if self.prepare:
            placed = prepare_tftp_root(self.root)
            log.info("tftp: root %s prepared with %s", self.root, ", ".join(placed) or "nothing")
        elif not self.root.is_dir():
            log.warning("tftp: root %s is not a directory; every request will fail", self.root)
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
        if self._claims is not None:
            self._claims.shutdown(wait=False, cancel_futures=True)

    def attach(self, boot: BootBackend) -> None:
        """Serve GRUB's per-machine configs and catalog files from ``boot``
        (the boot HTTP's backend: the same decisions, claims and catalog)."""
        self._boot = boot
        self._claims = ThreadPoolExecutor(CLAIM_THREADS, thread_name_prefix="tftp-grub")

    def _virtual(self, name: str, client: tuple[str, int]) -> bytes | Future[bytes | None] | None:
        if name == BOOT_SCRIPT:
            return self._script
        if name == GRUB_CONFIG:
            return self._grub
        boot = self._boot
        if boot is None:
            return None
        machine = GRUB_MACHINE_RE.fullmatch(name)
        if machine is not None:
            return self._grub_machine(boot, f"{machine.group(1)}.cfg",
                                      plain_address(client[0]))
        image = IMAGE_FILE_RE.fullmatch(name)
        if image is not None:
            found = boot.boot_file(image.group(1), image.group(2))
            if found is None:
                return None
            try:
                return found[1].read_bytes()
            except OSError:
                return None
        return None

    def _stage(self, file: str) -> str:
        """The timeline stage of a file sent: a catalog kernel or initrd is
        ``kernel fetched`` / ``initrd fetched``, else :func:`transfer_stage`."""
        image = IMAGE_FILE_RE.fullmatch(file)
        if image is not None and self._boot is not None:
            found = self._boot.boot_file(image.group(1), image.group(2))
            if found is not None:
                return f"{found[0]} fetched"
        return transfer_stage(file)

    def _grub_machine(self, boot: BootBackend, name: str,
                      ip: str) -> bytes | Future[bytes | None] | None:
        """A machine's GRUB config: answered on the loop from the cache; one
        that needs an etcd claim is made on a thread."""
        try:
            text = boot.boot_script(name, {}, ip, inline=True, loader="grub")
        except HttpError:
            return None
        if text is not None:
            return text.encode()
        assert self._claims is not None

        def claim() -> bytes | None:
            done = boot.boot_script(name, {}, ip, loader="grub")
            return done.encode() if done is not None else None
        return self._claims.submit(claim)

    def _on_transfer(self, record: dict[str, Any]) -> None:
        detail = {"file": record["file"], "bytes": record["bytes"],
                  "seconds": record["seconds"], "status": record["status"]}
        try:
            self.ctx.timeline.record(f"ip:{plain_address(record['client'])}",
                                     self._stage(record["file"]),
                                     detail)
        except Exception:
            log.exception("tftp: timeline record failed")


__all__ = ["TftpService"]
