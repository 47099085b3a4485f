"""The pure parts of LDAP sign-in (filters, DNs, the group -> role map, the
re-check arithmetic, the settings) and the sign-in / re-check policy of
:class:`web.ldap.DirectoryAccess` over an in-memory store, with a
directory double that can answer, refuse, or be down."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lpmos.auth import Auth, Role
from lpmos.config import ConfigError
from lpmos.models import ValidationError
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore
from web.ldap import (
    Directory,
    DirectoryAccess,
    DirectoryUnavailable,
    DirectoryUser,
    GroupRoles,
    InvalidCredentials,
    LdapSettings,
    Refused,
    build_filter,
    filter_template,
    normalize_dn,
    parse_dn_list,
    parse_ldap_url,
    recheck_due,
    within_grace,
)

ADMINS = "cn=admins,ou=groups,dc=example,dc=org"
OPS = "cn=ops,ou=groups,dc=example,dc=org"
VIEW = "cn=view,ou=groups,dc=example,dc=org"


# -- filters ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("alice", "(uid=alice)"),
    ("*)(uid=*", "(uid=\\2a\\29\\28uid=\\2a)"),
    ("*", "(uid=\\2a)"),
    ("a\\29", "(uid=a\\5c29)"),               # an escape typed in is escaped itself
    ("x\x00", "(uid=x\\00)"),
    ("alice)(|(objectClass=*", "(uid=alice\\29\\28|\\28objectClass=\\2a)"),
])
def test_build_filter_escapes_every_filter_metacharacter(name: str, expected: str) -> None:
    built = build_filter("(uid={user})", user=name)
    assert built == expected
    inner = built[1:-1]
    assert "(" not in inner and ")" not in inner and "*" not in inner


def test_build_filter_escapes_a_dn_too() -> None:
    assert build_filter("(&(member={dn})(cn=x))", dn="cn=a(b)*,dc=x") == \
        "(&(member=cn=a\\28b\\29\\2a,dc=x)(cn=x))"


@pytest.mark.parametrize("raw", ["uid={user}", "(uid={user}", "(uid=alice)",
                                 "(uid={user})({other})", "(uid={{user}})x)"])
def test_filter_templates_are_checked(raw: str) -> None:
    with pytest.raises(ValueError):
        filter_template("user", required=("user",))(raw)


def test_group_filter_template_takes_dn_or_user() -> None:
    parse = filter_template("dn", "user", required=("dn", "user"))
    assert parse(" (member={dn}) ") == "(member={dn})"
    assert parse("(memberUid={user})") == "(memberUid={user})"
    with pytest.raises(ValueError, match=r"\{dn\} or \{user\}"):
        parse("(objectClass=group)")


# -- DNs and URLs ---------------------------------------------------------------------


def test_normalize_dn_ignores_case_and_spaces_between_components() -> None:
    assert normalize_dn("CN=LPMOS Admins, OU=Groups,DC=Corp ,dc=example") == \
        "cn=lpmos admins,ou=groups,dc=corp,dc=example"
    assert normalize_dn("cn=a\\,b,dc=x") == "cn=a\\,b,dc=x"      # an escaped comma stays


@pytest.mark.parametrize("raw", ["", "  ", "not a dn", "cn=", "=x", "cn=a,,dc=x"])
def test_normalize_dn_refuses_what_is_not_a_dn(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_dn(raw)


def test_parse_dn_list_from_a_flag_or_a_toml_list() -> None:
    assert parse_dn_list(f"{ADMINS}; CN=Ops,ou=groups,dc=example,dc=org;") == [ADMINS, OPS]
    assert parse_dn_list([ADMINS, ADMINS.upper()]) == [ADMINS]
    assert parse_dn_list("") == [] and parse_dn_list([]) == []
    with pytest.raises(ValueError):
        parse_dn_list(f"{ADMINS};garbage")


@pytest.mark.parametrize(("raw", "expected"), [
    ("", ""), ("ldap://dir.example", "ldap://dir.example"),
    ("ldaps://dir.example:636/", "ldaps://dir.example:636"),
    ("ldap://[::1]:3389", "ldap://[::1]:3389"),
])
def test_ldap_urls(raw: str, expected: str) -> None:
    assert parse_ldap_url(raw) == expected


@pytest.mark.parametrize("raw", ["http://dir.example", "dir.example", "ldap://",
                                 "ldap://dir.example/dc=x", "ldap://u:p@dir.example",
                                 "ldap://dir.example:99999"])
def test_bad_ldap_urls(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_ldap_url(raw)


# -- groups -> role -------------------------------------------------------------------


def test_the_highest_mapped_role_wins_and_unmapped_groups_give_nothing() -> None:
    roles = GroupRoles.from_lists({Role.VIEWER: [VIEW], Role.OPERATOR: [OPS],
                                   Role.ADMIN: [ADMINS.upper()]})
    table = [
        ([VIEW], Role.VIEWER),
        ([VIEW, OPS], Role.OPERATOR),
        ([OPS, ADMINS, VIEW], Role.ADMIN),
        (["cn=other,dc=example,dc=org"], None),
        ([], None),
    ]
    for groups, role in table:
        assert roles.decide_role(groups) == role, groups
    assert roles.matched([OPS, "cn=other,dc=x"]) == [OPS]


def test_a_group_listed_for_two_roles_gives_the_higher() -> None:
    roles = GroupRoles.from_lists({Role.ADMIN: [OPS], Role.VIEWER: [OPS]})
    assert roles.decide_role([OPS]) == Role.ADMIN


# -- re-check arithmetic --------------------------------------------------------------


@pytest.mark.parametrize(("checked_at", "now", "due"), [
    (1000.0, 1000.0, False), (1000.0, 1299.0, False), (1000.0, 1300.0, True),
    (0.0, 1000.0, True),                 # never checked
    (2000.0, 1000.0, True),              # stamped far in the future: a clock jumped
    (1100.0, 1000.0, False),             # a little ahead (another replica's clock)
])
def test_recheck_due(checked_at: float, now: float, due: bool) -> None:
    assert recheck_due(checked_at, now, 300.0) is due


@pytest.mark.parametrize(("checked_at", "now", "ok"), [
    (1000.0, 1300.0, True), (1000.0, 1000.0 + 300 + 3599, True),
    (1000.0, 1000.0 + 300 + 3600, False), (0.0, 5000.0, False), (9000.0, 1000.0, False),
])
def test_within_grace(checked_at: float, now: float, ok: bool) -> None:
    assert within_grace(checked_at, now, 300.0, 3600.0) is ok


# -- settings -------------------------------------------------------------------------


def base_values(tmp_path: Path, **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "web.ldap_url": "ldap://dir.example", "web.ldap_user_base": "ou=people,dc=example",
        "web.ldap_group_base": "ou=groups,dc=example", "web.ldap_admin_groups": [ADMINS],
    }
    values.update(over)
    return values


def test_ldap_is_off_without_a_url(tmp_path: Path) -> None:
    assert LdapSettings.from_values({}) is None
    assert LdapSettings.from_values({"web.ldap_url": ""}) is None


def test_settings_read_the_bind_password_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret with spaces \n")
    s = LdapSettings.from_values(base_values(
        tmp_path, **{"web.ldap_bind_dn": "cn=svc,dc=example",
                     "web.ldap_bind_password_file": secret}))
    assert s is not None
    assert s.bind_password == "s3cret with spaces "
    assert "s3cret" not in repr(s)
    assert s.start_tls and s.encrypted and (s.host, s.port) == ("dir.example", 389)
    assert s.roles.decide_role([ADMINS]) == Role.ADMIN


@pytest.mark.parametrize(("over", "message"), [
    ({"web.ldap_start_tls": False}, "clear text"),
    ({"web.ldap_user_base": ""}, "web.ldap_user_base is required"),
    ({"web.ldap_group_base": ""}, "a way to find a user's groups"),
    ({"web.ldap_admin_groups": []}, "no directory group is mapped"),
    ({"web.ldap_bind_dn": "cn=svc,dc=example"}, "needs web.ldap_bind_password_file"),
    ({"web.ldap_bind_password_file": "/nonexistent"}, "web.ldap_bind_dn is not"),
    ({"web.ldap_ca_file": "/nonexistent/ca.pem"}, "not a readable file"),
])
def test_settings_that_cannot_work_are_refused(tmp_path: Path, over: dict[str, Any],
                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LdapSettings.from_values(base_values(tmp_path, **over))


def test_an_empty_bind_password_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "pw"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="unauthenticated bind"):
        LdapSettings.from_values(base_values(
            tmp_path, **{"web.ldap_bind_dn": "cn=svc,dc=example",
                         "web.ldap_bind_password_file": empty}))


def test_plain_text_needs_the_insecure_setting_and_ldaps_needs_no_starttls(
        tmp_path: Path) -> None:
    s = LdapSettings.from_values(base_values(tmp_path, **{
        "web.ldap_start_tls": False, "web.ldap_insecure_plaintext": True}))
    assert s is not None and not s.encrypted
    s = LdapSettings.from_values(base_values(tmp_path, **{"web.ldap_url": "ldaps://dir"}))
    assert s is not None and s.use_ssl and not s.start_tls and s.port == 636


def test_an_empty_password_is_refused_before_any_connection(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.3)
    try:
        s = LdapSettings.from_values(base_values(tmp_path, **{
            "web.ldap_url": f"ldap://127.0.0.1:{listener.getsockname()[1]}",
            "web.ldap_timeout": 1.0}))
        assert s is not None
        with pytest.raises(InvalidCredentials, match="empty password"):
            Directory(s).authenticate("alice", "")
        with pytest.raises(TimeoutError):
            listener.accept()                # nobody connected
    finally:
        listener.close()


# -- the policy over a directory double -----------------------------------------------------


class FakeDirectory:
    """Answers from ``entries`` (name -> (password, groups)); ``down`` makes
    every call fail as an unreachable directory does."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, list[str]]] = {}
        self.down = False
        self.calls = 0
        self.delay = 0.0
        self.lock = threading.Lock()

    def _user(self, name: str) -> DirectoryUser | None:
        with self.lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.down:
            raise DirectoryUnavailable("the directory ldap://dir refused the connection")
        if name not in self.entries:
            return None
        return DirectoryUser(name, f"uid={name},dc=x", frozenset(self.entries[name][1]))

    def authenticate(self, name: str, password: str) -> DirectoryUser:
        user = self._user(name)
        if user is None:
            raise InvalidCredentials("unknown user")
        if self.entries[name][0] != password:
            raise InvalidCredentials("wrong password")
        return user

    def lookup(self, name: str) -> DirectoryUser | None:
        return self._user(name)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def world(tmp_path: Path) -> tuple[DirectoryAccess, FakeDirectory, Clock, MemoryStore, Keys]:
    settings = LdapSettings.from_values(base_values(tmp_path, **{
        "web.ldap_operator_groups": [OPS], "web.ldap_recheck": 300.0,
        "web.ldap_offline_grace": 600.0}))
    assert settings is not None
    store, keys, clock, directory = MemoryStore(), Keys("/t"), Clock(), FakeDirectory()
    directory.entries = {"alice": ("pw-alice", [OPS, ADMINS]), "bob": ("pw-bob", [OPS]),
                         "carol": ("pw-carol", ["cn=other,dc=x"])}
    access = DirectoryAccess(directory, settings, Auth(store, keys), keys, clock=clock)
    return access, directory, clock, store, keys


def audit_records(store: MemoryStore, keys: Keys) -> list[dict[str, Any]]:
    page = store.range(keys.audit_prefix())
    return [json.loads(kv.value) for kv in page.items]


def test_sign_in_records_the_directory_user_and_audits_it(world: Any) -> None:
    access, _directory, clock, store, keys = world
    user = access.sign_in("alice", "pw-alice", source="from 192.0.2.1")
    assert (user.role, user.source, user.checked_at, user.password_hash) == \
        ("admin", "ldap", clock.t, "")
    [record] = audit_records(store, keys)
    assert record["action"] == "auth.ldap_login" and record["actor"] == "alice"
    assert record["after"]["groups"] == sorted([OPS, ADMINS])
    assert record["source"] == "ldap sign-in from 192.0.2.1"
    assert "pw-alice" not in json.dumps(record)


def test_failed_sign_ins_are_audited_without_the_password(world: Any) -> None:
    access, directory, _clock, store, keys = world
    with pytest.raises(InvalidCredentials):
        access.sign_in("alice", "guess", source="")
    with pytest.raises(Refused, match="carol is in no directory group"):
        access.sign_in("carol", "pw-carol", source="")
    directory.down = True
    with pytest.raises(DirectoryUnavailable):
        access.sign_in("bob", "pw-bob", source="")
    details = [(r["target"], r["detail"]) for r in audit_records(store, keys)]
    assert [d[0] for d in details] == ["alice", "carol", "bob"]
    assert details[0][1] == "wrong password or unknown user (wrong password)"
    assert details[2][1].startswith("directory unavailable")
    assert "guess" not in json.dumps(audit_records(store, keys))
    assert Auth(store, keys).get_user("carol") is None


def test_a_directory_sign_in_never_takes_a_local_users_name(world: Any) -> None:
    access, _directory, _clock, store, keys = world
    auth = Auth(store, keys)
    auth.put_user("bob", "viewer", "local-password")
    with pytest.raises(ValidationError, match="bob is a local user"):
        access.sign_in("bob", "pw-bob", source="")
    assert auth.get_user("bob").source == "local"    # type: ignore[union-attr]
    # and a directory user's role and password are not set by hand
    access.sign_in("alice", "pw-alice", source="")
    with pytest.raises(ValidationError, match="directory"):
        auth.put_user("alice", "admin", "a-local-password")


def test_the_role_is_trusted_until_the_recheck_then_asked_once(world: Any) -> None:
    access, directory, clock, store, keys = world
    user = access.sign_in("alice", "pw-alice", source="")
    calls = directory.calls
    clock.t += 299
    assert access.role_of(user).role == Role.ADMIN
    assert directory.calls == calls                # not asked within the interval
    directory.entries["alice"] = ("pw-alice", [OPS])   # demoted in the directory
    clock.t += 2
    check = access.role_of(user)
    assert check.role == Role.OPERATOR and not check.stale
    assert directory.calls == calls + 1
    stored = Auth(store, keys).get_user("alice")
    assert stored is not None and stored.role == "operator" and stored.checked_at == clock.t
    sync = [r for r in audit_records(store, keys) if r["action"] == "user.ldap_sync"]
    assert sync[0]["before"]["role"] == "admin" and sync[0]["after"]["role"] == "operator"
    # the next request uses the new answer without asking (memo before the watch)
    assert access.role_of(user).role == Role.OPERATOR and directory.calls == calls + 1


def test_concurrent_requests_share_one_directory_lookup(world: Any) -> None:
    access, directory, clock, _store, _keys = world
    user = access.sign_in("bob", "pw-bob", source="")
    clock.t += 301
    directory.delay = 0.3
    calls = directory.calls
    results: list[Role] = []
    threads = [threading.Thread(target=lambda: results.append(access.role_of(user).role))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert results == [Role.OPERATOR] * 8
    assert directory.calls == calls + 1


def test_a_removed_user_is_refused_and_stays_refused_while_the_directory_is_down(
        world: Any) -> None:
    access, directory, clock, store, keys = world
    user = access.sign_in("bob", "pw-bob", source="")
    del directory.entries["bob"]
    clock.t += 301
    with pytest.raises(Refused, match="bob is no longer in the directory"):
        access.role_of(user)
    stored = Auth(store, keys).get_user("bob")
    assert stored is not None and stored.refused
    directory.down = True
    clock.t += 301
    with pytest.raises(Refused):
        access.role_of(stored)               # down does not bring back a refused user


def test_directory_down_keeps_the_role_for_reads_in_the_grace_then_refuses(
        world: Any) -> None:
    access, directory, clock, _store, _keys = world
    user = access.sign_in("alice", "pw-alice", source="")
    signed_in = clock.t
    directory.down = True
    clock.t += 301
    check = access.role_of(user)
    assert check.stale and check.role == Role.ADMIN
    assert check.grace_until == signed_in + 300 + 600
    assert "refused the connection" in check.why
    clock.t = signed_in + 300 + 600
    with pytest.raises(DirectoryUnavailable, match="past the offline grace of 600 s"):
        access.role_of(user)
    directory.down = False                   # back: the role is confirmed again
    check = access.role_of(user)
    assert not check.stale and check.checked_at == clock.t


@pytest.mark.parametrize(("template", "placeholders"), [
    ("(&(objectCategory=person)(objectClass=user)(sAMAccountName={user})"
     "(!(userAccountControl:1.2.840.113556.1.4.803:=2)))", ("user",)),
    ("(member:1.2.840.113556.1.4.1941:={dn})", ("dn", "user")),
    ("(&(objectClass=posixGroup)(memberUid={user}))", ("dn", "user")),
])
def test_the_documented_filters_parse_as_ldap3_sends_them(template: str,
                                                          placeholders: tuple[str, ...]) -> None:
    from ldap3.operation.search import parse_filter

    assert filter_template(*placeholders, required=placeholders)(template) == template
    built = build_filter(template, user="j.smith", dn="CN=J. Smith (IT),OU=Staff,DC=corp")
    assert "{" not in built and "(IT)" not in built
    if "{dn}" in template:
        assert "\\28IT\\29" in built
    parse_filter(built, None, True, True, None, False)     # raises on a malformed filter
