"""``lpmos regional --listen ADDR`` with ADDR a unicast address of the node.
Linux delivers no broadcast to a socket bound to a unicast
address, so the ProxyDHCP binds 0.0.0.0 on the interface holding ADDR and
answers as ADDR.  The node runs in one namespace, ADDR a secondary address
of its veth (answering as the interface's primary address would show); a
real DHCP client (busybox udhcpc with a PXE vendor class) and crafted
broadcasts come from another.  etcd is not reachable from the namespace:
the node serves degraded, which the ProxyDHCP does not notice."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.dhcp_loadgen import NetnsPair, PxeClient, client_socket, ip
from bootsvc.wire import dhcp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("udhcpc") is None,
                       reason="needs root, iproute2 and busybox udhcpc"),
]

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.235.0"
LISTEN = f"{SUBNET}.7"            # the node's secondary address; .1 is the primary
PXE_EFI = "PXEClient:Arch:00007:UNDI:003016"


class Node:
    """``lpmos regional`` in ``net.server``; ``output`` collects its log
    lines (read by a thread, so a chatty node never blocks on the pipe)."""

    def __init__(self, net: NetnsPair, state: Path, *flags: str) -> None:
        cmd = net.exec_args(net.server, sys.executable, "-m", "lpmos", "regional",
                            "--state-dir", str(state), "--idc", "dc1", "--services", "dhcp",
                            "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-timeout", "0.5",
                            *flags)
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.output: list[str] = []
        self.up = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            if "regional node" in line and " up: " in line:
                self.up.set()

    @property
    def log(self) -> str:
        return "".join(self.output)[-4000:]

    def wait_up(self) -> None:
        assert self.up.wait(60) and self.proc.poll() is None, self.log

    def finish(self, timeout: float = 60) -> int:
        """Wait for the node to exit by itself; its exit code."""
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.finish()


@contextmanager
def node_lan() -> Iterator[NetnsPair]:
    """The two namespaces, the server's veth holding .1 and the --listen address."""
    net = NetnsPair(client_address=False, subnet=SUBNET).create()
    try:
        ip("-n", net.server, "addr", "add", f"{LISTEN}/24", "dev", net.server_if)
        yield net
    finally:
        net.destroy()


def test_unicast_listen_answers_broadcast_discover_as_that_address(tmp_path: Path) -> None:
    with node_lan() as net:
        node = Node(net, tmp_path / "node", "--node-name", "listen-a", "--listen", LISTEN)
        second = None
        try:
            node.wait_up()
            # no --interface: the interface holding the address, on the wildcard
            assert f"dhcp: proxy mode on 0.0.0.0 ({net.server_if}) ports 67,4011, " \
                   f"answering as {LISTEN}" in node.log

            # a real client's broadcast DISCOVER (PXE vendor class, option 93 = 7):
            # udhcpc names the offer's server identifier (option 54) when it selects
            out = subprocess.run(net.exec_args(
                net.client, "udhcpc", "-f", "-q", "-n", "-i", net.client_if, "-s", "/bin/true",
                "-t", "1", "-T", "1", "-V", PXE_EFI, "-x", "0x5d:0007"),
                capture_output=True, text=True, timeout=30)
            said = out.stdout + out.stderr
            assert "broadcasting discover" in said, said
            assert f"select for 0.0.0.0, server {LISTEN}" in said, (said, node.log)

            # crafted broadcasts from 0.0.0.0: siaddr, option 54 and the boot
            # URL all say the --listen address
            sock = client_socket(net.client, net.client_if)
            try:
                client = PxeClient(sock)
                offer = client.discover("52:54:00:16:00:01", arch=7)
                assert offer is not None and offer.msg_type == dhcp.OFFER, node.log
                assert (offer.server_id, offer.siaddr, offer.boot_file) == (
                    LISTEN, LISTEN, "ipxe.efi")
                ipxe = client.discover("52:54:00:16:00:02", arch=7, user_class=b"iPXE")
                assert ipxe is not None
                assert ipxe.boot_file == f"http://{LISTEN}:8081/boot.ipxe"
                assert ipxe.server_id == LISTEN
                # the boot server (4011) hears unicast to the --listen address
                net.add_client_address()
                ack = client.request("52:54:00:16:00:03", (LISTEN, 4011), arch=7,
                                     ciaddr=net.client_ip)
                assert ack is not None and ack.msg_type == dhcp.ACK
                assert (ack.server_id, ack.siaddr, ack.boot_file) == (LISTEN, LISTEN, "ipxe.efi")
            finally:
                sock.close()

            # a second node answering as the primary address would hear the same
            # broadcasts on the same interface: refused in one line
            second = Node(net, tmp_path / "node-2", "--node-name", "listen-b",
                          "--listen", net.server_ip)
            assert second.finish() == 1, second.log
            assert (f"dhcp: another LPMOS node on this host already serves UDP port 67 on "
                    f"{net.server_if}; stop it") in second.log, second.log
            assert node.proc.poll() is None           # the first node goes on
        finally:
            if second is not None:
                second.stop()
            rc = node.stop()
    assert rc == 0, node.log                          # SIGTERM: a clean exit
