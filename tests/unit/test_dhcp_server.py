"""Where the DHCP sockets bind (decide_bind) as a table, and the interface
lookup it is given."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.sockets import (
    WILDCARD_IP,
    DhcpBind,
    NoDhcpInterface,
    decide_bind,
)
from bootsvc.netif import read_address_interface

# (--listen as an address or None, --interface, interface holding the address) -> interface
TABLE = [
    (None, None, None, None),                     # 0.0.0.0: every interface, as before
    (None, "eth0", None, "eth0"),
    ("10.0.0.5", "eth0", None, "eth0"),           # --interface wins
    ("10.0.0.5", "eth0", "eth1", "eth0"),         # even over the address's own interface
    ("10.0.0.5", None, "eth1", "eth1"),           # the interface that holds the address
    ("127.0.0.1", None, "lo", "lo"),
]


@pytest.mark.parametrize(("listen", "interface", "owner", "expected"), TABLE)
def test_decide_bind_always_binds_the_wildcard(listen: str | None, interface: str | None,
                                               owner: str | None,
                                               expected: str | None) -> None:
    """Linux hands broadcasts only to wildcard-bound sockets: whatever
    --listen says, the bind is 0.0.0.0, on the interface it implies."""
    assert decide_bind(listen, interface, owner) == DhcpBind(expected, WILDCARD_IP)


@pytest.mark.parametrize("listen", ["192.0.2.77", "localhost", "::1"])
def test_decide_bind_refuses_an_address_with_no_interface(listen: str) -> None:
    with pytest.raises(NoDhcpInterface) as info:
        decide_bind(listen, None, None)
    message = str(info.value)
    assert isinstance(info.value, OSError)       # a host error: one line, exit code 1
    assert "\n" not in message
    assert message.startswith(f"dhcp: --listen {listen} ")
    assert "give --interface IFACE" in message and "--listen 0.0.0.0" in message


def test_read_address_interface_finds_loopback() -> None:
    assert read_address_interface("127.0.0.1") == "lo"
    assert read_address_interface("192.0.2.77") is None     # TEST-NET-1: on no interface
