"""templates/cloud-init/lpmos-report.py, the installed system's report of its
cloud-init run, run as the image runs it (a python3 process) against:

* status.json and result.json written by cloud-init's own code
  (``status_wrapper``, tests/fixtures/cloud_init/write_status.py) and
  ``cloud-init status --wait --long`` as cloud-init's own code answers it
  (cloud_init_status.py) on the same directory;
* a cloud-init 23.4 ``recoverable_errors`` capture (degraded) that the host's
  22.4 cannot write;
* a small HTTP server on 127.0.0.1 that records what it is sent, and fails
  as it is told to;
* /sys/firmware/efi as a directory under tmp_path, with efivarfs's
  SecureBoot file (4 attribute bytes, then the value) on, off or missing.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "templates" / "cloud-init" / "lpmos-report.py"
UNIT = REPO / "templates" / "cloud-init" / "lpmos-report.service"
FIXTURES = REPO / "tests" / "fixtures" / "cloud_init"
#: the interpreter of the target image (Debian's python3, cloud-init's own)
PYTHON = shutil.which("python3", path="/usr/bin") or "python3"
TOKEN = "tok_" + "B" * 43
SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
#: efivarfs's attributes of SecureBoot: NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS
EFI_ATTRS = b"\x06\x00\x00\x00"
OK_STAGES = [["init-local", []], ["init", []], ["modules-config", []], ["modules-final", []]]
RUNCMD_FAILED = "Runparts: 1 failures (runcmd) in 1 attempted commands"


def _has_cloud_init() -> bool:
    return subprocess.run([PYTHON, "-c", "import cloudinit.cmd.main"],
                          capture_output=True, check=False).returncode == 0


needs_cloud_init = pytest.mark.skipif(not _has_cloud_init(),
                                      reason="Debian's cloud-init package is not installed")


@dataclass
class Recorder:
    """What the fake node was sent; ``answers``: the status of each next
    request (then 200)."""

    answers: list[int] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def node() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            rec.requests.append({"path": self.path, "headers": dict(self.headers),
                                 "body": json.loads(body)})
            status = rec.answers.pop(0) if rec.answers else 200
            answer = json.dumps({"acked": ["cloud-init:1"]} if status == 200
                                else {"error": "nope", "detail": "told to fail"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/callback/SN-1", rec
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Machine:
    """The installed system's files, under a temporary directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "etc" / "report.json"

    @property
    def run_dir(self) -> Path:
        return self.root / "run" / "cloud-init"

    @property
    def efi_dir(self) -> Path:
        """/sys/firmware/efi; absent (BIOS) unless a test makes it."""
        return self.root / "sys" / "firmware" / "efi"

    def write_config(self, callback: str, seq: int = 7) -> None:
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({"callback": callback, "token": TOKEN, "sn": "SN-1",
                                           "seq": seq}))

    def cloud_init_ran(self, plan: list[Any]) -> None:
        """cloud-init's stages in ``plan`` ran, as cloud-init records them."""
        subprocess.run([PYTHON, str(FIXTURES / "write_status.py"), str(self.root / "data"),
                        str(self.run_dir), json.dumps(plan)], check=True, capture_output=True)

    def run(self, *extra: str, status_cmd: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if status_cmd is None:
            status = FIXTURES / "cloud_init_status.py"
            status_cmd = f"{PYTHON} {status} {self.run_dir} --wait --long"
        args = [PYTHON, str(SCRIPT), "--config", str(self.config),
                "--status-json", str(self.run_dir / "status.json"),
                "--result-json", str(self.run_dir / "result.json"),
                "--status-cmd", status_cmd, "--boot-id", str(self.root / "boot_id"),
                "--efi-dir", str(self.efi_dir),
                "--backoff", "0.05", "--deadline", "20", "--timeout", "5", *extra]
        (self.root / "boot_id").write_text("0f3a4c1e-1111-2222-3333-444455556666\n")
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def only_report(rec: Recorder) -> dict[str, Any]:
    assert len(rec.requests) == 1, rec.requests
    req = rec.requests[0]
    assert req["path"] == "/callback/SN-1"
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert req["headers"]["Content-Type"] == "application/json"
    body: dict[str, Any] = req["body"]
    return body


# --- the files cloud-init writes ------------------------------------------------------------


@needs_cloud_init
def test_a_clean_run_reports_succeeded_and_removes_the_token(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    url, rec = node
    machine.write_config(url)
    machine.cloud_init_ran(OK_STAGES)
    done = machine.run()
    assert done.returncode == 0, done.stdout + done.stderr
    body = only_report(rec)
    assert body["event"] == "cloud-init" and body["status"] == "succeeded"
    assert body["seq"] == 7 and body["boot_id"] == "0f3a4c1e-1111-2222-3333-444455556666"
    assert body["hostname"]
    ci = body["cloud_init"]
    assert ci["status"] == "done" and ci["errors"] == [] and ci["recoverable_errors"] == []
    # modules-init did not run this boot (start and finished null): not a stage of the report
    assert list(ci["stages"]) == ["init-local", "init", "modules-config", "modules-final"]
    for stage in ci["stages"].values():
        assert stage["errors"] == [] and 0 < stage["start"] <= stage["finished"]
    assert body["message"].startswith("cloud-init done in ")
    assert not machine.config.exists()
    assert "status: done" in done.stdout          # cloud-init status, in the journal
    assert "report delivered (attempt 1)" in done.stdout


@needs_cloud_init
def test_a_failed_module_reports_failed_with_cloud_inits_error(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    url, rec = node
    machine.write_config(url)
    machine.cloud_init_ran([*OK_STAGES[:3], ["modules-final", [["scripts_user", RUNCMD_FAILED]]]])
    done = machine.run()
    assert done.returncode == 0, done.stdout + done.stderr
    body = only_report(rec)
    error = f"('scripts_user', RuntimeError('{RUNCMD_FAILED}'))"
    assert body["status"] == "failed"
    assert body["message"] == f"cloud-init failed: modules-final: {error}"
    ci = body["cloud_init"]
    assert ci["status"] == "error"
    assert ci["errors"] == [f"modules-final: {error}"]   # result.json's copy is not repeated
    assert ci["stages"]["modules-final"]["errors"] == [error]
    assert not machine.config.exists()                  # delivered: the token is done with
    assert "status: error" in done.stdout


@needs_cloud_init
def test_cloud_init_status_error_alone_is_an_error(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    """The files are clean but ``cloud-init status`` exits 1: the worse wins."""
    url, rec = node
    machine.write_config(url)
    machine.cloud_init_ran(OK_STAGES)
    done = machine.run(status_cmd="sh -c 'echo status: error; exit 1'")
    assert done.returncode == 0
    body = only_report(rec)
    assert body["status"] == "failed" and body["cloud_init"]["status"] == "error"
    assert body["message"] == "cloud-init failed: cloud-init status: status: error"


@needs_cloud_init
def test_a_run_that_does_not_finish_in_time_reports_failed(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    """modules-final never ends: cloud-init status --wait waits on, the
    report gives up after --wait seconds and says where cloud-init was."""
    url, rec = node
    machine.write_config(url)
    machine.cloud_init_ran(OK_STAGES[:3])
    status = json.loads((machine.run_dir / "status.json").read_text())
    status["v1"]["modules-final"]["start"] = status["v1"]["modules-config"]["finished"] + 1
    status["v1"]["stage"] = "modules-final"
    (machine.root / "data" / "status.json").write_text(json.dumps(status))
    done = machine.run("--wait", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    body = only_report(rec)
    assert body["status"] == "failed" and body["cloud_init"]["status"] == "running"
    assert body["message"] == ("cloud-init did not finish in modules-final before "
                               "lpmos-report gave up waiting")
    assert "still waiting after 1 s" in done.stdout


def test_recoverable_errors_are_degraded_and_fail(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    """cloud-init 23.4+ (a newer image than Debian 12's): a WARNING in a
    stage's recoverable_errors is "degraded done", exit status 2."""
    url, rec = node
    machine.write_config(url)
    machine.run_dir.mkdir(parents=True)
    shutil.copy(FIXTURES / "status-degraded-23.4.json", machine.run_dir / "status.json")
    shutil.copy(FIXTURES / "result-degraded-23.4.json", machine.run_dir / "result.json")
    done = machine.run(status_cmd="sh -c 'echo status: degraded done; exit 2'")
    assert done.returncode == 0, done.stdout + done.stderr
    body = only_report(rec)
    ci = body["cloud_init"]
    assert body["status"] == "failed" and ci["status"] == "degraded" and ci["errors"] == []
    assert ci["recoverable_errors"] == [
        "modules-config: WARNING: Invalid cloud-config provided: Please run "
        "'sudo cloud-init schema --system' to see the schema errors."]
    assert body["message"] == "cloud-init degraded: " + ci["recoverable_errors"][0]
    assert ci["stages"]["modules-config"] == {"start": 1733115402.01, "finished": 1733115402.66,
                                              "errors": []}


# --- the firmware ---------------------------------------------------------------------------


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("lpmos_report", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def efi(efi_dir: Path, secure_boot: bytes | None, legacy: bool = False) -> Path:
    """``efi_dir`` as /sys/firmware/efi, its SecureBoot variable holding
    ``secure_boot`` (None: no variable); ``legacy``: the old sysfs
    ``vars/<name>/data``, without attribute bytes."""
    (efi_dir / "efivars").mkdir(parents=True)
    if secure_boot is not None and legacy:
        (efi_dir / "vars" / SECURE_BOOT_VAR).mkdir(parents=True)
        (efi_dir / "vars" / SECURE_BOOT_VAR / "data").write_bytes(secure_boot)
    elif secure_boot is not None:
        (efi_dir / "efivars" / SECURE_BOOT_VAR).write_bytes(EFI_ATTRS + secure_boot)
    return efi_dir


@pytest.mark.parametrize("value, legacy, secure_boot", [
    (b"\x01", False, True),
    (b"\x00", False, False),
    (b"\x02", False, False),           # agent/inventory/system.py's rule: on only for 1
    (None, False, None),               # no variable: UEFI does not say
    (b"", False, None),                # the attributes and no value
    (b"\x01", True, True),             # the old sysfs API
    (b"\x00", True, False),
])
def test_uefi_reads_secure_boot_from_the_efivar(tmp_path: Path, value: bytes | None,
                                                legacy: bool, secure_boot: bool | None) -> None:
    efi_dir = efi(tmp_path / "efi", value, legacy)
    assert _script().read_firmware(str(efi_dir)) == {"mode": "uefi", "secure_boot": secure_boot}


def test_an_unreadable_efivar_is_unknown(tmp_path: Path) -> None:
    efi_dir = efi(tmp_path / "efi", None)
    (efi_dir / "efivars" / SECURE_BOOT_VAR).mkdir()      # open() fails: EISDIR
    assert _script().read_firmware(str(efi_dir)) == {"mode": "uefi", "secure_boot": None}


def test_no_efi_directory_is_bios_without_secure_boot(tmp_path: Path) -> None:
    assert _script().read_firmware(str(tmp_path / "efi")) == \
        {"mode": "bios", "secure_boot": False}


@pytest.mark.parametrize("uefi, value, firmware, line", [
    (True, b"\x01", {"mode": "uefi", "secure_boot": True}, "booted UEFI, Secure Boot on"),
    (True, b"\x00", {"mode": "uefi", "secure_boot": False}, "booted UEFI, Secure Boot off"),
    (True, None, {"mode": "uefi", "secure_boot": None}, "booted UEFI, Secure Boot unknown"),
    (False, None, {"mode": "bios", "secure_boot": False}, "booted BIOS"),
])
def test_the_report_says_how_the_system_booted(
        machine: Machine, node: tuple[str, Recorder], uefi: bool, value: bytes | None,
        firmware: dict[str, Any], line: str) -> None:
    url, rec = node
    machine.write_config(url)
    if uefi:
        efi(machine.efi_dir, value)
    # no cloud-init files: a run that is still going, reported all the same
    done = machine.run(status_cmd="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert only_report(rec)["firmware"] == firmware
    assert f"lpmos-report: {line}\n" in done.stdout


# --- delivery ---------------------------------------------------------------------------------


@needs_cloud_init
def test_a_node_that_fails_twice_gets_the_same_report_a_third_time(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    url, rec = node
    rec.answers = [503, 500]
    machine.write_config(url)
    machine.cloud_init_ran(OK_STAGES)
    done = machine.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(rec.requests) == 3
    assert rec.requests[0]["body"] == rec.requests[1]["body"] == rec.requests[2]["body"]
    assert "attempt 1 failed (HTTP 503" in done.stdout and "retrying in" in done.stdout
    assert "report delivered (attempt 3)" in done.stdout
    assert not machine.config.exists()


@needs_cloud_init
def test_a_refused_report_is_not_retried_and_keeps_the_config(
        machine: Machine, node: tuple[str, Recorder]) -> None:
    url, rec = node
    rec.answers = [401]
    machine.write_config(url)
    machine.cloud_init_ran(OK_STAGES)
    done = machine.run()
    assert done.returncode == 1
    assert len(rec.requests) == 1
    assert "the node refused the report, not retrying: HTTP 401" in done.stdout
    assert machine.config.exists()


@needs_cloud_init
def test_an_unreachable_node_is_retried_until_the_deadline(machine: Machine) -> None:
    with socket_closed() as port:
        machine.write_config(f"http://127.0.0.1:{port}/callback/SN-1")
    machine.cloud_init_ran(OK_STAGES)
    done = machine.run("--deadline", "1")
    assert done.returncode == 1
    assert "deadline reached, giving up" in done.stdout
    assert done.stdout.count("failed (") >= 2
    assert machine.config.exists()


def test_nothing_to_report_without_the_config(machine: Machine,
                                              node: tuple[str, Recorder]) -> None:
    _, rec = node
    done = machine.run(status_cmd="")
    assert done.returncode == 0 and "nothing to report" in done.stdout
    assert rec.requests == []


@pytest.mark.parametrize("config, reason", [
    ("[]", "not a JSON object"),
    ('{"callback": "file:///etc/passwd", "token": "t"}', "'callback' is not an http(s) URL"),
    ('{"callback": "http://x/callback/A", "token": ""}', "'token' is missing"),
    ('{"callback": "http://x/callback/A", "token": "t", "seq": -1}', "'seq' is not"),
])
def test_a_bad_config_is_refused_with_its_reason(machine: Machine, config: str,
                                                 reason: str) -> None:
    machine.config.parent.mkdir(parents=True)
    machine.config.write_text(config)
    done = machine.run(status_cmd="")
    assert done.returncode == 1 and reason in done.stdout


# --- the files as a Jinja template includes them ------------------------------------------


@pytest.mark.parametrize("path", [SCRIPT, UNIT])
def test_the_files_hold_no_jinja_markup(path: Path) -> None:
    text = path.read_text()
    assert not any(mark in text for mark in ("{{", "{%", "{#"))


def test_the_unit_is_a_bounded_oneshot_after_cloud_final() -> None:
    lines = UNIT.read_text().splitlines()
    assert "Type=oneshot" in lines and "After=cloud-final.service network-online.target" in lines
    assert "ExecStart=/usr/bin/python3 /usr/local/sbin/lpmos-report" in lines
    assert "TimeoutStartSec=30min" in lines
    verify = shutil.which("systemd-analyze")
    if verify:
        done = subprocess.run([verify, "verify", str(UNIT)], capture_output=True, text=True,
                              check=False)
        assert "lpmos-report.service" not in done.stderr.replace(str(UNIT), ""), done.stderr


class socket_closed:
    """A loopback port nothing listens on (bound, then released)."""

    def __enter__(self) -> int:
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
