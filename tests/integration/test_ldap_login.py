"""LDAP sign-in against a real OpenLDAP ``slapd`` (Debian's) that each test
starts on 127.0.0.1 at a free port, with a CA and server certificate made
here with ``openssl``, ``security tls=1`` (no bind or search without TLS),
an mdb database loaded with ``slapadd`` and changed while it runs with
``ldapmodify`` over StartTLS.  The control plane is the real app on a real
etcd, served over HTTP on loopback (:class:`web.testing.LiveServer`), and
is driven with ``requests`` as a browser or a script would."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.config import ConfigError
from lpmos.store.embedded import free_port
from lpmos.store.keys import Keys
from web.ldap import Directory, InvalidCredentials, LdapSettings
from web.testing import TEST_PASSWORD, LiveServer, WebEnv

SLAPD = "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "root-secret"
SERVICE_DN = f"cn=lpmos,ou=services,{SUFFIX}"
SERVICE_PW = "service-secret"
#: uid -> (password, groups)
PEOPLE_ENTRIES = {
    "alice": ("alice-password", ["operators", "admins"]),   # the highest wins: admin
    "bob": ("bob-password", ["viewers"]),
    "carol": ("carol-password", ["other"]),                 # in no mapped group
    "dave": ("dave-password", ["approvers"]),
    "admin1": ("directory-password", ["admins"]),           # a local user's name too
}



def dn(uid: str) -> str:
    return f"uid={uid},{PEOPLE}"


def group(name: str) -> str:
    return f"cn={name},{GROUPS}"


# -- certificates ---------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path

    def openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True,
                       timeout=60)

    def ca(self, name: str) -> Path:
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
                     "-subj", f"/CN=LPMOS test {name}")
        return self.dir / f"{name}.pem"

    def server(self, name: str, ca: str, san: str) -> tuple[Path, Path]:
        ext = self.dir / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                       "extendedKeyUsage=serverAuth\n")
        self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                     f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                     "-extfile", str(ext))
        key = self.dir / f"{name}.key"
        key.chmod(0o600)
        return self.dir / f"{name}.pem", key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if not Path(SLAPD).exists() or shutil.which("ldapmodify") is None \
            or shutil.which("openssl") is None:
        pytest.fail("slapd, ldap-utils or openssl missing: run 'scripts/setup.sh' (Debian "
                    "packages slapd, ldap-utils, openssl)")
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.ca("ca")
    p.ca("other-ca")                     # trusted by nobody: a CA that does not match
    p.server("server", "ca", "IP:127.0.0.1")
    p.server("misnamed", "ca", "DNS:ldap.elsewhere.example")
    return p


# -- slapd ----------------------------------------------------------------------------


def _ldif() -> str:
    def password(pw: str) -> str:
        out = subprocess.run(["/usr/sbin/slappasswd", "-s", pw], check=True,
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\n"
        "dc: example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: lpmos\nuserPassword: {password(SERVICE_PW)}\n",
    ]
    members: dict[str, list[str]] = {}
    for uid, (pw, groups) in PEOPLE_ENTRIES.items():
        entries.append(f"dn: {dn(uid)}\nobjectClass: inetOrgPerson\nobjectClass: posixAccount\n"
                       f"uid: {uid}\ncn: {uid.title()}\nsn: {uid}\nuidNumber: "
                       f"{1000 + len(entries)}\ngidNumber: 1000\nhomeDirectory: /home/{uid}\n"
                       f"userPassword: {password(pw)}\n")
        for g in groups:
            members.setdefault(g, []).append(uid)
    for g, uids in members.items():
        # groupOfNames needs a member: a placeholder lets a test remove the last user
        entries.append(f"dn: {group(g)}\nobjectClass: groupOfNames\ncn: {g}\n"
                       f"member: cn=placeholder,{SUFFIX}\n" +
                       "".join(f"member: {dn(u)}\n" for u in uids))
    # memberUid style (RFC 2307): a posixGroup naming bob by login name
    entries.append(f"dn: {group('posix-operators')}\nobjectClass: posixGroup\n"
                   "cn: posix-operators\ngidNumber: 2000\nmemberUid: bob\n")
    return "\n".join(entries)


@dataclass
class Slapd:
    """A slapd of the test's own: StartTLS required (``security tls=1``)."""

    dir: Path
    cert: Path
    key: Path
    ca: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def configure(self) -> None:
        (self.dir / "db").mkdir(parents=True)
        (self.dir / "slapd.conf").write_text(f"""
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile {self.dir}/slapd.pid
argsfile {self.dir}/slapd.args
TLSCACertificateFile {self.ca}
TLSCertificateFile {self.cert}
TLSCertificateKeyFile {self.key}
security tls=1
loglevel stats

database mdb
maxsize 33554432
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {self.dir}/db
overlay memberof
access to attrs=userPassword by anonymous auth by self write by * none
access to * by * read
""")
        (self.dir / "data.ldif").write_text(_ldif())
        subprocess.run(["/usr/sbin/slapadd", "-f", str(self.dir / "slapd.conf"), "-l",
                        str(self.dir / "data.ldif")], check=True, capture_output=True,
                       timeout=60)

    def start(self) -> None:
        log = (self.dir / "slapd.log").open("ab")
        # -d 256 (stats): in the foreground, every operation logged to stderr
        self.proc = subprocess.Popen([SLAPD, "-f", str(self.dir / "slapd.conf"), "-h",
                                      f"{self.url}/", "-d", "256"], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("slapd exited: " + self.log()[-2000:])
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("slapd did not listen within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return (self.dir / "slapd.log").read_text(errors="replace")

    def modify(self, ldif: str) -> None:
        """``ldapmodify`` over StartTLS as the directory's root."""
        env = dict(os.environ, LDAPCONF="/dev/null", LDAPRC="/dev/null",
                   LDAPTLS_CACERT=str(self.ca), LDAPTLS_REQCERT="demand")
        r = subprocess.run(["ldapmodify", "-ZZ", "-H", self.url, "-x", "-D", ROOT_DN, "-w",
                            ROOT_PW], input=ldif, env=env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr

    def remove_member(self, g: str, uid: str) -> None:
        self.modify(f"dn: {group(g)}\nchangetype: modify\ndelete: member\n"
                    f"member: {dn(uid)}\n")

    def add_member(self, g: str, uid: str) -> None:
        self.modify(f"dn: {group(g)}\nchangetype: modify\nadd: member\nmember: {dn(uid)}\n")


@pytest.fixture
def make_slapd(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Slapd]]:
    started: list[Slapd] = []

    def make(cert: str = "server") -> Slapd:
        s = Slapd(tmp_path / f"slapd{len(started)}", pki.dir / f"{cert}.pem",
                  pki.dir / f"{cert}.key", pki.dir / "ca.pem")
        s.configure()
        started.append(s)
        s.start()
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def slapd(make_slapd: Callable[..., Slapd]) -> Slapd:
    return make_slapd()


# -- the control plane ----------------------------------------------------------------


def ldap_settings(s: Slapd, tmp: Path, **over: Any) -> dict[str, Any]:
    password_file = tmp / "bind-password"
    password_file.write_text(SERVICE_PW + "\n")
    password_file.chmod(0o600)
    values: dict[str, Any] = {
        "web.ldap_url": s.url, "web.ldap_ca_file": s.ca, "web.ldap_bind_dn": SERVICE_DN,
        "web.ldap_bind_password_file": password_file, "web.ldap_user_base": PEOPLE,
        "web.ldap_user_filter": "(&(objectClass=inetOrgPerson)(uid={user}))",
        "web.ldap_group_base": GROUPS, "web.ldap_group_filter": "(member={dn})",
        "web.ldap_viewer_groups": [group("viewers")],
        "web.ldap_operator_groups": [group("operators"), group("posix-operators")],
        "web.ldap_approver_groups": [group("approvers"), group("ad-approvers")],
        "web.ldap_admin_groups": [group("admins")],
        "web.ldap_timeout": 1.0, "web.ldap_recheck": 1.0,
    }
    values.update(over)
    return values


@dataclass
class Plane:
    url: str
    web: WebEnv

    def sign_in(self, user: str, password: str) -> tuple[requests.Session, requests.Response]:
        s = requests.Session()
        r = s.post(f"{self.url}/login", json={"user": user, "password": password}, timeout=30)
        if r.status_code == 200:
            s.headers["X-CSRF-Token"] = r.json()["csrf"]
        return s, r

    def audit(self, action: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/audit", params={"action": action},
                         headers=self.web.headers("admin"), timeout=30)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])


@pytest.fixture
def plane_for(etcd_store: Any, keys: Keys, tmp_path: Path
              ) -> Iterator[Callable[..., Plane]]:
    stack: list[tuple[WebEnv, LiveServer]] = []

    def make(s: Slapd, **over: Any) -> Plane:
        web = WebEnv(etcd_store, keys, settings=ldap_settings(s, tmp_path, **over))
        server = LiveServer(web.app)
        stack.append((web, server))
        return Plane(server.__enter__(), web)

    yield make
    for web, server in stack:
        server.__exit__(None, None, None)
        web.close()


@pytest.fixture
def plane(slapd: Slapd, plane_for: Callable[..., Plane]) -> Plane:
    return plane_for(slapd)


def whoami(session: requests.Session, url: str, **kw: Any) -> requests.Response:
    return session.get(f"{url}/api/v1/session", timeout=30, **kw)


TASK = {"idc": "dc1", "sn": "sn-ldap-1", "mac": "00:1a:2b:3c:4d:01", "os_type": "Ubuntu 22.04",
        "os_version": "22.04"}


# -- sign-in ----------------------------------------------------------------------------


def test_console_sign_in_by_a_directory_user_gets_the_highest_mapped_role(
        plane: Plane) -> None:
    # the console's own form: CSRF token from the page, then a redirect to /
    s = requests.Session()
    page = s.get(f"{plane.url}/login", timeout=30).text
    csrf = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    r = s.post(f"{plane.url}/login", data={"user": "alice", "password": "alice-password",
                                           "csrf_token": csrf},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    me = whoami(s, plane.url).json()
    # alice is in operators and admins: the highest wins
    assert (me["user"], me["role"], me["source"], me["via"]) == \
        ("alice", "admin", "ldap", "session")
    assert s.get(f"{plane.url}/api/v1/users", timeout=30).status_code == 200   # admin only
    # her record in etcd: a directory user, no password kept
    user = plane.web.auth.get_user("alice")
    assert user is not None and user.source == "ldap" and user.password_hash == ""
    assert user.directory_dn == dn("alice") and user.role == "admin"
    # bob is a viewer: reads yes, changes no
    bob, r = plane.sign_in("bob", "bob-password")
    assert r.status_code == 200 and r.json()["role"] == "viewer"
    assert bob.get(f"{plane.url}/api/v1/tasks", timeout=30).status_code == 200
    assert bob.post(f"{plane.url}/api/v1/tasks", json=TASK, timeout=30).status_code == 403
    # audited, with the groups that gave the role, and never a password
    records = {a["target"]: a for a in plane.audit("auth.ldap_login")}
    assert records["alice"]["after"]["role"] == "admin"
    assert records["alice"]["after"]["groups"] == sorted([group("admins"),
                                                          group("operators")])
    assert records["alice"]["source"].startswith("ldap sign-in from 127.0.0.1")
    assert "alice-password" not in str(plane.audit("auth."))


def test_refused_sign_ins_get_clear_answers_and_audit_records(plane: Plane) -> None:
    _, r = plane.sign_in("carol", "carol-password")     # in no mapped group
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "no_role"
    assert "carol is in no directory group mapped to an LPMOS role" in r.json()["detail"]
    assert plane.web.auth.get_user("carol") is None     # no record for a refused stranger
    for user, password in (("alice", "wrong-password"), ("nobody", "whatever-password"),
                           ("alice", "")):
        _, r = plane.sign_in(user, password)
        assert r.status_code == 401, (user, r.text)
        assert r.json()["detail"] == "wrong user name or password"
    failed = {(a["target"], a["detail"]) for a in plane.audit("auth.ldap_login_failed")}
    assert ("carol", "carol is in no directory group mapped to an LPMOS role") in failed
    assert ("alice", "wrong password or unknown user (wrong password)") in failed
    assert ("nobody", "wrong password or unknown user (unknown user)") in failed
    assert ("alice", "empty password") in failed
    for a in plane.audit("auth."):
        assert "wrong-password" not in str(a) and "carol-password" not in str(a)


def test_filter_injection_is_refused_and_never_widens_the_search(plane: Plane,
                                                                 slapd: Slapd) -> None:
    for name in ("*)(uid=*", "*", "alice)(|(uid=*", "alice*"):
        _, r = plane.sign_in(name, "alice-password")
        assert r.status_code == 401, (name, r.text)
    # below the login-name rule, the client escapes what it puts in a filter:
    # against the real slapd, the hostile names match nobody ...
    settings = LdapSettings.from_values(plane.web.context.settings)
    assert settings is not None
    directory = Directory(settings)
    assert directory.lookup("*)(uid=*") is None
    assert directory.lookup("*") is None
    with pytest.raises(InvalidCredentials):
        directory.authenticate("*", "alice-password")
    assert directory.lookup("alice") is not None
    # ... because slapd received the escaped assertion, not a wildcard
    log = slapd.log()
    assert 'filter="(&(objectClass=inetOrgPerson)(uid=\\2A\\29\\28uid=\\2A))"' in log, \
        log[-3000:]
    assert 'filter="(&(objectClass=inetOrgPerson)(uid=\\2A))"' in log
    assert "(uid=*" not in log


def test_local_users_sign_in_first_and_keep_their_names(plane: Plane) -> None:
    _, r = plane.sign_in("operator1", TEST_PASSWORD)          # a local user, as before
    assert r.status_code == 200 and r.json()["role"] == "operator"
    s, r = plane.sign_in("admin1", TEST_PASSWORD)             # local password
    assert r.status_code == 200 and r.json()["role"] == "admin"
    assert whoami(s, plane.url).json()["source"] == "local"
    # the directory also has an admin1, with another password: the name is the
    # local user's, so the directory is never asked for it
    _, r = plane.sign_in("admin1", "directory-password")
    assert r.status_code == 401
    assert not [a for a in plane.audit("auth.ldap_login") if a["target"] == "admin1"]
    user = plane.web.auth.get_user("admin1")
    assert user is not None and user.source == "local" and user.password_hash


# -- API tokens of directory users ----------------------------------------------------------


def test_a_directory_users_token_stops_working_when_they_leave_the_group(
        plane: Plane, slapd: Slapd) -> None:
    s, r = plane.sign_in("dave", "dave-password")
    assert r.status_code == 200 and r.json()["role"] == "approver"
    r = s.post(f"{plane.url}/api/v1/session/tokens", json={"label": "dave's laptop"},
               timeout=30)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    me = requests.get(f"{plane.url}/api/v1/session", headers=bearer, timeout=30).json()
    assert (me["user"], me["role"], me["source"], me["via"]) == \
        ("dave", "approver", "ldap", "token")
    r = requests.post(f"{plane.url}/api/v1/tasks", json=TASK, headers=bearer, timeout=30)
    assert r.status_code == 201, r.text
    # a token does not mint tokens
    r = requests.post(f"{plane.url}/api/v1/session/tokens", json={}, headers=bearer,
                      timeout=30)
    assert r.status_code == 403
    created = [a for a in plane.audit("token.create") if a["after"]["user"] == "dave"]
    assert created and created[0]["after"]["self_service"] is True

    slapd.remove_member("approvers", "dave")
    time.sleep(1.2)                 # web.ldap_recheck = 1 s
    r = requests.get(f"{plane.url}/api/v1/tasks", headers=bearer, timeout=30)
    assert r.status_code == 401, r.text
    assert "dave is no longer in a directory group mapped to an LPMOS role" in \
        r.json()["detail"]
    # the session is over too, and the refusal is stored and audited
    assert whoami(s, plane.url).status_code == 401
    user = plane.web.auth.get_user("dave")
    assert user is not None and "no longer" in user.refused
    sync = [a for a in plane.audit("user.ldap_sync") if a["target"] == "dave"]
    assert sync and sync[0]["after"]["refused"]

    # back in the group: the token works again after the next re-check
    slapd.add_member("approvers", "dave")
    time.sleep(1.2)
    me = requests.get(f"{plane.url}/api/v1/session", headers=bearer, timeout=30)
    assert me.status_code == 200 and me.json()["role"] == "approver"


def test_a_user_removed_from_the_directory_loses_their_token(plane: Plane,
                                                             slapd: Slapd) -> None:
    s, r = plane.sign_in("bob", "bob-password")
    assert r.status_code == 200
    token = s.post(f"{plane.url}/api/v1/session/tokens", json={}, timeout=30).json()["token"]
    slapd.modify(f"dn: {dn('bob')}\nchangetype: delete\n")
    time.sleep(1.2)
    r = requests.get(f"{plane.url}/api/v1/tasks", headers={"Authorization": f"Bearer {token}"},
                     timeout=30)
    assert r.status_code == 401
    assert "bob is no longer in the directory" in r.json()["detail"]


# -- the directory down, hung, or not who it claims -----------------------------------


def test_a_stopped_directory_gives_a_quick_503_and_reads_only_in_the_grace(
        slapd: Slapd, plane_for: Callable[..., Plane]) -> None:
    plane = plane_for(slapd, **{"web.ldap_offline_grace": 5.0})
    s, r = plane.sign_in("alice", "alice-password")
    assert r.status_code == 200
    token = s.post(f"{plane.url}/api/v1/session/tokens", json={}, timeout=30).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    slapd.stop()
    t0 = time.monotonic()
    _, r = plane.sign_in("bob", "bob-password")
    assert time.monotonic() - t0 < 2.0
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "directory_unavailable"
    assert "refused the connection" in r.json()["detail"]
    failed = [a for a in plane.audit("auth.ldap_login_failed") if a["target"] == "bob"]
    assert failed and failed[0]["detail"].startswith("directory unavailable")

    time.sleep(1.2)                 # past the re-check deadline
    t0 = time.monotonic()
    r = requests.get(f"{plane.url}/api/v1/tasks", headers=bearer, timeout=30)
    assert r.status_code == 200, r.text           # reads go on with the last role
    me = requests.get(f"{plane.url}/api/v1/session", headers=bearer, timeout=30).json()
    assert me["role"] == "admin" and "cannot be reached" in me["stale"]
    r = requests.post(f"{plane.url}/api/v1/tasks", json=TASK, headers=bearer, timeout=30)
    assert r.status_code == 503, r.text           # changes fail closed
    assert r.json()["error"] == "directory_unavailable"
    assert "changes are refused until the directory confirms" in r.json()["detail"]
    assert time.monotonic() - t0 < 2.0
    assert plane.web.store.get(plane.web.keys.task("dc1", TASK["sn"])) is None

    time.sleep(5.0)                 # past the grace (1 s + 5 s after sign-in): nothing
    r = requests.get(f"{plane.url}/api/v1/tasks", headers=bearer, timeout=30)
    assert r.status_code == 503, r.text
    assert "past the offline grace" in r.json()["detail"]

    slapd.start()                   # back: the next check (after the back-off) admits her
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = requests.get(f"{plane.url}/api/v1/tasks", headers=bearer, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    r = requests.post(f"{plane.url}/api/v1/tasks", json=TASK, headers=bearer, timeout=30)
    assert r.status_code == 201, r.text


def test_a_hung_directory_costs_one_timeout_not_a_hang(slapd: Slapd,
                                                       plane_for: Callable[..., Plane]) -> None:
    # a listener that accepts connections and never says a word
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(hung.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = hung.getsockname()[1]
        plane = plane_for(slapd, **{"web.ldap_url": f"ldap://127.0.0.1:{port}"})
        t0 = time.monotonic()
        _, r = plane.sign_in("alice", "alice-password")
        took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert "did not answer within 1 s" in r.json()["detail"]
        assert 0.9 < took < 3.0, took
        # the next sign-in does not wait again: the directory is left alone a moment
        t0 = time.monotonic()
        _, r = plane.sign_in("bob", "bob-password")
        assert r.status_code == 503 and time.monotonic() - t0 < 0.5
        assert "asked again in" in r.json()["detail"]
    finally:
        stop.set()
        thread.join(5)
        for c in accepted:
            c.close()
        hung.close()


def test_starttls_with_a_ca_that_does_not_match_is_refused(
        slapd: Slapd, pki: Pki, plane_for: Callable[..., Plane]) -> None:
    plane = plane_for(slapd, **{"web.ldap_ca_file": pki.dir / "other-ca.pem"})
    t0 = time.monotonic()
    _, r = plane.sign_in("alice", "alice-password")
    assert r.status_code == 503, r.text
    assert "certificate verify failed" in r.json()["detail"].lower()
    assert time.monotonic() - t0 < 2.0
    assert plane.web.auth.get_user("alice") is None
    log = slapd.log()
    assert "STARTTLS" in log and "TLS negotiation failure" in log
    assert " BIND " not in log          # nothing was sent, not even the service bind


def test_a_certificate_for_another_name_is_refused(make_slapd: Callable[..., Slapd],
                                                   plane_for: Callable[..., Plane]) -> None:
    misnamed = make_slapd("misnamed")        # signed by the trusted CA, for another host
    plane = plane_for(misnamed)
    _, r = plane.sign_in("alice", "alice-password")
    assert r.status_code == 503, r.text
    assert "its certificate is not issued for 127.0.0.1" in r.json()["detail"]


def test_the_directory_refuses_binds_without_tls_and_we_refuse_to_try(
        slapd: Slapd, plane_for: Callable[..., Plane], tmp_path: Path) -> None:
    # without StartTLS and without the explicit insecure setting: not started at all
    values = ldap_settings(slapd, tmp_path, **{"web.ldap_start_tls": False})
    with pytest.raises(ConfigError, match="clear text"):
        LdapSettings.from_values(values)
    # allowed explicitly, slapd itself (security tls=1) refuses the plain-text bind
    plane = plane_for(slapd, **{"web.ldap_start_tls": False,
                                "web.ldap_insecure_plaintext": True})
    _, r = plane.sign_in("alice", "alice-password")
    assert r.status_code == 503, r.text
    assert "confidentialityRequired" in r.json()["detail"]


def test_a_wrong_service_password_is_a_clear_503(slapd: Slapd, plane_for: Callable[..., Plane],
                                                 tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    plane = plane_for(slapd, **{"web.ldap_bind_password_file": wrong})
    _, r = plane.sign_in("alice", "alice-password")
    assert r.status_code == 503, r.text
    assert f"refused the service bind as {SERVICE_DN}" in r.json()["detail"]


# -- the other ways to find groups ----------------------------------------------------------


def test_member_uid_groups(slapd: Slapd, plane_for: Callable[..., Plane]) -> None:
    plane = plane_for(slapd, **{"web.ldap_group_filter":
                                "(&(objectClass=posixGroup)(memberUid={user}))"})
    _, r = plane.sign_in("bob", "bob-password")      # bob is in posix-operators by name
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "operator"


def test_member_of_attribute_as_active_directory_has_it(slapd: Slapd,
                                                        plane_for: Callable[..., Plane]) -> None:
    # the memberof overlay keeps memberOf for groups changed while slapd runs
    slapd.modify(f"dn: {group('ad-approvers')}\nchangetype: add\nobjectClass: groupOfNames\n"
                 f"cn: ad-approvers\nmember: {dn('carol')}\n")
    plane = plane_for(slapd, **{"web.ldap_group_base": "",
                                "web.ldap_member_of_attribute": "memberOf"})
    _, r = plane.sign_in("carol", "carol-password")
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "approver"
    _, r = plane.sign_in("bob", "bob-password")      # loaded with slapadd: no memberOf
    assert r.status_code == 403


def test_control_plane_refuses_bad_ldap_settings_at_start(tmp_path: Path) -> None:
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env["PYTHONPATH"] = str(repo)
    r = subprocess.run([sys.executable, "-m", "lpmos", "control-plane", "--state-dir",
                        str(tmp_path), "--ldap-url", "ldap://127.0.0.1:1", "--ldap-start-tls",
                        "false", "--ldap-user-base", PEOPLE, "--ldap-group-base", GROUPS,
                        "--ldap-admin-groups", group("admins")],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "clear text" in r.stderr and "web.ldap_insecure_plaintext" in r.stderr
    r = subprocess.run([sys.executable, "-m", "lpmos", "control-plane", "--state-dir",
                        str(tmp_path), "--ldap-url", "ldaps://127.0.0.1:1",
                        "--ldap-user-base", PEOPLE, "--ldap-group-base", GROUPS,
                        "--ldap-bind-dn", SERVICE_DN, "--ldap-admin-groups", group("admins")],
                       cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "web.ldap_bind_password_file" in r.stderr
