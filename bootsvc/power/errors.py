"""What went wrong with a BMC, in words an operator can act on.

:func:`classify` is pure: it maps an exception a driver (sushy, pyghmi, the
socket layer) raised to a :class:`BmcError` with a kind, a reason and
whether trying again may help.  A reason never carries the password: the
libraries' messages name URLs and users, never the secret, and a reason is
cut to a bounded length.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

MAX_REASON = 300

#: kinds, and whether a retry may help
RETRYABLE = {"unreachable": True, "timeout": True, "bmc_error": True, "auth": False,
             "protocol": False, "unsupported": False, "config": False}


class BmcError(Exception):
    """A BMC call failed: ``kind`` (a key of :data:`RETRYABLE`) and ``reason``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason[:MAX_REASON])
        self.kind = kind
        self.reason = reason[:MAX_REASON]

    @property
    def retryable(self) -> bool:
        return RETRYABLE.get(self.kind, False)


@dataclass(frozen=True)
class Where:
    """The BMC a call went to, for the message: ``endpoint`` (URL or
    host:port), ``driver``, ``user``, ``timeout`` (seconds a call may take)."""

    endpoint: str
    driver: str
    user: str = ""
    timeout: float = 0.0


def _cut(text: str, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _first_line_of(exc: BaseException) -> str:
    return _cut(str(exc) or type(exc).__name__)


def classify(exc: BaseException, where: Where) -> BmcError:
    """The :class:`BmcError` of ``exc``, raised by a call to ``where``."""
    if isinstance(exc, BmcError):
        return exc
    name = type(exc).__name__
    module = type(exc).__module__
    text = str(exc)
    low = text.lower()
    if module.startswith("sushy"):
        return _classify_sushy(exc, name, text, low, where)
    if module.startswith("pyghmi"):
        return _classify_ipmi(text, low, where)
    if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
        # a reply the library could not read (not JSON, a field of the wrong
        # type); before OSError: requests' JSONDecodeError is both
        return BmcError("protocol", f"BMC at {where.endpoint} sent a reply that is not valid "
                                    f"{'Redfish' if where.driver == 'redfish' else 'IPMI'}: "
                                    f"{name}: {_cut(text)}")
    if isinstance(exc, socket.gaierror):
        return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: the name does "
                                       f"not resolve ({_cut(text)})")
    if isinstance(exc, TimeoutError | socket.timeout):
        return BmcError("timeout", f"BMC at {where.endpoint} did not answer within "
                                   f"{where.timeout:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: connection "
                                       "refused")
    if isinstance(exc, OSError):
        return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: "
                                       f"{_first_line_of(exc)}")
    return BmcError("bmc_error", f"BMC at {where.endpoint}: {name}: {_cut(text)}")


def _classify_sushy(exc: BaseException, name: str, text: str, low: str,
                    where: Where) -> BmcError:
    status = getattr(exc, "status_code", None)
    if name == "AccessError" or status in (401, 403):
        return BmcError("auth", f"BMC refused the credentials of user {where.user!r} at "
                                f"{where.endpoint} (HTTP {status or 401})")
    if name == "ConnectionError":
        if "refused" in low:         # first: the message may name the connect timeout
            return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: connection "
                                           "refused")
        if "timed out" in low or "timeout" in low:
            return BmcError("timeout", f"BMC at {where.endpoint} did not answer within "
                                       f"{where.timeout:g} s")
        if "name or service not known" in low or "nodename nor servname" in low or \
                "failed to resolve" in low:
            return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: the name "
                                           "does not resolve")
        if "certificate" in low or "ssl" in low:
            return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: TLS failed "
                                           "(set options.verify_tls false for a self-signed "
                                           f"certificate): {_cut(text, 120)}")
        return BmcError("unreachable", f"BMC unreachable at {where.endpoint}: "
                                       f"{_cut(text, 200)}")
    if name in ("MissingAttributeError", "MalformedAttributeError", "ExtensionError",
                "UnknownDefaultError", "ArchiveParsingError", "MissingHeaderError"):
        return BmcError("protocol", f"BMC at {where.endpoint} sent an unexpected Redfish "
                                    f"reply: {_cut(text)}")
    if name == "InvalidParameterValueError":
        return BmcError("unsupported", f"BMC at {where.endpoint} does not offer that: "
                                       f"{_cut(text)}")
    if name == "ResourceNotFoundError" or status == 404:
        return BmcError("config", f"BMC at {where.endpoint}: {_cut(text)} (check "
                                  "options.system)")
    if status is not None and status >= 500:
        return BmcError("bmc_error", f"BMC at {where.endpoint} failed the request "
                                     f"(HTTP {status}): {_cut(text)}")
    if status is not None:
        return BmcError("unsupported", f"BMC at {where.endpoint} refused the request "
                                       f"(HTTP {status}): {_cut(text)}")
    return BmcError("bmc_error", f"BMC at {where.endpoint}: {name}: {_cut(text)}")


def _classify_ipmi(text: str, low: str, where: Where) -> BmcError:
    if "password" in low or "unauthorized name" in low or "unauthorized" in low or \
            "invalid name" in low or "insufficient privilege" in low:
        return BmcError("auth", f"BMC refused the credentials of user {where.user!r} at "
                                f"{where.endpoint} ({_cut(text, 80)})")
    if not text or text == "None" or "timeout" in low or "timed out" in low or \
            "no response" in low:
        # IPMI runs over UDP: a closed port and a silent BMC look the same
        return BmcError("timeout", f"BMC at {where.endpoint} did not answer over IPMI "
                                   "(UDP) in time: unreachable, wrong port, or not an IPMI BMC")
    return BmcError("bmc_error", f"BMC at {where.endpoint}: IPMI error: {_cut(text)}")
