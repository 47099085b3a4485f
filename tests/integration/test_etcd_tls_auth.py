"""etcd with TLS (client certificates) and authentication, certificates made
in the test: the store connects with CA, cert, key, user and password, and
refuses to work without them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from lpmos.store import StoreError
from lpmos.store.embedded import free_port, start_etcd
from lpmos.store.etcd import EtcdStore

pytestmark = pytest.mark.slow


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", f"{name}.pem",
                 cwd=d)
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture
def secure_etcd(tmp_path: Path):
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    proc, url = start_etcd(
        tmp_path / "data", client_port=port, scheme="https", wait_healthy=None,
        log_path=tmp_path / "etcd.log",
        extra_args=["--cert-file", str(pki["server.pem"]), "--key-file", str(pki["server.key"]),
                    "--client-cert-auth", "--trusted-ca-file", str(pki["ca.pem"])])
    ctl = ["etcdctl", f"--endpoints={url}", f"--cacert={pki['ca.pem']}",
           f"--cert={pki['client.pem']}", f"--key={pki['client.key']}"]
    env = {"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"}
    for _ in range(100):
        if subprocess.run(ctl + ["endpoint", "health"], env=env, capture_output=True,
                          timeout=10).returncode == 0:
            break
        time.sleep(0.2)
    for cmd in (["user", "add", "root:rootpw"], ["user", "add", "lpmos:lpmospw"],
                ["role", "add", "lpmos"],
                ["role", "grant-permission", "lpmos", "--prefix=true", "readwrite", "/os/"],
                ["user", "grant-role", "lpmos", "lpmos"], ["auth", "enable"]):
        subprocess.run(ctl + cmd, env=env, check=True, capture_output=True, timeout=10)
    yield url, pki
    proc.kill()
    proc.wait()


def test_tls_and_auth_store_works_with_credentials(secure_etcd) -> None:
    url, pki = secure_etcd
    store = EtcdStore([url], timeout=3, ca=pki["ca.pem"], cert=pki["client.pem"],
                      key=pki["client.key"], user="lpmos", password="lpmospw")
    rev = store.put("/os/dc1/servers/s1", b"x")
    assert store.get("/os/dc1/servers/s1").mod_revision == rev
    # the role limits what this user may touch
    with pytest.raises(StoreError, match=r"PERMISSION_DENIED|permission denied"):
        store.put("/elsewhere", b"x")
    store.close()


def test_tls_and_auth_refused_without_credentials(secure_etcd) -> None:
    url, pki = secure_etcd
    no_user = EtcdStore([url], timeout=3, ca=pki["ca.pem"], cert=pki["client.pem"],
                        key=pki["client.key"])
    with pytest.raises(StoreError):
        no_user.put("/os/dc1/servers/s1", b"x")
    no_user.close()
    wrong_password = EtcdStore([url], timeout=3, ca=pki["ca.pem"], cert=pki["client.pem"],
                               key=pki["client.key"], user="lpmos", password="nope")
    with pytest.raises(StoreError, match=r"authentication failed|INVALID_ARGUMENT"):
        wrong_password.get("/os/x")
    wrong_password.close()
    no_client_cert = EtcdStore([url], timeout=2, ca=pki["ca.pem"], user="lpmos",
                               password="lpmospw")
    with pytest.raises(StoreError):
        no_client_cert.get("/os/x")
    no_client_cert.close()
