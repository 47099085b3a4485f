"""The node's TFTP and boot HTTP over IPv6 (issue #20): ``lpmos regional
--listen ::`` serves ``ipxe.efi`` to real TFTP clients (atftp, curl) and
boot HTTP to curl at ``[::1]``, on loopback only.  With ``::`` both are
dual-stack (IPv4 clients still get the file and the scripts), and a client
that came over IPv6 gets a boot script whose URLs are IPv6 ones
(``--dhcp6-advertise-url``), one over IPv4 the IPv4 ones: what the README
says of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lpmos.store.embedded import free_port
from lpmos.store.keys import Keys
from tests.reliability.support import free_udp

REPO = Path(__file__).resolve().parents[2]


def test_tftp_and_boot_http_over_ipv6(etcd_server: Any, keys: Keys, tmp_path: Path) -> None:
    http_port, tftp_port = free_port(), free_udp()
    log = tmp_path / "node.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpmos", "regional", "--idc", "v6", "--node-name", "v6n",
         "--services", "tftp,http", "--listen", "::", "--http-port", str(http_port),
         "--tftp-port", str(tftp_port), "--state-dir", str(tmp_path / "state"),
         "--advertise-url", f"http://127.0.0.1:{http_port}",
         "--dhcp6-advertise-url", f"http://[::1]:{http_port}",
         "--etcd-endpoints", etcd_server.url, "--etcd-prefix", keys.prefix],
        cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            r = subprocess.run(["curl", "-sg", "--max-time", "2",
                                f"http://[::1]:{http_port}/healthz"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout:
                health = json.loads(r.stdout)
                break
            time.sleep(0.3)
        assert health.get("status") in ("ok", "degraded"), log.read_text()[-3000:]
        got = tmp_path / "atftp.efi"
        r2 = subprocess.run(["atftp", "--get", "-r", "ipxe.efi", "-l", str(got), "::1",
                             str(tftp_port)], capture_output=True, text=True, timeout=30)
        assert r2.returncode == 0 and got.stat().st_size > 100_000, r2.stderr
        via_curl = tmp_path / "curl.efi"
        r3 = subprocess.run(["curl", "-s", "--max-time", "20", "-o", str(via_curl),
                             f"tftp://[::1]:{tftp_port}/ipxe.efi"], timeout=30)
        assert r3.returncode == 0 and via_curl.read_bytes() == got.read_bytes()
        v4 = tmp_path / "v4.efi"
        r4 = subprocess.run(["atftp", "--get", "-r", "ipxe.efi", "-l", str(v4), "127.0.0.1",
                             str(tftp_port)], capture_output=True, text=True, timeout=30)
        assert r4.returncode == 0 and v4.read_bytes() == got.read_bytes()   # dual-stack TFTP
        script = subprocess.run(["curl", "-sg", "--max-time", "5",
                                 f"http://[::1]:{http_port}/boot.ipxe"],
                                capture_output=True, text=True)
        assert script.stdout.startswith("#!ipxe"), script.stdout[:200]
        assert f"http://[::1]:{http_port}/boot/" in script.stdout, script.stdout
        # dual-stack boot HTTP: an IPv4 client is served too, with IPv4 URLs
        script4 = subprocess.run(["curl", "-s", "--max-time", "5",
                                  f"http://127.0.0.1:{http_port}/boot.ipxe"],
                                 capture_output=True, text=True)
        assert f"http://127.0.0.1:{http_port}/boot/" in script4.stdout, script4.stdout
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
