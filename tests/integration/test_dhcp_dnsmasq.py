"""Our ProxyDHCP next to the site's address-only DHCP server (dnsmasq), on one
segment (a bridge in the client's namespace joining both servers): the PXE
client gets its address from dnsmasq and its boot file from us, then asks
our boot server on port 4011; a plain DHCP client (udhcpc) is served by
dnsmasq alone."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.dhcp_bench import Dnsmasq, OurServer
from bench.dhcp_loadgen import NetnsPair, PxeClient, client_socket
from bootsvc.wire import dhcp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dnsmasq") is None,
                       reason="needs root and dnsmasq"),
]

MAC = "52:54:00:5e:00:01"
UUID = bytes(range(16))


def test_pxe_boot_with_site_dnsmasq_and_our_proxy(tmp_path: Path) -> None:
    net = NetnsPair(client_address=False, site=True, subnet="10.233.0").create()
    site = server = None
    sock = None
    try:
        site = Dnsmasq(net.site_ns, net.site_if, tmp_path / "site", mode="site",
                       subnet="10.233.0", server_ip=net.site_ip)
        server = OurServer(net, tmp_path / "ours")
        sock = client_socket(net.client, net.client_if)
        client = PxeClient(sock)

        # 1. DISCOVER: two offers, the address from dnsmasq, the boot file from us
        client.xid += 1
        discover = dhcp.build_request(MAC, xid=client.xid, arch=7, uuid=UUID,
                                      flags=dhcp.FLAG_BROADCAST)
        offers = client.collect(discover, ("255.255.255.255", 67), window=2.0)
        by_server = {pkt.server_id: pkt for pkt, _ in offers}
        assert set(by_server) == {net.site_ip, net.server_ip}, offers
        address = by_server[net.site_ip]
        proxy = by_server[net.server_ip]
        assert address.yiaddr.startswith("10.233.0.") and address.yiaddr != "0.0.0.0"
        assert proxy.yiaddr == "0.0.0.0" and proxy.boot_file == "ipxe.efi"
        assert proxy.vendor_class == b"PXEClient"

        # 2. REQUEST the address from dnsmasq: dnsmasq ACKs, the proxy stays silent
        client.xid += 1
        request = dhcp.build_request(MAC, dhcp.REQUEST, xid=client.xid, arch=7, uuid=UUID,
                                     server_id=net.site_ip, requested_ip=address.yiaddr,
                                     flags=dhcp.FLAG_BROADCAST)
        acks = client.collect(request, ("255.255.255.255", 67), window=1.5)
        assert [(p.msg_type, p.server_id) for p, _ in acks] == [(dhcp.ACK, net.site_ip)]

        # 3. with the address configured, ask our boot server on port 4011
        net.add_client_address(address.yiaddr)
        boot = client.request(MAC, (net.server_ip, 4011), arch=7, uuid=UUID,
                              ciaddr=address.yiaddr)
        assert boot is not None and boot.msg_type == dhcp.ACK
        assert boot.boot_file == "ipxe.efi" and boot.siaddr == net.server_ip

        # 4. a plain DHCP client is served by dnsmasq only
        sock.close()
        sock = None
        out = subprocess.run(net.exec_args(net.client, "udhcpc", "-f", "-q", "-n", "-i",
                                           net.client_if, "-s", "/bin/true", "-t", "4", "-T",
                                           "1"),
                             capture_output=True, text=True, timeout=30)
        assert "lease of 10.233.0." in out.stderr + out.stdout, out
        assert f"obtained from {net.site_ip}" in out.stderr + out.stdout
    finally:
        if sock is not None:
            sock.close()
        stats = server.stop() if server is not None else {}
        if site is not None:
            site.stop()
        net.destroy()
    assert stats["dhcp_packets_out_total"] == {"port=dhcp,type=offer": 1,
                                               "port=proxy,type=ack": 1}
    assert stats["dhcp_dropped_total"]["reason=not_for_us"] >= 1
    assert stats["dhcp_dropped_total"]["reason=not_boot_client"] >= 1
