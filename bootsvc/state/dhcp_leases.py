"""Lab-mode ("full") DHCP: an address pool in memory, leases kept in etcd.

:class:`LeasePool` is the whole address logic, in memory and synchronous
(the DHCP loop calls it and answers at once; iPXE waits about 2 s and
nothing here may wait for etcd).  It hands out addresses of one range,
keeps offers for a short while, binds on REQUEST, renews, and handles
DECLINE (the address is quarantined) and RELEASE.  Every change to a
*bound* lease is reported to a sink; :class:`LeaseWriter` is the sink that
writes it behind to etcd at ``keys.dhcp_lease(idc, mac)``.

LeaseWriter contract: writes are coalesced per MAC (only the newest state
of a MAC is written), done on its own thread with the store's deadline,
retried with jittered back-off while etcd is down, and never block the
caller.  The pending set is bounded by the number of MACs with a lease.

Known limit: two nodes of one IDC in full mode on one network would hand
out the same addresses (leases are not claimed by CAS; lab mode is for a
single node).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

from lpmos.store import Store, StoreError, range_all
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)

MAX_POOL = 65536


@dataclass(slots=True)
class Lease:
    mac: str
    ip: str
    expires: float                      # unix time
    state: Literal["offered", "bound"] = "bound"
    hostname: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Lease:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("lease is not an object")
        return cls(str(data["mac"]), str(ipaddress.ip_address(data["ip"])),
                   float(data["expires"]), "bound", str(data.get("hostname", ""))[:64])


def parse_range(raw: object, *, family: int = 4) -> tuple[str, str] | None:
    """Setting parser: ``A-B`` (IPv4, or IPv6 with ``family=6``; A <= B, at
    most 65536 addresses) or empty."""
    if raw in (None, ""):
        return None
    text = str(raw).strip()
    first, sep, last = text.partition("-")
    kind = ipaddress.IPv6Address if family == 6 else ipaddress.IPv4Address
    example = "fd00::1:100-fd00::1:1ff" if family == 6 else "10.0.0.100-10.0.0.200"
    try:
        a = kind(first.strip())
        b = kind(last.strip())
    except ValueError:
        raise ValueError(f"an address range such as {example}") from None
    if not sep or int(b) < int(a) or int(b) - int(a) >= MAX_POOL:
        raise ValueError(f"an address range A-B with A <= B and at most {MAX_POOL} addresses")
    return str(a), str(b)


def parse_range6(raw: object) -> tuple[str, str] | None:
    return parse_range(raw, family=6)


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to a REQUEST: ``ack`` with the lease, ``nak`` or ``ignore``
    with a reason token."""

    action: Literal["ack", "nak", "ignore"]
    lease: Lease | None = None
    reason: str = ""


LeaseSink = Callable[[str, "Lease | None"], None]


class LeasePool:
    """Addresses ``first``..``last`` (IPv4, or IPv6 for DHCPv6 full mode,
    whose clients are keyed by DUID and IAID where DHCPv4's are by MAC: the
    ``mac`` fields hold that key); all methods are O(1) except finding a
    free address when the pool is nearly full (a scan, bounded by its size).
    Not thread-safe: the DHCP loop owns it."""

    def __init__(self, first: str, last: str, lease_time: int, *, offer_time: float = 30.0,
                 quarantine: float = 600.0, sink: LeaseSink | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        a, b = ipaddress.ip_address(first), ipaddress.ip_address(last)
        if a.version != b.version:
            raise ValueError("bad address range")
        self._addr: Callable[[int | str], ipaddress.IPv4Address | ipaddress.IPv6Address] = \
            ipaddress.IPv6Address if a.version == 6 else ipaddress.IPv4Address
        self.first = int(a)
        self.last = int(b)
        if self.last < self.first or self.last - self.first >= MAX_POOL:
            raise ValueError("bad address range")
        self.lease_time = lease_time
        self.offer_time = offer_time
        self.quarantine = quarantine
        self.sink = sink
        self.clock = clock
        self.by_mac: dict[str, Lease] = {}     # current or last lease of a MAC
        self.by_ip: dict[int, Lease] = {}
        self.declined: dict[int, float] = {}   # ip -> quarantined until
        self._cursor = self.first

    # -- helpers
    def __len__(self) -> int:
        return self.last - self.first + 1

    def in_range(self, ip: str) -> bool:
        try:
            n = int(self._addr(ip))
        except ValueError:
            return False
        return self.first <= n <= self.last

    def active(self) -> int:
        now = self.clock()
        return sum(1 for lease in self.by_ip.values() if lease.expires > now)

    def _free(self, n: int, mac: str, now: float) -> bool:
        until = self.declined.get(n)
        if until is not None:
            if until > now:
                return False
            del self.declined[n]
        holder = self.by_ip.get(n)
        return holder is None or holder.mac == mac or holder.expires <= now

    def _take(self, n: int, mac: str, state: Literal["offered", "bound"], ttl: float,
              hostname: str = "") -> Lease:
        now = self.clock()
        holder = self.by_ip.get(n)
        if holder is not None and holder.mac != mac:
            # an expired lease of another MAC: forget it (and its etcd key)
            if self.by_mac.get(holder.mac) is holder:
                del self.by_mac[holder.mac]
            if holder.state == "bound" and self.sink:
                self.sink(holder.mac, None)
        old = self.by_mac.get(mac)
        if old is not None and old.ip != str(self._addr(n)):
            if self.by_ip.get(int(self._addr(old.ip))) is old:
                del self.by_ip[int(self._addr(old.ip))]
        if state == "offered" and old is not None and old.state == "bound" \
                and old.expires > now and int(self._addr(old.ip)) == n:
            return old    # a DISCOVER from a bound client: offer its lease as it is
        lease = Lease(mac, str(self._addr(n)), now + ttl, state,
                      hostname or (old.hostname if old else ""))
        self.by_mac[mac] = lease
        self.by_ip[n] = lease
        if state == "bound" and self.sink:
            self.sink(mac, lease)
        return lease

    def _drop(self, lease: Lease) -> None:
        n = int(self._addr(lease.ip))
        if self.by_ip.get(n) is lease:
            del self.by_ip[n]
        if self.by_mac.get(lease.mac) is lease:
            del self.by_mac[lease.mac]
        if lease.state == "bound" and self.sink:
            self.sink(lease.mac, None)

    # -- protocol
    def offer(self, mac: str, requested: str | None = None) -> Lease | None:
        """An address for a DISCOVER: the MAC's current or previous address,
        else the requested one, else the next free one; ``None`` when the
        pool is exhausted."""
        now = self.clock()
        old = self.by_mac.get(mac)
        candidates: list[int] = []
        if old is not None:
            candidates.append(int(self._addr(old.ip)))
        if requested and self.in_range(requested):
            candidates.append(int(self._addr(requested)))
        for n in candidates:
            if self.first <= n <= self.last and self._free(n, mac, now):
                return self._take(n, mac, "offered", self.offer_time)
        size = len(self)
        n = self._cursor
        for _ in range(size):
            if self._free(n, mac, now):
                self._cursor = n + 1 if n < self.last else self.first
                return self._take(n, mac, "offered", self.offer_time)
            n = n + 1 if n < self.last else self.first
        return None

    def request(self, mac: str, *, requested: str | None, ciaddr: str, server_id: str | None,
                our_id: str, hostname: str = "") -> Grant:
        """RFC 2131 4.3.2: SELECTING (server id given), INIT-REBOOT
        (requested, no server id) and RENEWING/REBINDING (ciaddr)."""
        now = self.clock()
        current = self.by_mac.get(mac)
        if server_id is not None and server_id != our_id:
            # the client chose another server's offer: withdraw ours
            if current is not None and current.state == "offered":
                self._drop(current)
            return Grant("ignore", reason="other_server")
        ip = requested or (ciaddr if ciaddr != "0.0.0.0" else None)
        if ip is None:
            return Grant("ignore", reason="no_address")
        if not self.in_range(ip):
            return Grant("nak", reason="wrong_address")
        n = int(self._addr(ip))
        if server_id is not None:
            if current is None or current.ip != ip:
                return Grant("nak", reason="not_offered")
        elif current is not None and current.ip != ip and current.expires > now:
            return Grant("nak", reason="wrong_address")
        if not self._free(n, mac, now):
            return Grant("nak", reason="address_in_use")
        return Grant("ack", self._take(n, mac, "bound", self.lease_time, hostname))

    def decline(self, mac: str, ip: str | None) -> bool:
        """The client found ``ip`` in use: quarantine it, drop the lease."""
        current = self.by_mac.get(mac)
        if current is None or ip is None or current.ip != ip:
            return False
        self.declined[int(self._addr(ip))] = self.clock() + self.quarantine
        self._drop(current)
        return True

    def release(self, mac: str, ip: str) -> bool:
        current = self.by_mac.get(mac)
        if current is None or current.ip != ip:
            return False
        self._drop(current)
        return True

    def lease_of(self, mac: str) -> Lease | None:
        lease = self.by_mac.get(mac)
        if lease is not None and lease.expires > self.clock():
            return lease
        return None

    def adopt(self, leases: list[Lease]) -> int:
        """Merge leases read from etcd: a lease is taken when neither its
        MAC nor its address is already used in memory.  Returns how many."""
        taken = 0
        now = self.clock()
        for lease in sorted(leases, key=lambda x: -x.expires):
            if lease.expires <= now or not self.in_range(lease.ip):
                continue
            n = int(self._addr(lease.ip))
            if lease.mac in self.by_mac or n in self.by_ip:
                continue
            self.by_mac[lease.mac] = lease
            self.by_ip[n] = lease
            taken += 1
        return taken


class LeaseWriter:
    """Writes lease changes behind to etcd on its own thread (see module doc).

    Also loads the stored leases once at start (within the store deadline,
    retried in the background until it succeeds); ``on_loaded`` receives them
    on the writer thread, so the owner must hand them to its loop.
    """

    def __init__(self, store: Store, keys: Keys, idc: str,
                 on_loaded: Callable[[list[Lease]], None] | None = None,
                 backoff_max: float = 5.0, *, family: int = 4) -> None:
        self.store = store
        self.keys = keys
        self.idc = idc
        self.family = family
        self.on_loaded = on_loaded
        self.backoff_max = backoff_max
        self._pending: dict[str, Lease | None] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.failures = 0
        self.loaded = threading.Event()

    def __call__(self, mac: str, lease: Lease | None) -> None:
        """Queue the newest state of ``mac`` (``None``: delete).  Never blocks
        for long: only a lock around a dict update."""
        with self._cond:
            self._pending[mac] = lease
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dhcp-leases", daemon=True)
        self._thread.start()

    def stop(self, flush_timeout: float = 2.0) -> None:
        """Stop after trying to flush pending writes for ``flush_timeout`` s."""
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            while self._pending and time.monotonic() < deadline and self._thread is not None \
                    and self._thread.is_alive():
                self._cond.wait(0.05)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=flush_timeout + 1)

    def load(self) -> list[Lease]:
        prefix = self.keys.dhcp6_leases(self.idc) if self.family == 6 else \
            self.keys.dhcp_leases(self.idc)
        page = range_all(self.store, prefix)
        leases = []
        for kv in page.items:
            try:
                leases.append(Lease.from_json(kv.value))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed lease %s: %s", kv.key, exc)
        return leases

    def _run(self) -> None:
        backoff = 0.1
        while not self.loaded.is_set():
            try:
                leases = self.load()
            except StoreError as exc:
                log.warning("dhcp leases: cannot load from etcd (%s); retrying", exc)
                if self._wait(backoff):
                    return
                backoff = min(self.backoff_max, backoff * 2)
                continue
            self.loaded.set()
            if self.on_loaded is not None:
                try:
                    self.on_loaded(leases)
                except Exception:
                    log.exception("dhcp leases: on_loaded failed")
        backoff = 0.1
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop and not self._pending:
                    return
                mac, lease = next(iter(self._pending.items()))
                del self._pending[mac]
            try:
                key = self.keys.dhcp6_lease(self.idc, mac) if self.family == 6 else \
                    self.keys.dhcp_lease(self.idc, mac)
                if lease is None:
                    self.store.delete(key)
                else:
                    self.store.put(key, lease.to_json())
                self.writes += 1
                backoff = 0.1
            except StoreError as exc:
                self.failures += 1
                with self._cond:
                    self._pending.setdefault(mac, lease)   # unless a newer state came
                    stop = self._stop
                if stop:
                    return
                log.warning("dhcp leases: etcd write failed (%s); retrying", exc)
                if self._wait(backoff):
                    return
                backoff = min(self.backoff_max, backoff * 2)
            with self._cond:
                self._cond.notify_all()

    def _wait(self, seconds: float) -> bool:
        """Sleep with jitter; ``True`` if stopped meanwhile."""
        with self._cond:
            if self._stop:
                return True
            self._cond.wait(seconds * random.uniform(0.5, 1.0))
            return self._stop
