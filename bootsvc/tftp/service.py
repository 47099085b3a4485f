"""The regional node's TFTP service: a :class:`TftpServer` configured from
the node's settings, counting into the node's registry and recording each
transfer in the node's timeline."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootsvc.tftp.chain import (
    BOOT_SCRIPT,
    GRUB_CONFIG,
    GrubUrlError,
    render_chain_script,
    render_grub_config,
    transfer_stage,
)
from bootsvc.tftp.root import prepare_tftp_root
from bootsvc.tftp.server import TftpServer
from bootsvc.tftp.settings import TftpSettings

if TYPE_CHECKING:
    from bootsvc.context import NodeContext

log = logging.getLogger("lpmos.tftp")



class TftpService:
    """Serves ``tftp.root`` (default ``STATE_DIR/tftp``, prepared from
    Debian's iPXE builds at start) on ``--listen``, plus the node's chain
    script as ``boot.ipxe`` when the node has an advertised URL.  Transfers
    are recorded under ``ip:<addr>``: TFTP knows no MAC."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        root = cfg.get("tftp.root")
        self.root = Path(root) if root else Path(cfg["state_dir"]) / "tftp"
        self.prepare = not root
        self._script = render_chain_script(ctx.advertise_url) if ctx.advertise_url else None
        self._grub: bytes | None = None
        if ctx.advertise_url:
            try:
                self._grub = render_grub_config(ctx.advertise_url)
            except GrubUrlError:
                pass        # the node refuses GRUB loaders then (bootsvc.node)
        self.server = TftpServer(
            self.root, TftpSettings.from_config(cfg),
            host=cfg.get("regional.listen", "0.0.0.0"), metrics=ctx.metrics,
            virtual=self._virtual, on_transfer=self._on_transfer,
            virtual_pattern=f"{re.escape(BOOT_SCRIPT)}|{re.escape(GRUB_CONFIG)}")
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

    def _virtual(self, name: str, client: tuple[str, int]) -> bytes | None:
        if name == BOOT_SCRIPT:
            return self._script
        if name == GRUB_CONFIG:
            return self._grub
        return None

    def _on_transfer(self, record: dict[str, Any]) -> None:
        detail = {"file": record["file"], "bytes": record["bytes"],
                  "seconds": record["seconds"], "status": record["status"]}
        try:
            self.ctx.timeline.record(f"ip:{record['client']}", transfer_stage(record["file"]),
                                     detail)
        except Exception:
            log.exception("tftp: timeline record failed")


__all__ = ["TftpService"]
