"""The Debian package (issue #22 item 2): built from this tree with
packaging/build-deb.sh (dh-virtualenv, PyPI), installed on this machine with
dpkg, and run from the installed files as its systemd units would run it.

There is no systemd service manager here (no PID 1 systemd), so the units'
sandbox is rebuilt from its parts around the installed binary: a network
namespace of its own (privileged ports 67, 69 and 4011 without clashing with
the host), the ``lpmos`` system user, only the capabilities the unit grants
(CAP_NET_BIND_SERVICE for the node, none for the control plane),
no-new-privileges, and the kernel's memory-deny-write-execute
(``PR_SET_MDWE``, what MemoryDenyWriteExecute= enforces).  The unit files
themselves are checked with ``systemd-analyze verify`` and ``security``.

The package is purged at the end (and by the fixture's teardown whatever
happens), so the machine is left as it was.  A machine that already has
lpmos installed is not touched: those tests skip.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.notify_socket import check_notify_lifecycle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "build" / "deb"
UNITS = ("lpmos-regional.service", "lpmos-regional@.service", "lpmos-control-plane.service")
CONFIGS = ("regional.toml", "control-plane.toml", "catalog.toml")
LOADER_DEPENDS = ("ipxe", "etcd-server", "shim-signed", "grub-efi-amd64-signed")
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
CAP_NET_BIND_SERVICE = 1 << 10

# drop to the unit's user and capabilities, and refuse W+X memory, then exec
_SANDBOX = """#!/bin/sh
# $1: capabilities to keep (setpriv syntax: -all or -all,+net_bind_service)
caps=$1; shift
ip link set lo up
exec setpriv --reuid=lpmos --regid=lpmos --init-groups --no-new-privs \\
  --inh-caps="$caps" --ambient-caps="$caps" --bounding-set="$caps" \\
  /usr/bin/python3 -c 'import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE failed: errno " + str(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])' "$@"
""".replace("PR_SET_MDWE,", f"{PR_SET_MDWE},").replace(
    "PR_MDWE_REFUSE_EXEC_GAIN,", f"{PR_MDWE_REFUSE_EXEC_GAIN},")


def _run(*cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``cmd`` from ``/``: nothing of this checkout on its path."""
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                          check=check, cwd="/")


def _tree_hash() -> str:
    """What the build copies (packaging/build-deb.sh): tracked and untracked,
    not ignored files, by name and content; tests/ is not packaged."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True, timeout=60).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(n for n in names if n and not n.startswith(b"tests/")):
        path = REPO / os.fsdecode(name)
        if path.is_file():
            digest.update(name + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb of this tree, built once per tree content (cached in
    build/deb with the tree's hash)."""
    key = _tree_hash()
    stamp = OUT / "tree-hash"
    built = sorted(OUT.glob("lpmos_*.deb"))
    if built and stamp.exists() and stamp.read_text() == key:
        return built[-1]
    for old in built:
        old.unlink()
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "packaging" / "build-deb.sh"), str(OUT)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-6000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file(), done.stdout
    stamp.write_text(key)
    print(f"built {path.name} in {time.monotonic() - started:.0f} s")
    return path


def _purge() -> None:
    _run("dpkg", "--purge", "lpmos", check=False, timeout=300)
    # a purge removes the user; this is the fallback should that ever fail
    try:
        pwd.getpwnam("lpmos")
    except KeyError:
        return
    _run("deluser", "--system", "lpmos", check=False)
    _run("delgroup", "--system", "lpmos", check=False)


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("installing a package needs root")
    if _run("dpkg-query", "-W", "-f=${Status}", "lpmos", check=False).stdout.startswith(
            "install ok"):
        pytest.skip("lpmos is installed on this machine: the test does not replace it")
    for left in ("/etc/lpmos", "/var/lib/lpmos", "/opt/venvs/lpmos"):
        assert not Path(left).exists(), f"{left} exists without the package; remove it first"
    try:
        done = _run("dpkg", "-i", str(deb), check=False, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        yield deb
    finally:
        _purge()


def _field(deb: Path, name: str) -> str:
    return _run("dpkg-deb", "-f", str(deb), name).stdout.strip()


def test_deb_names_etcd_ipxe_and_the_boot_loaders_and_holds_units_and_config(
        deb: Path) -> None:
    depends = {d.strip().split(" ")[0] for d in _field(deb, "Depends").split(",")}
    assert set(LOADER_DEPENDS) <= depends, depends
    assert re.fullmatch(r"python3\.\d+", next(d for d in depends if d.startswith("python3")))
    assert "cloud-init" in _field(deb, "Recommends")
    listing = _run("dpkg-deb", "-c", str(deb)).stdout
    for unit in UNITS:
        assert f"./lib/systemd/system/{unit}\n" in listing
    for name in CONFIGS:
        assert f"./etc/lpmos/{name}\n" in listing
    assert "./usr/bin/lpmos -> /opt/venvs/lpmos/bin/lpmos" in listing
    assert "./usr/share/lpmos/templates/ipxe/" in listing
    with tempfile.TemporaryDirectory() as control:
        _run("dpkg-deb", "-e", str(deb), control)
        conffiles = (Path(control) / "conffiles").read_text().split()
    assert sorted(conffiles) == sorted(f"/etc/lpmos/{n}" for n in CONFIGS)


def test_installed_cli_runs_from_its_own_virtualenv(installed: Path) -> None:
    done = _run("/usr/bin/lpmos", "--help")
    assert "control-plane" in done.stdout and "regional" in done.stdout
    assert Path("/usr/bin/lpmos").resolve() == Path("/opt/venvs/lpmos/bin/lpmos")
    shebang = Path("/opt/venvs/lpmos/bin/lpmos").read_text().splitlines()[0]
    assert shebang == "#!/opt/venvs/lpmos/bin/python", shebang
    # the installed code, not this checkout's
    where = _run("/opt/venvs/lpmos/bin/python", "-c",
                 "import bootsvc.render as r, lpmos; print(lpmos.__file__); "
                 "print(r.default_templates_dir().resolve())", check=True)
    module, templates = where.stdout.split()
    assert module.startswith("/opt/venvs/lpmos/lib/python3")
    assert templates == "/usr/share/lpmos/templates"
    # every config key is one some command reads (no 'no such setting' warning)
    for name, command in (("regional.toml", "regional"), ("control-plane.toml",
                                                          "control-plane")):
        shown = _run("/usr/bin/lpmos", "config", "show", "--for", command,
                     "--config", f"/etc/lpmos/{name}")
        assert "warning" not in shown.stderr, shown.stderr
        assert f"(file /etc/lpmos/{name})" in shown.stdout


def test_installed_units_verify_without_a_warning(installed: Path) -> None:
    paths = [f"/lib/systemd/system/{u}" for u in UNITS]
    done = _run("systemd-analyze", "verify", *paths, "lpmos-regional@dc2.service",
                check=False)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", \
        done.stdout + done.stderr
    for unit in ("lpmos-regional.service", "lpmos-control-plane.service"):
        text = Path(f"/lib/systemd/system/{unit}").read_text()
        assert "Type=notify" in text and "WatchdogSec=30s" in text
        assert "ExecStart=/usr/bin/lpmos " in text and "User=lpmos" in text
        report = _run("systemd-analyze", "security", "--offline=yes",
                      f"/lib/systemd/system/{unit}", check=False)
        level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", report.stdout)
        assert level is not None, report.stdout[-2000:] + report.stderr
        assert float(level.group(1)) <= 2.0, report.stdout[-3000:]


def test_install_makes_the_system_user_and_guards_the_config(installed: Path) -> None:
    user = pwd.getpwnam("lpmos")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert user.pw_dir == "/var/lib/lpmos"
    state = os.stat("/var/lib/lpmos")
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (user.pw_uid, 0o750)
    for name in CONFIGS:
        st = os.stat(f"/etc/lpmos/{name}")
        assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)) == \
            (0, "lpmos", 0o640), name


@pytest.fixture
def sandbox(installed: Path) -> Iterator[Path]:
    """A directory the lpmos user can reach (pytest's tmp is root's 0700),
    with the sandbox wrapper; removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="lpmos-deb-test-"))
    base.chmod(0o711)
    (base / "sandbox.sh").write_text(_SANDBOX)
    (base / "sandbox.sh").chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _in_netns(pid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return _run("nsenter", "-t", str(pid), "-n", *cmd, check=False, timeout=30)


def _healthz_in(pid: int, port: int) -> tuple[int, Any]:
    done = _in_netns(pid, "curl", "-s", "-o", "-", "-w", "\n%{http_code}",
                     f"http://127.0.0.1:{port}/healthz")
    body, _sep, code = done.stdout.rpartition("\n")
    return int(code or 0), json.loads(body or "null")


def _service(sandbox: Path, caps: str, *args: str) -> list[str]:
    return ["unshare", "--net", str(sandbox / "sandbox.sh"), caps, "/usr/bin/lpmos", *args]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def test_regional_node_runs_from_the_installed_files_in_the_units_sandbox(
        sandbox: Path) -> None:
    """The installed /usr/bin/lpmos with /etc/lpmos/regional.toml as the unit
    runs it: the lpmos user, CAP_NET_BIND_SERVICE only, no W+X memory, the
    embedded etcd under /var/lib/lpmos, the privileged ports 67, 4011 and 69
    (DHCP bound to lo: SO_BINDTODEVICE needs no CAP_NET_RAW)."""
    seen: dict[str, Any] = {}

    def healthz(pid: int) -> tuple[int, Any]:
        status = _status(pid)
        seen["uid"] = status["Uid"].split()[0]
        seen["caps"] = (int(status["CapEff"], 16), int(status["CapBnd"], 16),
                        int(status["CapAmb"], 16), status["NoNewPrivs"].strip())
        tftp = _in_netns(pid, "curl", "-s", "-o", str(sandbox / "undionly.kpxe"),
                         "tftp://127.0.0.1/undionly.kpxe")
        seen["tftp"] = tftp.returncode
        return _healthz_in(pid, 8081)

    notify = check_notify_lifecycle(
        _service(sandbox, "-all,+net_bind_service", "regional",
                 "--config", "/etc/lpmos/regional.toml", "--interface", "lo"),
        healthz, sandbox / "notify.sock", sandbox / "regional.log", watchdog_usec=2_000_000)
    assert seen["uid"] == str(pwd.getpwnam("lpmos").pw_uid)
    bind = CAP_NET_BIND_SERVICE
    assert seen["caps"] == (bind, bind, bind, "1"), seen
    # Debian's iPXE, fetched over TFTP from the privileged port
    assert seen["tftp"] == 0
    assert (sandbox / "undionly.kpxe").read_bytes() == \
        Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
    ready = notify.wait_for("READY", 0)
    assert "dhcp,tftp,http" in ready.fields["STATUS"]
    assert "cache current" in ready.fields["STATUS"]     # the embedded etcd answered
    log = (sandbox / "regional.log").read_text()
    assert "on 0.0.0.0 (lo) ports 67,4011" in log and "0.0.0.0:69" in log, log[-3000:]
    # the embedded etcd ran as lpmos under the state directory and stopped with the node
    endpoint = Path("/var/lib/lpmos/etcd/endpoint.json")
    if endpoint.exists():
        assert not Path(f"/proc/{json.loads(endpoint.read_text())['pid']}").exists()
    assert Path("/var/lib/lpmos/etcd/data").stat().st_uid == pwd.getpwnam("lpmos").pw_uid


def test_control_plane_runs_from_the_installed_files_without_capabilities(
        sandbox: Path) -> None:
    seen: dict[str, Any] = {}

    def healthz(pid: int) -> tuple[int, Any]:
        status = _status(pid)
        seen["caps"] = (int(status["CapEff"], 16), int(status["CapBnd"], 16))
        page = _in_netns(pid, "curl", "-sL", "http://127.0.0.1:8080/")
        seen["page"] = page.stdout
        return _healthz_in(pid, 8080)

    notify = check_notify_lifecycle(
        _service(sandbox, "-all", "control-plane", "--config", "/etc/lpmos/control-plane.toml"),
        healthz, sandbox / "notify.sock", sandbox / "cp.log", watchdog_usec=3_000_000)
    assert seen["caps"] == (0, 0)
    assert "<html" in seen["page"].lower()          # the console's pages are installed
    assert notify.wait_for("READY", 0).fields["STATUS"] == \
        "control plane on 127.0.0.1:8080: serving"


def test_upgrade_keeps_an_edited_config_the_state_and_the_user(installed: Path) -> None:
    """Installing over the installed package (the upgrade path: preinst
    upgrade, postinst configure OLD-VERSION) keeps the operator's edit of a
    conffile (dpkg's --force-confold, what a non-interactive upgrade does),
    the state directory and the user."""
    config = Path("/etc/lpmos/regional.toml")
    edited = config.read_text() + "\n# edited by the operator\n"
    config.write_text(edited)
    marker = Path("/var/lib/lpmos/kept")
    marker.write_text("state")
    uid = pwd.getpwnam("lpmos").pw_uid
    done = _run("dpkg", "-i", "--force-confold", str(installed), timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert config.read_text() == edited
    assert marker.read_text() == "state"
    assert pwd.getpwnam("lpmos").pw_uid == uid
    st = config.stat()
    assert grp.getgrgid(st.st_gid).gr_name == "lpmos" and stat.S_IMODE(st.st_mode) == 0o640
    assert "control-plane" in _run("/usr/bin/lpmos", "--help").stdout


def test_purge_removes_the_files_the_state_and_the_user(installed: Path) -> None:
    done = _run("dpkg", "--purge", "lpmos", timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    for gone in ("/usr/bin/lpmos", "/opt/venvs/lpmos", "/etc/lpmos", "/var/lib/lpmos",
                 "/usr/share/lpmos", "/lib/systemd/system/lpmos-regional.service"):
        assert not os.path.lexists(gone), gone
    with pytest.raises(KeyError):
        pwd.getpwnam("lpmos")
    with pytest.raises(KeyError):
        grp.getgrnam("lpmos")
