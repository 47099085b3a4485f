"""What the TFTP server counts: the metrics it describes, and a finished
transfer added to them once, when it ends (not per packet)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bootsvc.tftp.session import Session, sent_bytes, transfer_record
from lpmos.metrics import Registry

log = logging.getLogger("lpmos.tftp")


def describe_metrics(m: Registry, active_sessions: Callable[[], float],
             cached_bytes: Callable[[], float]) -> None:
    m.describe("tftp_requests_total", "TFTP requests received on the server port")
    m.describe("tftp_refused_total", "requests answered with an ERROR and no session, "
                                     "by reason")
    m.describe("tftp_dropped_total", "datagrams dropped without an answer, by reason")
    m.describe("tftp_sessions_total", "finished transfers by status")
    m.describe("tftp_bytes_total", "file bytes sent (first transmissions)")
    m.describe("tftp_retransmits_total", "DATA/OACK packets sent again after a timeout "
                                         "or a gap")
    m.describe("tftp_errors_sent_total", "ERROR packets sent, by code")
    m.describe("tftp_client_errors_total", "ERROR packets received from clients, by code")
    m.describe("tftp_transfer_seconds", "time from request to last ACK of finished "
                                        "transfers", kind="histogram")
    m.gauge("tftp_sessions_active", active_sessions, "transfers in progress")
    m.gauge("tftp_cache_bytes", cached_bytes, "bytes of files held in the TFTP cache")


def count_transfer(m: Registry, s: Session, status: str, seconds: float,
                   on_transfer: Callable[[dict[str, Any]], None] | None) -> None:
    """A finished transfer into the metrics and to ``on_transfer`` (whose
    failure is logged, never raised)."""
    m.inc("tftp_sessions_total", status=status)
    m.inc("tftp_bytes_total", sent_bytes(status, s.size, s.sent_upto, s.blksize))
    if s.retransmits:
        m.inc("tftp_retransmits_total", s.retransmits)
    if status == "ok":
        m.observe("tftp_transfer_seconds", seconds)
    if on_transfer is not None:
        try:
            on_transfer(transfer_record(s, status, seconds))
        except Exception:
            log.exception("tftp: on_transfer callback failed")


__all__ = ["count_transfer", "describe_metrics"]
