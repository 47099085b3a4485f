"""What the node answers a DHCPv6 message: one pure function per mode.

**Proxy mode** (next to the site's DHCPv6 server, which gives the
addresses): the answer carries the boot part only, never an address, the
way UEFI PXE over IPv6 expects a "proxy offer" (EDK2's PxeBcDhcp6: an
Advertise with no IA_NA, or an IA_NA whose status is not success, and a
vendor class of enterprise 343 starting with ``PXEClient``, is a proxy
BINL offer; the client then asks the proxy again, with a Request to port
4011 of the boot file URL's host, and boots the URL of the Reply):

* SOLICIT from a boot client → ADVERTISE: server id, client id, vendor
  class ``PXEClient`` (or ``HTTPClient``), boot file URL, and an IA_NA
  whose status is NoAddrsAvail;
* REQUEST or INFORMATION-REQUEST on port 4011, or naming our server id →
  REPLY with the same boot options;
* a message naming another server's id → nothing (``not_for_us``);
* anything else, or a client the decision refuses → nothing (the
  decision's reason).

**Full mode** (lab segments with no DHCPv6 server): the same boot options
plus an address: SOLICIT gets an ADVERTISE offering the address
:class:`Lease6` holds for this client (chosen by the caller, which keeps
the leases in etcd), REQUEST/RENEW/REBIND get a REPLY binding it, RELEASE
and DECLINE a REPLY with status Success (the caller frees the lease).

The caller parses, chooses the lease, sends, and counts; this module
builds bytes from a parsed message and the node's settings only.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from bootsvc.policy.bootfile import HTTP_CLIENT, BootRefusal
from bootsvc.policy.bootfile6 import Boot6Answer, Boot6Policy, decide_bootfile6
from bootsvc.wire import dhcp6
from bootsvc.wire.dhcp6 import Dhcp6Message

#: the enterprise number EDK2 sends and expects in option 16 (Intel's)
PXE_ENTERPRISE = 343
#: the proxy's boot service port (PXE 2.1, also over IPv6)
PROXY_PORT = 4011


@dataclass(frozen=True, slots=True)
class Lease6:
    """An address for one client: ``address`` with its lifetimes (s)."""

    address: str
    preferred: int = 3600
    valid: int = 7200


@dataclass(frozen=True, slots=True)
class Answer6:
    """Bytes to send, what kind of message, and the boot decision behind it."""

    payload: bytes
    msg_type: int
    boot: Boot6Answer | None
    lease: Lease6 | None = None


@dataclass(frozen=True, slots=True)
class NoAnswer:
    reason: str
    detail: str = ""


Decision6 = Answer6 | NoAnswer


def _boot_options(msg: Dhcp6Message, server_duid: bytes,
                  boot: Boot6Answer) -> list[tuple[int, bytes]]:
    klass = boot.answer.vendor_class.encode()
    if boot.answer.vendor_class == HTTP_CLIENT:
        klass = b"HTTPClient"
    client_id = msg.client_id
    options: list[tuple[int, bytes]] = [(dhcp6.OPT_SERVERID, server_duid)]
    if client_id is not None:
        options.append((dhcp6.OPT_CLIENTID, client_id))
    options.append((dhcp6.OPT_VENDOR_CLASS,
                    struct.pack("!I", PXE_ENTERPRISE) + dhcp6.length_prefix([klass])))
    options.append((dhcp6.OPT_BOOTFILE_URL, boot.url.encode()))
    return options


def answer_proxy(msg: Dhcp6Message, policy: Boot6Policy, server_duid: bytes, *,
                 port: int = dhcp6.SERVER_PORT) -> Decision6:
    """The proxy-mode answer to ``msg`` received on ``port`` (547 or 4011)."""
    server_id = msg.get(dhcp6.OPT_SERVERID)
    if server_id is not None and server_id != server_duid:
        return NoAnswer("not_for_us", "a server id that is not ours")
    if msg.msg_type == dhcp6.SOLICIT:
        if port == PROXY_PORT:
            return NoAnswer("unexpected_type", "a SOLICIT on the proxy port")
        reply_type = dhcp6.ADVERTISE
    elif msg.msg_type in (dhcp6.REQUEST, dhcp6.INFORMATION_REQUEST):
        if port != PROXY_PORT and server_id is None:
            return NoAnswer("not_for_us", "a REQUEST for another server")
        reply_type = dhcp6.REPLY
    else:
        return NoAnswer("unexpected_type", f"{msg.name} in proxy mode")
    boot = decide_bootfile6(msg, policy)
    if isinstance(boot, BootRefusal):
        return NoAnswer(boot.reason, boot.detail)
    options = _boot_options(msg, server_duid, boot)
    for iaid in msg.ia_na_iaids if reply_type == dhcp6.ADVERTISE else ():
        options.append((dhcp6.OPT_IA_NA, dhcp6.ia_na(
            iaid, 0, 0, status=(dhcp6.STATUS_NO_ADDRS_AVAIL,
                                "addresses come from the site's DHCPv6 server"))))
    return Answer6(dhcp6.build_message(reply_type, msg.transaction_id, options), reply_type,
                   boot)


def answer_full(msg: Dhcp6Message, policy: Boot6Policy, server_duid: bytes,
                lease: Lease6 | None) -> Decision6:
    """The full-mode answer to ``msg`` with ``lease`` (the address the
    caller keeps for this client; ``None``: the pool is exhausted)."""
    server_id = msg.get(dhcp6.OPT_SERVERID)
    if server_id is not None and server_id != server_duid:
        return NoAnswer("not_for_us", "a server id that is not ours")
    if msg.msg_type in (dhcp6.RELEASE, dhcp6.DECLINE):
        options = [(dhcp6.OPT_SERVERID, server_duid)]
        if msg.client_id is not None:
            options.append((dhcp6.OPT_CLIENTID, msg.client_id))
        options.append((dhcp6.OPT_STATUS_CODE,
                        dhcp6.status_code(dhcp6.STATUS_SUCCESS, "released")))
        return Answer6(dhcp6.build_message(dhcp6.REPLY, msg.transaction_id, options),
                       dhcp6.REPLY, None)
    if msg.msg_type == dhcp6.SOLICIT:
        reply_type = dhcp6.ADVERTISE
    elif msg.msg_type in (dhcp6.REQUEST, dhcp6.RENEW, dhcp6.REBIND, dhcp6.CONFIRM,
                          dhcp6.INFORMATION_REQUEST):
        reply_type = dhcp6.REPLY
    else:
        return NoAnswer("unexpected_type", msg.name)
    if msg.client_id is None:
        return NoAnswer("no_client_id", f"{msg.name} without a client id")
    boot = decide_bootfile6(msg, policy)
    if isinstance(boot, BootRefusal):
        return NoAnswer(boot.reason, boot.detail)
    options = _boot_options(msg, server_duid, boot)
    if msg.msg_type != dhcp6.INFORMATION_REQUEST:
        iaids = msg.ia_na_iaids
        if not iaids:
            return NoAnswer("no_ia_na", f"{msg.name} asks for no address")
        for iaid in iaids[:1]:
            if lease is None:
                options.append((dhcp6.OPT_IA_NA, dhcp6.ia_na(
                    iaid, 0, 0, status=(dhcp6.STATUS_NO_ADDRS_AVAIL, "the pool is full"))))
            else:
                addr = ipaddress.IPv6Address(lease.address).packed
                options.append((dhcp6.OPT_IA_NA, dhcp6.ia_na(
                    iaid, lease.preferred // 2, lease.preferred * 4 // 5,
                    [(addr, lease.preferred, lease.valid)])))
    return Answer6(dhcp6.build_message(reply_type, msg.transaction_id, options), reply_type,
                   boot, lease)
