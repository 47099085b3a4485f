"""Which DHCP answers go on the machine timeline (RecentAnswers) as a table,
and the standalone runner's advertised URL."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.responder import Reply
from bootsvc.dhcp.service import RecentAnswers, answer_key
from bootsvc.dhcp.standalone import advertise_url
from bootsvc.wire import dhcp

A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
OFFER = (dhcp.OFFER, "dhcp", "ipxe.efi", None, None)
ACK = (dhcp.ACK, "proxy", "ipxe.efi", None, None)

# (mac, answer key, time) -> recorded?  window 5 s, at most 2 MACs
STEPS = [
    (A, OFFER, 0.0, True),
    (A, OFFER, 1.0, False),          # the same answer again within the window
    (A, OFFER, 4.9, False),          # still within 5 s of the last recorded one (0.0)
    (A, OFFER, 5.0, True),           # the window has passed
    (A, ACK, 5.1, True),             # a different answer is always recorded
    (A, OFFER, 5.2, True),           # ... and so is going back to the first one
    (B, OFFER, 5.3, True),           # per MAC
    (C, OFFER, 5.4, True),           # a third MAC: the least recent (A) is forgotten
    (A, OFFER, 5.5, True),           # so A's answer is new again, and B is forgotten
    (C, OFFER, 5.6, False),          # C is still remembered
    (B, OFFER, 5.7, True),
]


def test_recent_answers_table() -> None:
    recent = RecentAnswers(window=5.0, size=2)
    got = [recent.is_new(mac, key, now) for mac, key, now, _ in STEPS]
    assert got == [expected for *_, expected in STEPS]


@pytest.mark.parametrize(("detail", "key"), [
    ({"kind": "tftp", "file": "ipxe.efi", "arch": 7}, (dhcp.OFFER, "dhcp", "ipxe.efi", None, None)),
    ({"ip": "10.0.0.9"}, (dhcp.OFFER, "dhcp", None, "10.0.0.9", None)),
    ({"nak": "wrong_server"}, (dhcp.OFFER, "dhcp", None, None, "wrong_server")),
])
def test_answer_key(detail: dict[str, object], key: tuple[object, ...]) -> None:
    reply = Reply(b"", ("255.255.255.255", 68), dhcp.OFFER, A, dict(detail))
    assert answer_key(reply, "dhcp") == key


@pytest.mark.parametrize(("configured", "server_ip", "expected"), [
    ("http://boot.example:9000", "10.0.0.1", "http://boot.example:9000"),
    (None, "10.0.0.1", "http://10.0.0.1:8081"),
    (None, "", ""),                   # no address known: answer without HTTP URLs
    ("", "10.0.0.1", "http://10.0.0.1:8081"),
])
def test_standalone_advertise_url(configured: str | None, server_ip: str, expected: str) -> None:
    assert advertise_url(configured, server_ip) == expected
