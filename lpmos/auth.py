"""Users, roles and API tokens, stored in etcd.

* Roles are ordered: viewer < operator < approver < admin.
* Passwords are hashed with scrypt (stdlib ``hashlib.scrypt``) and a random
  salt; verification is constant-time.
* API tokens are 256-bit random strings shown once; etcd keeps only their
  SHA-256 (a fast hash is right for high-entropy secrets: there is nothing to
  brute-force).  The token record names its user; the role is read from the
  user at every check, so demoting a user demotes their tokens.
* Every write takes an optional ``audit`` builder whose record is committed
  in the same transaction (:mod:`lpmos.audit`); it is given public views
  only (no password hash, no token).
* A user's ``source`` says who vouches for them: ``local`` (a password hash
  here, or a token only) or ``ldap`` (the directory, :mod:`web.ldap`).  A
  directory user's record holds no password; it is written by
  :meth:`Auth.put_directory_user` at each sign-in and role re-check, and
  carries when the directory last answered (``checked_at``) and, when it
  refused, why (``refused``).  One name has one source: a directory sign-in
  never takes over a local user's name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from typing import Any, Protocol

from lpmos.models import ValidationError, now
from lpmos.store import Compare, Conflict, Delete, KeyValue, Op, Put, Store, range_all
from lpmos.store.keys import Keys

TOKEN_PREFIX = "lpm_"  # noqa: S105 (a prefix, not a secret)
_USER_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}")


class Role(IntEnum):
    VIEWER = 1
    OPERATOR = 2
    APPROVER = 3
    ADMIN = 4

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValidationError("role", "one of viewer, operator, approver, admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


def validate_username(name: str) -> str:
    if not isinstance(name, str) or not _USER_RE.fullmatch(name):
        raise ValidationError("user", "1-32 characters of a-z, 0-9, '.', '_', '-', "
                                      "starting with a letter")
    return name


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return "scrypt$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    salt = base64.b64decode(salt_b64)
    expected = base64.b64decode(digest_b64)
    got = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return hmac.compare_digest(got, expected)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class User:
    name: str
    role: str
    password_hash: str = ""
    created_at: float = 0.0
    disabled: bool = False
    source: str = "local"       # "local" or "ldap"
    directory_dn: str = ""      # ldap: the entry the directory matched
    checked_at: float = 0.0     # ldap: when the directory last answered for this user
    refused: str = ""           # ldap: why the directory's last answer refused access

    @property
    def level(self) -> Role:
        return Role.parse(self.role)

    def public(self) -> dict[str, object]:
        view: dict[str, object] = {"name": self.name, "role": self.role,
                                   "created_at": self.created_at, "disabled": self.disabled,
                                   "source": self.source}
        if self.source != "local":
            view.update(directory_dn=self.directory_dn, checked_at=self.checked_at,
                        refused=self.refused)
        return view


def _user(data: dict[str, Any]) -> User:
    """A stored user record (fields this version does not know are ignored)."""
    return User(**{k: v for k, v in data.items() if k in User.__dataclass_fields__})


@dataclass
class TokenRecord:
    id: str                 # first 12 hex digits of the digest, for listing and revoking
    user: str
    created_at: float
    label: str = ""
    last_used: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


class CacheReader(Protocol):
    """What :class:`Auth` needs of a watch cache (:class:`lpmos.store.cache.WatchCache`)."""

    @property
    def loaded(self) -> bool: ...

    def get(self, key: str) -> KeyValue | None: ...


class Auth:
    """Users and tokens.  Writes go to etcd; checks read the process's watch
    cache first when one is given (so an etcd outage does not lock operators
    out of reads), and etcd when the cache does not have the key (a token or
    user created a moment ago, before the watch delivered it).  A revoked
    token stops working as soon as the watch delivers the deletion
    (milliseconds), never later than that."""

    def __init__(self, store: Store, keys: Keys, *, cache: CacheReader | None = None) -> None:
        self.store = store
        self.keys = keys
        self.cache = cache

    def _read(self, key: str) -> KeyValue | None:
        if self.cache is not None and self.cache.loaded:
            kv = self.cache.get(key)
            if kv is not None:
                return kv
        return self.store.get(key)

    # -- users
    def get_user(self, name: str) -> User | None:
        kv = self._read(self.keys.user(name))
        if kv is None:
            return None
        return _user(json.loads(kv.value))

    def put_user(self, name: str, role: str, password: str | None = None, *,
                 audit: Callable[[User | None, User], Op] | None = None) -> User:
        """Create or update a user (role, and password when given).
        ``audit(before, after)`` gets the user the commit replaces (``None``
        for a new one) and the one it writes.  A directory user's role and
        password are the directory's: changing them here is refused."""
        validate_username(name)
        Role.parse(role)

        def build(before: User | None) -> User:
            if before is not None:
                if before.source != "local":
                    raise ValidationError("user", f"{name} is a directory ({before.source}) "
                                                  "user: the directory's groups give the role "
                                                  "and it checks the password")
                user = replace(before, role=role)
            else:
                user = User(name=name, role=role, created_at=now())
            if password is not None:
                user.password_hash = hash_password(password)
            return user

        return self._commit_user(self.keys.user(name), build, audit)

    def _commit_user(self, key: str, build: Callable[[User | None], User],
                     audit: Callable[[User | None, User], Op | None] | None) -> User:
        """Write ``build(the stored user or None)`` to ``key`` with its audit
        record (``None``: none) in one transaction, if the record is still
        the one read; read and build again on a conflict (10 tries)."""
        for _ in range(10):
            kv = self.store.get(key)
            before = _user(json.loads(kv.value)) if kv is not None else None
            user = build(before)
            ops: list[Op] = [Put(key, json.dumps(asdict(user)).encode())]
            record = audit(before, user) if audit is not None else None
            if record is not None:
                ops.append(record)
            try:
                self.store.commit([Compare(key, kv.mod_revision if kv else 0)], ops)
                return user
            except Conflict:
                continue
        raise Conflict(key, 0)

    def users(self) -> list[User]:
        return [_user(json.loads(kv.value)) for kv in range_all(self.store,
                                                                  self.keys.users()).items]

    def put_directory_user(self, name: str, *, role: str | None, dn: str, checked_at: float,
                           refused: str = "",
                           audit: Callable[[User | None, User], Op | None] | None = None
                           ) -> User:
        """Record the directory's answer for ``name``: its role (``None``:
        keep the stored one, for a refusal), the entry's DN, when it answered
        and, when it refused access, why.  Creates the record (``source``
        ``ldap``) when there is none and ``role`` is given; refuses (a
        :class:`ValidationError`) to touch a local user's record, or to
        create one for a refusal.  ``audit(before, after)`` may return
        ``None``: no record (nothing changed but the time of the check)."""
        validate_username(name)
        if role is not None:
            Role.parse(role)

        def build(before: User | None) -> User:
            if before is not None and before.source != "ldap":
                raise ValidationError("user", f"{name} is a {before.source} user, not a "
                                              "directory user")
            if before is None:
                if role is None:
                    raise ValidationError("role", f"no record of {name} to refuse")
                user = User(name=name, role=role, created_at=now(), source="ldap")
            else:
                user = replace(before, role=role or before.role)
            user.directory_dn, user.checked_at, user.refused = dn, checked_at, refused
            user.password_hash = ""
            return user

        return self._commit_user(self.keys.user(name), build, audit)

    def check_password(self, name: str, password: str) -> User | None:
        user = self.get_user(name)
        if user is None or user.disabled or not user.password_hash:
            # spend the same time as a real check so names cannot be probed
            verify_password(password, hash_password("x", salt=b"0" * 16))
            return None
        return user if verify_password(password, user.password_hash) else None

    # -- tokens
    def create_token(self, user: str, *, label: str = "",
                     audit: Callable[[TokenRecord], Op] | None = None
                     ) -> tuple[str, TokenRecord]:
        """A new token for ``user``: ``(token, record)``; only the record
        (id, user, label, no secret) is given to ``audit``."""
        if self.get_user(user) is None:
            raise ValidationError("user", f"no user named {user}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        record = TokenRecord(id=digest[:12], user=user, created_at=now(), label=label)
        ops: list[Op] = [Put(self.keys.api_token(digest), json.dumps(asdict(record)).encode())]
        if audit is not None:
            ops.append(audit(record))
        self.store.commit([Compare(self.keys.api_token(digest), 0)], ops)
        return token, record

    def tokens(self) -> list[TokenRecord]:
        return [TokenRecord(**json.loads(kv.value))
                for kv in range_all(self.store, self.keys.api_tokens()).items]

    def revoke_token(self, token_id: str, *,
                     audit: Callable[[list[TokenRecord]], Op] | None = None) -> int:
        """Revoke tokens whose id (digest prefix, at least 6 digits) matches,
        all in one transaction (with ``audit(revoked)``'s record), only if
        none of them changed since they were read (else :class:`Conflict`).
        Returns how many; 0 writes nothing."""
        if not re.fullmatch(r"[0-9a-f]{6,64}", token_id):
            raise ValidationError("id", "6-64 hex digits, as shown by `lpmos token list`")
        matches = [kv for kv in range_all(self.store, self.keys.api_tokens()).items
                   if kv.key.rsplit("/", 1)[1].startswith(token_id)]
        if not matches:
            return 0
        ops: list[Op] = [Delete(kv.key) for kv in matches]
        if audit is not None:
            ops.append(audit([TokenRecord(**json.loads(kv.value)) for kv in matches]))
        self.store.commit([Compare(kv.key, kv.mod_revision) for kv in matches], ops)
        return len(matches)

    def verify_token(self, token: str) -> User | None:
        """The active user owning ``token``, or ``None``."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        digest = token_digest(token)
        kv = self._read(self.keys.api_token(digest))
        if kv is None:
            return None
        # the lookup is by digest; compare again in constant time for form's sake
        if not hmac.compare_digest(kv.key.rsplit("/", 1)[1], digest):
            return None
        record = json.loads(kv.value)
        user = self.get_user(str(record.get("user", "")))
        if user is None or user.disabled:
            return None
        return user
