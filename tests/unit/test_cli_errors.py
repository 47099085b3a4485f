"""What an operator sees when the environment, not the input, is wrong: one
line that says what, exit code 1, the traceback only with --log-level debug;
and no traceback when the reader of the output goes away."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from lpmos.store.embedded import free_port

REPO = Path(__file__).resolve().parents[2]


def _lpmos(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lpmos", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


def test_unreachable_etcd_is_one_line_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"     # a port nobody listens on
    result = _lpmos("token", "list", "--etcd-endpoints", url, "--etcd-timeout", "0.5")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"lpmos token: etcd is unavailable ({url}): ")
    assert lines[1] == "lpmos token: (--log-level debug prints the traceback)"
    debug = _lpmos("token", "list", "--etcd-endpoints", url, "--etcd-timeout", "0.5",
                   "--log-level", "debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        result = _lpmos("regional", "--state-dir", str(tmp_path), "--idc", "dc1",
                        "--listen", "127.0.0.1", "--services", "tftp", "--tftp-port", str(port),
                        timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Address already in use" in result.stderr
    assert "lpmos regional: (--log-level debug prints the traceback)" in result.stderr


def test_a_listen_address_dhcp_cannot_hear_on_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """An address on no interface (TEST-NET-1): the ProxyDHCP cannot know
    where to hear broadcast DISCOVERs, and says what to give instead."""
    url = f"http://127.0.0.1:{free_port()}"     # no etcd: the node gets as far as DHCP
    result = _lpmos("regional", "--state-dir", str(tmp_path), "--idc", "dc1",
                    "--listen", "192.0.2.77", "--services", "dhcp", "--dhcp-port", "0",
                    "--dhcp-proxy-port", "0", "--etcd-endpoints", url, "--etcd-timeout", "0.5",
                    timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[-2].startswith("lpmos regional: dhcp: --listen 192.0.2.77 "), result.stderr
    assert "give --interface IFACE" in lines[-2]
    assert lines[-1] == "lpmos regional: (--log-level debug prints the traceback)"


def test_output_cut_short_by_its_reader_is_not_an_error() -> None:
    """``lpmos config show | head -1``: no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "lpmos", "config", "show"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()                 # the reader goes away, like head after a line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
