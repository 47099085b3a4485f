"""LDAP sign-in: the directory client (ldap3) and the policy that turns its
answers into roles.

Three parts, from the bottom:

* **Pure parts**: the settings' parsers, :func:`build_filter` (every value
  put into a filter is escaped with ``escape_filter_chars``, RFC 4515, so a
  login name cannot change the filter's shape), :func:`normalize_dn`,
  :class:`GroupRoles` (group DN -> role, the highest wins) and the
  re-check arithmetic (:func:`recheck_due`, :func:`within_grace`).
* :class:`Directory`, the client.  Every call is bounded: a connect and a
  receive timeout on each socket (``web.ldap_timeout``), a deadline on the
  whole sign-in, at most :data:`MAX_CONCURRENT` calls at once, and after a
  failure the directory is not asked again for a short, jittered while
  (:attr:`Directory.retry_after`): a directory that hangs costs one
  timeout, not one per request.  TLS is StartTLS (``ldap://``) or
  ``ldaps://``, the server certificate always verified (CA file, else the
  system's CAs) and its name checked; a plain-text connection needs
  ``web.ldap_insecure_plaintext``.  An empty password is refused before
  any bind: a simple bind with a name and no password is an
  "unauthenticated bind" that many directories answer with success.
* :class:`DirectoryAccess`, the policy over :class:`lpmos.auth.Auth`:
  sign-in (the user record in etcd gets ``source`` ``ldap``, the role, the
  time of the check; every success and failure is audited, never the
  password) and the role re-check of a directory user's session or API
  token at most every ``web.ldap_recheck`` seconds.  When the directory
  cannot be reached at a re-check, the last confirmed role is kept for
  reads for ``web.ldap_offline_grace`` seconds past the deadline; changes
  are refused (fail closed) until the directory answers again.  See
  ``docs/ldap.md``.

ldap3 is imported where it is used, so reading the settings table (every
``lpmos`` command's ``--help``) does not import it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from lpmos.audit import Auditor
from lpmos.auth import Auth, Role, User
from lpmos.config import ConfigError
from lpmos.models import ValidationError
from lpmos.store import Op, StoreError
from lpmos.store.keys import Keys

if TYPE_CHECKING:
    from ldap3 import Connection, Server

log = logging.getLogger(__name__)

#: directory calls in flight at once; more wait up to the timeout, then 503
MAX_CONCURRENT = 16
#: groups read per user (group search size limit, memberOf values)
MAX_GROUPS = 1000
#: users whose last directory answer this process remembers
MEMO_SIZE = 10000
ROLE_NAMES = tuple(r.label for r in Role)


# -- errors -----------------------------------------------------------------------


class DirectoryError(Exception):
    """Base of the directory's refusals and failures; ``str()`` is one line."""


class DirectoryUnavailable(DirectoryError):
    """The directory did not answer in time, refused the connection or TLS,
    or answered an error that is not the user's fault (HTTP 503)."""


class InvalidCredentials(DirectoryError):
    """Wrong name or password (one answer for both, so names cannot be
    probed); ``reason`` says which, for the audit record and the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Refused(DirectoryError):
    """The directory knows the user but grants no LPMOS role (in no mapped
    group, or no longer in the directory)."""


# -- pure parts: settings parsers, filters, DNs, roles --------------------------------


def parse_ldap_url(raw: Any) -> str:
    """``""`` (LDAP off) or ``ldap://HOST[:PORT]`` / ``ldaps://HOST[:PORT]``."""
    text = "" if raw is None else str(raw).strip()
    if not text:
        return ""
    parts = urlsplit(text)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query or parts.username:
        raise ValueError("ldap://HOST[:PORT] or ldaps://HOST[:PORT] (no path, no user)")
    try:
        parts.port  # noqa: B018 (validates it)
    except ValueError:
        raise ValueError("ldap://HOST[:PORT] with a port from 1 to 65535") from None
    return f"{parts.scheme}://{parts.netloc}"


def normalize_dn(dn: str) -> str:
    """``dn`` in one spelling for comparison: components stripped of the
    spaces around them, attribute types and values lower-cased (group and
    user DNs compare case-insensitively in practice: cn, ou, dc, uid).
    Raises ``ValueError`` for something that is not a DN."""
    from ldap3.core.exceptions import LDAPInvalidDnError
    from ldap3.utils.dn import parse_dn, to_dn

    if not isinstance(dn, str) or not dn.strip():
        raise ValueError("an empty DN")
    try:
        joined = ",".join(part.strip() for part in to_dn(dn.strip()))
        parsed = parse_dn(joined)
    except (LDAPInvalidDnError, ValueError, IndexError) as exc:
        raise ValueError(f"not a DN: {dn!r} ({exc})") from None
    return ",".join(f"{attr.strip().lower()}={value.strip().lower()}"
                    for attr, value, _sep in parsed)


def parse_dn_list(raw: Any) -> list[str]:
    """A list of DNs: a TOML list of strings, or one string with the DNs
    separated by ``;`` (a DN holds commas).  Each is normalized."""
    if raw is None or raw == "":
        return []
    if isinstance(raw, list | tuple):
        items = [str(x) for x in raw]
    elif isinstance(raw, str):
        items = raw.split(";")
    else:
        raise ValueError("DNs separated by ';' (or a TOML list of strings)")
    out: list[str] = []
    for item in items:
        if item.strip():
            dn = normalize_dn(item)
            if dn not in out:
                out.append(dn)
    return out


def parse_optional_dn(raw: Any) -> str:
    """``""`` or one DN (kept as written: it is sent to the directory)."""
    text = "" if raw is None else str(raw).strip()
    if text:
        normalize_dn(text)
    return text


def filter_template(*placeholders: str, required: tuple[str, ...]) -> Callable[[Any], str]:
    """A parser of a filter template: a parenthesized filter holding at
    least one of ``required`` (``{user}``...) and no placeholder but
    ``placeholders``."""
    names = " or ".join("{" + n + "}" for n in required)

    def parse(raw: Any) -> str:
        text = str(raw).strip()
        if not (text.startswith("(") and text.endswith(")")) or \
                text.count("(") != text.count(")"):
            raise ValueError("an LDAP filter in parentheses, such as (uid={user})")
        if not any("{" + n + "}" in text for n in required):
            raise ValueError(f"a filter holding {names}")
        rest = text
        for name in placeholders:
            rest = rest.replace("{" + name + "}", "")
        if "{" in rest or "}" in rest:
            allowed = ", ".join("{" + n + "}" for n in placeholders)
            raise ValueError(f"a filter whose only placeholders are {allowed}")
        return text

    return parse


def build_filter(template: str, **values: str) -> str:
    """``template`` with each ``{name}`` replaced by ``values[name]``
    escaped for a filter (RFC 4515: ``\\ * ( ) NUL``), so no value can open
    or close a filter component or become a wildcard."""
    from ldap3.utils.conv import escape_filter_chars

    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", escape_filter_chars(value))
    return out


@dataclass(frozen=True)
class GroupRoles:
    """Group DN (normalized) -> role.  A user's role is the highest role of
    their mapped groups; groups not in the map give nothing."""

    groups: Mapping[str, Role]

    @classmethod
    def from_lists(cls, lists: Mapping[Role, Iterable[str]]) -> GroupRoles:
        mapping: dict[str, Role] = {}
        for role, dns in lists.items():
            for dn in dns:
                key = normalize_dn(dn)
                mapping[key] = max(role, mapping.get(key, role))
        return cls(mapping)

    def decide_role(self, groups: Iterable[str]) -> Role | None:
        """The highest role of ``groups`` (normalized DNs), ``None`` when
        none is mapped."""
        found = [self.groups[g] for g in groups if g in self.groups]
        return max(found) if found else None

    def matched(self, groups: Iterable[str]) -> list[str]:
        return sorted(g for g in groups if g in self.groups)


def recheck_due(checked_at: float, now: float, interval: float) -> bool:
    """Whether the directory must be asked again: the last answer is older
    than ``interval``, or stamped in the future by more than that (a clock
    that jumped must not stretch a confirmation)."""
    return not (now - interval < checked_at <= now + interval)


def within_grace(checked_at: float, now: float, interval: float, grace: float) -> bool:
    """Whether a confirmation from ``checked_at`` may still serve reads
    while the directory cannot be reached: up to ``grace`` seconds past its
    re-check deadline."""
    return checked_at <= now + interval and now < checked_at + interval + grace


# -- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class LdapSettings:
    """The ``web.ldap_*`` settings, checked together."""

    url: str
    start_tls: bool
    insecure_plaintext: bool
    ca_file: Path | None
    bind_dn: str
    bind_password: str = field(repr=False)
    user_base: str
    user_filter: str
    group_base: str
    group_filter: str
    member_of_attribute: str
    roles: GroupRoles
    timeout: float
    recheck: float
    offline_grace: float

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (636 if parts.scheme == "ldaps" else 389)

    @property
    def use_ssl(self) -> bool:
        return self.url.startswith("ldaps://")

    @property
    def encrypted(self) -> bool:
        return self.use_ssl or self.start_tls

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> LdapSettings | None:
        """The settings from resolved ``web.*`` values; ``None`` when
        ``web.ldap_url`` is empty (LDAP off).  Raises :class:`ConfigError`
        for a combination that cannot work or would be unsafe, and reads
        the bind password file here (once, at start)."""
        url = parse_ldap_url(values.get("web.ldap_url", ""))
        if not url:
            return None
        start_tls = bool(values.get("web.ldap_start_tls", True)) and url.startswith("ldap://")
        insecure = bool(values.get("web.ldap_insecure_plaintext", False))
        if not url.startswith("ldaps://") and not start_tls and not insecure:
            raise ConfigError(
                "web.ldap_url is ldap:// and web.ldap_start_tls is off: passwords would cross "
                "the network in clear text; turn StartTLS on, use ldaps://, or set "
                "web.ldap_insecure_plaintext = true (never in production)")
        ca_file = values.get("web.ldap_ca_file")
        if ca_file is not None:
            ca_file = Path(ca_file)
            if not ca_file.is_file():
                raise ConfigError(f"web.ldap_ca_file: {ca_file} is not a readable file")
        bind_dn = parse_optional_dn(values.get("web.ldap_bind_dn", ""))
        password = ""
        password_file = values.get("web.ldap_bind_password_file")
        if bind_dn and password_file is None:
            raise ConfigError("web.ldap_bind_dn needs web.ldap_bind_password_file (the "
                              "password is read from a file, never given on the command line)")
        if password_file is not None:
            if not bind_dn:
                raise ConfigError("web.ldap_bind_password_file is set but web.ldap_bind_dn "
                                  "is not")
            try:
                password = Path(password_file).read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"web.ldap_bind_password_file: {password_file}: "
                                  f"{exc.strerror}") from None
            if not password:
                raise ConfigError(f"web.ldap_bind_password_file: {password_file} is empty "
                                  "(an empty password is an unauthenticated bind)")
        user_base = parse_optional_dn(values.get("web.ldap_user_base", ""))
        if not user_base:
            raise ConfigError("web.ldap_user_base is required with web.ldap_url (the subtree "
                              "searched for the signing-in user)")
        group_base = parse_optional_dn(values.get("web.ldap_group_base", ""))
        member_of = str(values.get("web.ldap_member_of_attribute", "") or "").strip()
        if not group_base and not member_of:
            raise ConfigError("LDAP needs a way to find a user's groups: web.ldap_group_base "
                              "(a group search) or web.ldap_member_of_attribute (memberOf)")
        lists = {role: parse_dn_list(values.get(f"web.ldap_{role.label}_groups", []))
                 for role in Role}
        roles = GroupRoles.from_lists(lists)
        if not roles.groups:
            raise ConfigError("no directory group is mapped to a role: set "
                              "web.ldap_viewer_groups ... web.ldap_admin_groups")
        return cls(
            url=url, start_tls=start_tls, insecure_plaintext=insecure, ca_file=ca_file,
            bind_dn=bind_dn, bind_password=password, user_base=user_base,
            user_filter=str(values.get("web.ldap_user_filter", "(uid={user})")),
            group_base=group_base,
            group_filter=str(values.get("web.ldap_group_filter", "(member={dn})")),
            member_of_attribute=member_of, roles=roles,
            timeout=float(values.get("web.ldap_timeout", 5.0)),
            recheck=float(values.get("web.ldap_recheck", 300.0)),
            offline_grace=float(values.get("web.ldap_offline_grace", 3600.0)))


# -- the client -------------------------------------------------------------------


@dataclass(frozen=True)
class _Deadline:
    at: float
    budget: float


@dataclass(frozen=True)
class DirectoryUser:
    """What the directory says about a login name."""

    name: str
    dn: str
    groups: frozenset[str]      # normalized DNs


class Directory:
    """The LDAP client.  Thread-safe: each call opens its own connection
    (no pool to go stale behind a load balancer); see the module docstring
    for its bounds."""

    def __init__(self, settings: LdapSettings, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self._slots = threading.BoundedSemaphore(MAX_CONCURRENT)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down_reason = ""
        #: seconds the directory is left alone after a failure (jittered)
        self.retry_after = min(30.0, max(1.0, 2 * settings.timeout))

    # -- public calls
    def authenticate(self, name: str, password: str) -> DirectoryUser:
        """The directory's entry for ``name`` if ``password`` is its
        password: finds the entry (service or anonymous bind), binds as it,
        reads its groups.  Raises :class:`InvalidCredentials` (unknown name,
        wrong or empty password) or :class:`DirectoryUnavailable`."""
        if not isinstance(password, str) or not password:
            # never bind with an empty password: that is an unauthenticated
            # bind (RFC 4513 5.1.2), which many directories accept as success
            raise InvalidCredentials("empty password")
        deadline = self._deadline(3)
        with self._call():
            conn = self._open(self.settings.bind_dn, self.settings.bind_password, deadline)
            try:
                dn, member_of = self._find_user(conn, name)
                if dn is None:
                    raise InvalidCredentials("unknown user")
                user_conn = self._connect(deadline, dn, password)
                try:
                    if not self._bind(user_conn, dn):
                        raise InvalidCredentials("wrong password")
                finally:
                    _unbind(user_conn)
                self._check_deadline(deadline)
                groups = self._groups(conn, name, dn, member_of)
            finally:
                _unbind(conn)
        return DirectoryUser(name, dn, groups)

    def lookup(self, name: str) -> DirectoryUser | None:
        """The directory's entry for ``name`` and its groups (no password:
        the role re-check of a session or a token), ``None`` when the name
        is no longer there."""
        deadline = self._deadline(2)
        with self._call():
            conn = self._open(self.settings.bind_dn, self.settings.bind_password, deadline)
            try:
                try:
                    dn, member_of = self._find_user(conn, name)
                except InvalidCredentials:
                    return None          # ambiguous: grants nothing
                if dn is None:
                    return None
                self._check_deadline(deadline)
                return DirectoryUser(name, dn, self._groups(conn, name, dn, member_of))
            finally:
                _unbind(conn)

    # -- bounds
    def _deadline(self, timeouts: int) -> _Deadline:
        budget = timeouts * self.settings.timeout
        return _Deadline(self.clock() + budget, budget)

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """One of :data:`MAX_CONCURRENT` slots, unless the directory failed
        a moment ago (then at once :class:`DirectoryUnavailable`)."""
        now = self.clock()
        with self._lock:
            if now < self._down_until:
                raise DirectoryUnavailable(
                    f"{self._down_reason}; the directory is asked again in "
                    f"{max(1.0, self._down_until - now):.0f} s")
        if not self._slots.acquire(timeout=self.settings.timeout):
            raise DirectoryUnavailable(f"{MAX_CONCURRENT} directory calls are already in "
                                       f"flight; none finished within "
                                       f"{self.settings.timeout:g} s")
        try:
            yield
        finally:
            self._slots.release()

    def _failed(self, reason: str) -> None:
        with self._lock:
            self._down_until = self.clock() + self.retry_after * random.uniform(0.8, 1.2)
            self._down_reason = reason

    def _check_deadline(self, deadline: _Deadline) -> None:
        if self.clock() > deadline.at:
            raise self._unavailable(None, f"the directory {self.settings.url} is too slow: "
                                          f"no answer within {deadline.budget:g} s in all")

    # -- connections
    def _server(self) -> Server:
        from ldap3 import NONE, Server, Tls

        s = self.settings
        tls = None
        if s.encrypted:
            tls = Tls(validate=ssl.CERT_REQUIRED,
                      ca_certs_file=str(s.ca_file) if s.ca_file else None,
                      sni=s.host)
        return Server(s.host, port=s.port, use_ssl=s.use_ssl, tls=tls, get_info=NONE,
                      connect_timeout=s.timeout)

    def _connect(self, deadline: _Deadline, user: str | None = None,
                 password: str | None = None) -> Connection:
        """An open connection, StartTLS done when configured, not bound."""
        from ldap3 import SIMPLE, SYNC, Connection

        self._check_deadline(deadline)
        conn: Connection | None = None
        try:
            conn = Connection(self._server(), user=user, password=password,
                              authentication=SIMPLE if user else None, auto_bind=False,
                              client_strategy=SYNC, auto_referrals=False, read_only=True,
                              raise_exceptions=False,
                              # whole seconds: ldap3 packs it into SO_RCVTIMEO as an integer
                              receive_timeout=math.ceil(self.settings.timeout),
                              check_names=False)
            conn.open()
            if self.settings.start_tls:
                conn.start_tls()
        except Exception as exc:   # ldap3 also raises struct.error, ValueError ...
            if conn is not None:
                _unbind(conn)
            raise self._unavailable(exc) from None
        return conn

    def _open(self, dn: str, password: str, deadline: _Deadline) -> Connection:
        """A connection bound as the service account (anonymous when none)."""
        conn = self._connect(deadline, dn or None, password or None)
        if not self._bind(conn, dn):
            _unbind(conn)
            raise self._unavailable(None, "the directory refused the service bind as "
                                          f"{dn or 'anonymous'}: {_result(conn)}")
        return conn

    def _bind(self, conn: Connection, dn: str) -> bool:
        """Bind ``conn`` (as ``dn``, its user); ``False`` when the directory
        said invalidCredentials."""
        try:
            ok = bool(conn.bind())
        except Exception as exc:   # ldap3 also raises struct.error, ValueError ...
            raise self._unavailable(exc) from None
        if ok:
            return True
        code = int(conn.result.get("result", -1)) if conn.result else -1
        if code == 49:                          # invalidCredentials
            return False
        if code == 13:                          # confidentialityRequired
            raise self._unavailable(None, "the directory requires TLS for binds "
                                          f"(confidentialityRequired): {_result(conn)}")
        raise self._unavailable(None, f"the bind as {dn or 'anonymous'} failed: "
                                      f"{_result(conn)}")

    def _search(self, conn: Connection, base: str, flt: str, attributes: list[str],
                size_limit: int) -> list[dict[str, Any]]:
        from ldap3 import SUBTREE
        try:
            conn.search(base, flt, search_scope=SUBTREE, attributes=attributes or None,
                        size_limit=size_limit,
                        time_limit=math.ceil(self.settings.timeout))
        except Exception as exc:   # ldap3 also raises struct.error, ValueError ...
            raise self._unavailable(exc) from None
        code = int(conn.result.get("result", -1)) if conn.result else -1
        if code not in (0, 4):                  # success, sizeLimitExceeded
            if code == 32:
                raise self._unavailable(None, f"the search base {base} does not exist "
                                              "(noSuchObject)")
            raise self._unavailable(None, f"search failed: {_result(conn)}")
        entries = [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]
        if code == 4:
            log.warning("LDAP search under %s hit the size limit of %d; using what came",
                        base, size_limit)
        return entries

    def _find_user(self, conn: Connection, name: str) -> tuple[str | None, list[str]]:
        """The user's DN and memberOf values (``None``: no such user).
        Several entries for one name are refused (InvalidCredentials): the
        user filter is too wide."""
        s = self.settings
        attrs = [s.member_of_attribute] if s.member_of_attribute else []
        entries = self._search(conn, s.user_base, build_filter(s.user_filter, user=name),
                               attrs, 2)
        if not entries:
            return None, []
        if len(entries) > 1:
            log.warning("LDAP user filter %s matches more than one entry for %s; refused",
                        s.user_filter, name)
            raise InvalidCredentials("the user filter matches more than one entry")
        entry = entries[0]
        values: list[str] = []
        if s.member_of_attribute:
            raw = (entry.get("attributes") or {}).get(s.member_of_attribute) or []
            values = [str(v) for v in (raw if isinstance(raw, list) else [raw])][:MAX_GROUPS]
        return str(entry["dn"]), values

    def _groups(self, conn: Connection, name: str, dn: str,
                member_of: list[str]) -> frozenset[str]:
        s = self.settings
        found = list(member_of)
        if s.group_base:
            entries = self._search(conn, s.group_base,
                                   build_filter(s.group_filter, dn=dn, user=name), [],
                                   MAX_GROUPS)
            found += [str(e["dn"]) for e in entries]
        groups = set()
        for group in found:
            try:
                groups.add(normalize_dn(group))
            except ValueError:
                continue
        return frozenset(groups)

    def _unavailable(self, exc: BaseException | None, text: str = "") -> DirectoryUnavailable:
        if not text:
            text = _describe(exc, self.settings)
        self._failed(text[:120])
        return DirectoryUnavailable(text)


def _result(conn: Connection) -> str:
    r = conn.result or {}
    message = str(r.get("message") or "").strip()
    text = f"{r.get('description', 'no answer')}" + (f" ({message})" if message else "")
    return text[:200]


def _describe(exc: BaseException | None, s: LdapSettings) -> str:
    """One line for an ldap3 or socket failure, naming the directory."""
    full = " ".join(str(exc).split()) if exc is not None else "no answer"
    low = full.lower()
    detail = full[:200]
    if "timed out" in low or "timeout" in low:
        return f"the directory {s.url} did not answer within {s.timeout:g} s"
    if "doesn't match any name" in low:     # ldap3's host name check; it prints the cert
        return (f"TLS with the directory {s.url} failed: its certificate is not issued for "
                f"{s.host}")
    if "certificate" in low or "ssl" in low or "tls" in low:
        return f"TLS with the directory {s.url} failed: {detail}"
    if "refused" in low:
        return f"the directory {s.url} refused the connection"
    return f"the directory {s.url} failed: {detail}"


def _unbind(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # noqa: S110 (closing a socket that may be dead already)
        pass


# -- the policy -------------------------------------------------------------------


@dataclass(frozen=True)
class RoleCheck:
    """A directory user's role for this request.  ``stale``: the directory
    could not be asked at the re-check deadline; the role is the last
    confirmed one, good for reads until ``grace_until`` (unix time), and
    changes are refused."""

    role: Role
    stale: bool = False
    checked_at: float = 0.0
    grace_until: float = 0.0
    why: str = ""


@dataclass
class _Answer:
    checked_at: float
    role: Role | None
    refused: str
    dn: str


class DirectoryClient(Protocol):
    """What :class:`DirectoryAccess` asks of a directory (:class:`Directory`,
    or a test's double)."""

    def authenticate(self, name: str, password: str) -> DirectoryUser: ...

    def lookup(self, name: str) -> DirectoryUser | None: ...


class DirectoryAccess:
    """Sign-in and role re-checks of directory users, over the user
    records of :class:`Auth` (see the module docstring for the policy).
    ``clock`` is wall time: records are compared across replicas."""

    def __init__(self, directory: DirectoryClient, settings: LdapSettings, auth: Auth,
                 keys: Keys, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.settings = settings
        self.auth = auth
        self.keys = keys
        self.clock = clock
        self._lock = threading.Lock()
        self._memo: OrderedDict[str, _Answer] = OrderedDict()
        self._inflight: dict[str, _Flight] = {}

    # -- sign-in
    def sign_in(self, name: str, password: str, *, source: str) -> User:
        """The directory user ``name`` with their mapped role, recorded in
        etcd with the audit record ``auth.ldap_login``.  Raises
        :class:`InvalidCredentials`, :class:`Refused`,
        :class:`DirectoryUnavailable` or a StoreError; each refusal is
        audited as ``auth.ldap_login_failed`` with its reason."""
        auditor = Auditor(self.keys, name, f"ldap sign-in {source}")
        try:
            found = self.directory.authenticate(name, password)
        except InvalidCredentials as exc:
            self._audit_failure(auditor, name, f"wrong password or unknown user ({exc.reason})"
                                if exc.reason != "empty password" else "empty password")
            raise
        except DirectoryUnavailable as exc:
            self._audit_failure(auditor, name, f"directory unavailable: {exc}")
            raise
        role = self.settings.roles.decide_role(found.groups)
        t = self.clock()
        if role is None:
            reason = f"{name} is in no directory group mapped to an LPMOS role"
            self._remember(name, _Answer(t, None, reason, found.dn))
            # a known directory user loses access at once (their record says
            # so, with the audit record); an unknown one gets no record
            if not self._record(name, None, found.dn, t, reason, auditor,
                                "auth.ldap_login_failed", always=True):
                self._audit_failure(auditor, name, reason)
            raise Refused(reason)
        matched = self.settings.roles.matched(found.groups)

        def audit(before: User | None, after: User) -> Op:
            return auditor.op("auth.ldap_login", name,
                              before=_summary(before) if before else None,
                              after=dict(_summary(after), groups=matched))

        user = self.auth.put_directory_user(name, role=role.label, dn=found.dn, checked_at=t,
                                            audit=audit)
        self._remember(name, _Answer(t, role, "", found.dn))
        return user

    def _audit_failure(self, auditor: Auditor, name: str, reason: str) -> None:
        try:
            self.auth.store.commit([], [auditor.op("auth.ldap_login_failed", name,
                                                   detail=reason)])
        except StoreError as exc:   # the refusal stands; the record is best effort
            log.warning("cannot audit the failed LDAP sign-in of %s: %s", name, exc)

    # -- re-check
    def role_of(self, user: User) -> RoleCheck:
        """The role of directory user ``user`` (their stored record) for
        this request: the stored answer while it is younger than
        ``web.ldap_recheck``, else the directory's answer now (one lookup
        per user at a time; others wait for it).  Raises :class:`Refused`
        when the directory refused (now or at the last check), and
        :class:`DirectoryUnavailable` when it cannot be asked and the last
        confirmation is past its grace."""
        s = self.settings
        now = self.clock()
        last = self._newest(user)
        if not recheck_due(last.checked_at, now, s.recheck):
            if last.refused:
                raise Refused(last.refused)
            assert last.role is not None
            return RoleCheck(last.role, checked_at=last.checked_at)
        try:
            answer = self._single_flight(user.name, lambda: self._recheck(user))
        except DirectoryUnavailable as exc:
            if last.refused:
                raise Refused(last.refused) from None
            if last.role is not None and within_grace(last.checked_at, now, s.recheck,
                                                      s.offline_grace):
                return RoleCheck(last.role, stale=True, checked_at=last.checked_at,
                                 grace_until=last.checked_at + s.recheck + s.offline_grace,
                                 why=str(exc))
            raise DirectoryUnavailable(
                f"cannot re-check {user.name}'s directory groups ({exc}); the last check "
                f"was {_ago(now, last.checked_at)}, past the offline grace of "
                f"{s.offline_grace:g} s") from None
        if answer.refused:
            raise Refused(answer.refused)
        assert answer.role is not None
        return RoleCheck(answer.role, checked_at=answer.checked_at)

    def _recheck(self, user: User) -> _Answer:
        name = user.name
        found = self.directory.lookup(name)
        t = self.clock()
        if found is None:
            answer = _Answer(t, None, f"{name} is no longer in the directory", user.directory_dn)
        else:
            role = self.settings.roles.decide_role(found.groups)
            answer = _Answer(t, role, "" if role is not None else
                             f"{name} is no longer in a directory group mapped to an LPMOS "
                             "role", found.dn)
        self._remember(name, answer)
        auditor = Auditor(self.keys, name, "ldap re-check")
        try:
            self._record(name, answer.role, answer.dn, t, answer.refused, auditor,
                         "user.ldap_sync")
        except StoreError as exc:   # the answer holds in this process; the next check writes
            log.warning("cannot store the directory's answer for %s: %s", name, exc)
        return answer

    def _record(self, name: str, role: Role | None, dn: str, t: float, refused: str,
                auditor: Auditor, action: str, *, always: bool = False) -> bool:
        """Store the directory's answer (when a record exists, or the answer
        admits the user), with an audit record when it changes the role or
        the refusal (or ``always``).  Returns whether a record was written."""

        def audit(before: User | None, after: User) -> Op | None:
            if not always and before is not None and \
                    (before.role, before.refused) == (after.role, after.refused):
                return None
            return auditor.op(action, name, before=_summary(before) if before else None,
                              after=_summary(after), detail=refused)

        try:
            self.auth.put_directory_user(name, role=role.label if role else None, dn=dn,
                                         checked_at=t, refused=refused, audit=audit)
        except ValidationError:         # no record to refuse, or the name is a local user's
            return False
        return True

    # -- memo and coalescing
    def _newest(self, user: User) -> _Answer:
        stored = _Answer(user.checked_at, None if user.refused else _level(user), user.refused,
                         user.directory_dn)
        with self._lock:
            memo = self._memo.get(user.name)
        return memo if memo is not None and memo.checked_at > stored.checked_at else stored

    def _remember(self, name: str, answer: _Answer) -> None:
        with self._lock:
            self._memo[name] = answer
            self._memo.move_to_end(name)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)

    def _single_flight(self, name: str, fn: Callable[[], _Answer]) -> _Answer:
        """Run ``fn`` once for concurrent callers of one name; the others
        wait (bounded) and share its answer or its error."""
        with self._lock:
            flight = self._inflight.get(name)
            leader = flight is None
            if flight is None:
                flight = self._inflight[name] = _Flight()
        if not leader:
            if not flight.done.wait(4 * self.settings.timeout):
                raise DirectoryUnavailable("the directory re-check in flight did not finish")
            if flight.error is not None:
                raise flight.error
            assert flight.answer is not None
            return flight.answer
        try:
            flight.answer = fn()
            return flight.answer
        except Exception as exc:
            flight.error = exc
            raise
        finally:
            flight.done.set()
            with self._lock:
                self._inflight.pop(name, None)


@dataclass
class _Flight:
    done: threading.Event = field(default_factory=threading.Event)
    answer: _Answer | None = None
    error: Exception | None = None


def _level(user: User) -> Role | None:
    try:
        return user.level
    except ValidationError:
        return None


def _summary(user: User) -> dict[str, object]:
    return {"role": user.role, "source": user.source, "dn": user.directory_dn,
            "refused": user.refused}


def _ago(now: float, t: float) -> str:
    if t <= 0:
        return "never"
    return f"{now - t:.0f} s ago"
