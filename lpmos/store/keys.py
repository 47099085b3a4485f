"""The etcd key schema (design brief, "Data model in etcd").

One key per object, no shared lists.  All keys live under a configurable
prefix (default ``/os``).  IDC names are ``[a-z0-9][a-z0-9_-]*`` and may not
be ``audit``; the LPMOS-wide keys that are not per IDC live under names that
start with ``_`` so they can never collide with an IDC.

| key                                   | value                               |
| ------------------------------------- | ----------------------------------- |
| {p}/{idc}/servers/{sn}                | :class:`lpmos.models.Server`        |
| {p}/{idc}/machines/{sn}/task          | :class:`lpmos.models.Task`          |
| {p}/{idc}/machines/{sn}/lease         | agent liveness (etcd lease)         |
| {p}/{idc}/machines/{sn}/token         | per-machine token hash              |
| {p}/{idc}/machines/{sn}/timeline      | boot timeline (bounded)             |
| {p}/{idc}/macs/{mac}                  | SN owning the MAC                   |
| {p}/{idc}/nodes/{node}                | regional node registration (lease)  |
| {p}/{idc}/dhcp/{mac}                  | lab-mode DHCP lease                 |
| {p}/{idc}/dhcp6/{duid-iaid}           | lab-mode DHCPv6 lease               |
| {p}/audit/{time}-{id}                 | audit record                        |
| {p}/_auth/users/{name}                | user (role, password hash)          |
| {p}/_auth/tokens/{sha256}             | API token record                    |
| {p}/_templates/{name}                 | task template (preset)              |
| {p}/_webhooks/{id}                    | outbound webhook (URL, events, key) |
| {p}/_secrets/node_api                 | control plane → node API HMAC key   |
| {p}/images/{name}                     | managed image record (lpmos.images) |
| {p}/{idc}/nodes/{node}/images/{name}  | a node's copy of it (node's lease)  |
| {p}/{idc}/machines/{sn}/bmc           | BMC record, no secret (lpmos.power) |
| {p}/{idc}/machines/{sn}/power/{id}    | a power request and its result      |
| {p}-secrets/bmc/{idc}/{sn}            | the BMC password (nodes read it)    |

``images`` is reserved as an IDC name, as ``audit`` is: both are LPMOS-wide
keys directly under the prefix (the design brief's names, kept).

The BMC passwords live *beside* the prefix (``/os-secrets/``, which sorts
before ``/os/``), not under it: the control plane's one watch of the whole
prefix never holds them, and with etcd auth the control plane's user can be
given write-only access there and the nodes' users read access.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RESERVED_IDC_NAMES = frozenset({"audit", "images"})


@dataclass(frozen=True)
class ParsedKey:
    kind: str           # task, server, lease, token, timeline, mac, node, dhcp, audit, ...
    idc: str = ""
    name: str = ""      # sn, mac, node name, audit id ...


class Keys:
    """Builds and parses keys under one prefix."""

    def __init__(self, prefix: str = "/os") -> None:
        prefix = "/" + prefix.strip("/")
        self.prefix = prefix
        self._machine_re = re.compile(
            re.escape(prefix)
            + r"/([a-z0-9][a-z0-9_-]*)/machines/([^/]+)/(task|lease|token|timeline|bmc)"
        )
        self._node_image_re = re.compile(
            re.escape(prefix) + r"/([a-z0-9][a-z0-9_-]*)/nodes/([^/]+)/images/([^/]+)"
        )
        self._power_re = re.compile(
            re.escape(prefix) + r"/([a-z0-9][a-z0-9_-]*)/machines/([^/]+)/power/([^/]+)"
        )
        self._idc_re = re.compile(
            re.escape(prefix) + r"/([a-z0-9][a-z0-9_-]*)/(servers|macs|nodes|dhcp)/([^/]+)"
        )

    # -- builders
    def root(self) -> str:
        return self.prefix + "/"

    def idc(self, idc: str) -> str:
        return f"{self.prefix}/{idc}/"

    def task(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/machines/{sn}/task"

    def lease(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/machines/{sn}/lease"

    def machine_token(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/machines/{sn}/token"

    def timeline(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/machines/{sn}/timeline"

    def server(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/servers/{sn}"

    def servers(self, idc: str) -> str:
        return f"{self.prefix}/{idc}/servers/"

    def mac(self, idc: str, mac: str) -> str:
        return f"{self.prefix}/{idc}/macs/{mac}"

    def node(self, idc: str, node: str) -> str:
        return f"{self.prefix}/{idc}/nodes/{node}"

    def nodes(self, idc: str) -> str:
        return f"{self.prefix}/{idc}/nodes/"

    def dhcp_lease(self, idc: str, mac: str) -> str:
        return f"{self.prefix}/{idc}/dhcp/{mac}"

    def dhcp_leases(self, idc: str) -> str:
        return f"{self.prefix}/{idc}/dhcp/"

    def dhcp6_lease(self, idc: str, client: str) -> str:
        """A DHCPv6 full-mode lease; ``client`` is the DUID and IAID in hex."""
        return f"{self.prefix}/{idc}/dhcp6/{client}"

    def dhcp6_leases(self, idc: str) -> str:
        return f"{self.prefix}/{idc}/dhcp6/"

    def audit(self, stamp: str, ident: str) -> str:
        return f"{self.prefix}/audit/{stamp}-{ident}"

    def audit_prefix(self) -> str:
        return f"{self.prefix}/audit/"

    def user(self, name: str) -> str:
        return f"{self.prefix}/_auth/users/{name}"

    def users(self) -> str:
        return f"{self.prefix}/_auth/users/"

    def api_token(self, digest: str) -> str:
        return f"{self.prefix}/_auth/tokens/{digest}"

    def api_tokens(self) -> str:
        return f"{self.prefix}/_auth/tokens/"

    def template(self, name: str) -> str:
        return f"{self.prefix}/_templates/{name}"

    def templates(self) -> str:
        return f"{self.prefix}/_templates/"

    def webhook(self, ident: str) -> str:
        """An outbound webhook (:mod:`web.webhooks`); its value holds the
        HMAC secret, so only the control plane reads it."""
        return f"{self.prefix}/_webhooks/{ident}"

    def webhooks(self) -> str:
        return f"{self.prefix}/_webhooks/"

    def node_api_secret(self) -> str:
        """The key the control plane signs its requests to regional nodes
        with (:mod:`lpmos.nodeapi`); readable by services only."""
        return f"{self.prefix}/_secrets/node_api"

    def image(self, name: str) -> str:
        """A managed image's catalog record (:mod:`lpmos.images`)."""
        return f"{self.prefix}/images/{name}"

    def images(self) -> str:
        return f"{self.prefix}/images/"

    def node_image(self, idc: str, node: str, name: str) -> str:
        """A regional node's copy of a managed image (fetching, ready,
        failed), under the node's registration lease."""
        return f"{self.prefix}/{idc}/nodes/{node}/images/{name}"

    def node_images(self, idc: str, node: str) -> str:
        return f"{self.prefix}/{idc}/nodes/{node}/images/"

    def bmc(self, idc: str, sn: str) -> str:
        """A machine's BMC record (driver, address, user; never the
        password: see :meth:`bmc_secret`)."""
        return f"{self.prefix}/{idc}/machines/{sn}/bmc"

    def bmc_secret(self, idc: str, sn: str) -> str:
        """The BMC's password, outside the prefix so that no watch of the
        prefix (the control plane's, a node's IDC cache) ever holds it."""
        return f"{self.prefix}-secrets/bmc/{idc}/{sn}"

    def power_request(self, idc: str, sn: str, ident: str) -> str:
        """A power request for a machine and its result (:mod:`lpmos.power`)."""
        return f"{self.prefix}/{idc}/machines/{sn}/power/{ident}"

    def power_requests(self, idc: str, sn: str) -> str:
        return f"{self.prefix}/{idc}/machines/{sn}/power/"

    # -- parser
    def parse(self, key: str) -> ParsedKey | None:
        """What a key is, or ``None`` for a key outside the schema."""
        m = self._machine_re.fullmatch(key)
        if m:
            return ParsedKey(m.group(3), m.group(1), m.group(2))
        m = self._power_re.fullmatch(key)
        if m:
            return ParsedKey("power", m.group(1), f"{m.group(2)}/{m.group(3)}")
        m = self._node_image_re.fullmatch(key)
        if m:
            return ParsedKey("node_image", m.group(1), f"{m.group(2)}/{m.group(3)}")
        m = self._idc_re.fullmatch(key)
        if m:
            kind = {"servers": "server", "macs": "mac", "nodes": "node", "dhcp": "dhcp"}[m.group(2)]
            return ParsedKey(kind, m.group(1), m.group(3))
        if key.startswith(self.images()) and "/" not in key[len(self.images()):]:
            return ParsedKey("image", "", key[len(self.images()):])
        if key.startswith(self.audit_prefix()):
            return ParsedKey("audit", "", key[len(self.audit_prefix()):])
        return None
