"""The TFTP server's pure decisions on a session, as tables."""

from __future__ import annotations

import pytest

from bootsvc.tftp.session import (
    BACKOFF_CAP,
    AckAction,
    Repeat,
    Session,
    backoff_delay,
    decide_ack,
    decide_repeat,
    sent_bytes,
    stalest,
    transfer_record,
)

IGNORE, START, ADVANCE, DONE, GAP = (AckAction.IGNORE, AckAction.START, AckAction.ADVANCE,
                                     AckAction.DONE, AckAction.GAP)


@pytest.mark.parametrize(
    ("ack16", "oack_pending", "base", "sent_upto", "nblocks", "windowsize", "gap_answered",
     "expected"),
    [
        # the OACK: only ACK 0 starts the transfer
        (0, True, 1, 0, 10, 4, False, (START, 0)),
        (1, True, 1, 0, 10, 4, False, (IGNORE, 0)),
        (0, True, 1, 0, 10, 1, False, (START, 0)),
        # a window of 4 in flight (blocks 1-4 sent)
        (4, False, 1, 4, 10, 4, False, (ADVANCE, 4)),
        (2, False, 1, 4, 10, 4, False, (ADVANCE, 2)),
        (1, False, 1, 4, 10, 4, False, (ADVANCE, 1)),
        # the last block acknowledged
        (10, False, 9, 10, 10, 4, False, (DONE, 10)),
        # the gap signal: the block before the window, once per window
        (4, False, 5, 8, 10, 4, False, (GAP, 4)),
        (4, False, 5, 8, 10, 4, True, (IGNORE, 4)),
        # ... never in lock-step, and not before the window was sent
        (4, False, 5, 5, 10, 1, False, (IGNORE, 4)),
        (4, False, 5, 4, 10, 4, False, (IGNORE, 4)),
        # older duplicates: never answered (Sorcerer's Apprentice)
        (2, False, 5, 8, 10, 4, False, (IGNORE, 2)),
        # lock-step: the block in flight, or nothing
        (3, False, 3, 3, 10, 1, False, (ADVANCE, 3)),
        (2, False, 3, 3, 10, 1, False, (IGNORE, 2)),
        (3, False, 3, 3, 3, 1, False, (DONE, 3)),
        # 16-bit block numbers roll over: unwrapped against the highest sent
        (0, False, 65535, 65538, 70000, 4, False, (ADVANCE, 65536)),
        (2, False, 65537, 65538, 70000, 4, False, (ADVANCE, 65538)),
        (0xFFFF, False, 65536, 65539, 70000, 4, False, (GAP, 65535)),
        # a block beyond what was sent is read as an old one, not a jump ahead
        (9, False, 5, 8, 10, 4, False, (IGNORE, 9 - 65536)),
    ])
def test_decide_ack_table(ack16, oack_pending, base, sent_upto, nblocks, windowsize,
                          gap_answered, expected):
    assert decide_ack(ack16, oack_pending=oack_pending, base=base, sent_upto=sent_upto,
                      nblocks=nblocks, windowsize=windowsize,
                      gap_answered=gap_answered) == expected


@pytest.mark.parametrize(("same_request", "oack_pending", "base", "expected"), [
    (True, True, 1, Repeat.RESEND),        # OACK not heard: say it again
    (True, False, 1, Repeat.RESEND),       # first window not heard
    (True, False, 2, Repeat.IGNORE),       # a late copy once the transfer is under way
    (True, True, 5, Repeat.RESEND),
    (False, True, 1, Repeat.SUPERSEDE),    # another file, or another tsize probe
    (False, False, 7, Repeat.SUPERSEDE),
])
def test_decide_repeat_table(same_request, oack_pending, base, expected):
    assert decide_repeat(same_request, oack_pending=oack_pending, base=base) is expected


@pytest.mark.parametrize(("timeout", "tries", "expected"), [
    (1.0, 1, 2.0),
    (1.0, 2, 4.0),
    (1.0, 3, BACKOFF_CAP),          # capped
    (0.1, 3, 0.8),
    (0.1, 10, BACKOFF_CAP),
    (8.0, 1, 8.0),                  # never below the session's own timeout
    (8.0, 4, 8.0),
])
def test_backoff_delay_table(timeout, tries, expected):
    assert backoff_delay(timeout, tries) == pytest.approx(expected)


@pytest.mark.parametrize(("status", "size", "sent_upto", "blksize", "expected"), [
    ("ok", 1000, 2, 512, 1000),
    ("timeout", 1000, 1, 512, 512),
    ("timeout", 1000, 2, 512, 1000),      # at most the file
    ("aborted", 1000, 0, 512, 0),         # a tsize probe: nothing sent
    ("vanished", 5000, 3, 1468, 4404),
])
def test_sent_bytes_table(status, size, sent_upto, blksize, expected):
    assert sent_bytes(status, size, sent_upto, blksize) == expected


def _session(ip: str, last_progress: float, timeout: float = 1.0) -> Session:
    s = Session()
    s.client, s.last_progress, s.timeout = (ip, 1000), last_progress, timeout
    return s


@pytest.mark.parametrize(("progress", "now", "ip", "expected"), [
    ([("10.0.0.1", 5.0), ("10.0.0.2", 3.0)], 10.0, None, 1),      # the idlest
    ([("10.0.0.1", 5.0), ("10.0.0.2", 3.0)], 10.0, "10.0.0.1", 0),
    ([("10.0.0.1", 9.5), ("10.0.0.2", 9.8)], 10.0, None, None),    # none idle a timeout
    ([("10.0.0.1", 9.0)], 10.0, None, 0),                          # exactly a timeout
    ([("10.0.0.1", 5.0)], 10.0, "10.0.0.9", None),                 # none of that client
    ([], 10.0, None, None),
])
def test_stalest_table(progress, now, ip, expected):
    sessions = [_session(addr, t) for addr, t in progress]
    got = stalest(sessions, now, ip)
    assert got is (None if expected is None else sessions[expected])


def test_transfer_record_reports_the_session():
    s = _session("10.0.0.7", 0.0)
    s.client = ("10.0.0.7", 2070)
    s.name, s.size, s.sent_upto, s.blksize, s.windowsize = "ipxe.efi", 3000, 2, 1468, 4
    s.retransmits, s.virtual = 1, False
    assert transfer_record(s, "timeout", 1.23456789) == {
        "client": "10.0.0.7", "port": 2070, "file": "ipxe.efi", "bytes": 2936, "size": 3000,
        "seconds": 1.234568, "status": "timeout", "blksize": 1468, "windowsize": 4,
        "retransmits": 1, "virtual": False}
