"""Real clients through a hostile link: the relay drops and duplicates 10% of
datagrams in both directions; every byte must still arrive intact."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from bench.udp_relay import UdpRelay
from bootsvc.tftp.testing import ThreadedTftpServer
from lpmos.metrics import Registry

pytestmark = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("curl", "atftp", "tftp")),
    reason="needs curl, atftp and tftp-hpa")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lossyroot")
    (root / "f256k").write_bytes(os.urandom(256 * 1024))
    return root


@pytest.fixture(scope="module", params=[50e-6, 0.0], ids=["polling", "no-polling"])
def server(root, request):
    # a short retransmission timeout keeps the test quick: each loss the
    # server must notice costs one timeout.  Both ways of waiting for an ACK
    # are tested: polling the transfer sockets (the default) and sleeping.
    with ThreadedTftpServer(root, host="127.0.0.1", port=0, metrics=Registry(),
                            timeout=0.05, retries=40, max_sessions_per_client=64,
                            spin=request.param) as srv:
        yield srv


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# atftp aborts on a repeated OACK ("unexpected OACK") whatever the server, so
# its negotiation (the first two datagrams each way) is spared; and it answers
# a repeated DATA with an extra ACK only once, then waits its own 5 s timeout,
# so a smaller file keeps its run short.
@pytest.mark.parametrize("name, spare, cmd", [
    ("f256k", 0, ["curl", "-sS", "--max-time", "100", "--tftp-blksize", "1468",
                "-o", "{out}", "tftp://127.0.0.1:{port}/{name}"]),
    ("f256k", 2, ["atftp", "--option", "blksize 1468", "--option", "windowsize 8",
                  "-g", "-r", "{name}", "-l", "{out}", "127.0.0.1", "{port}"]),
    pytest.param("f256k", 0, ["tftp", "127.0.0.1", "{port}", "-m", "binary", "-c", "get",
                              "{name}", "{out}"], marks=pytest.mark.slow),
], ids=["curl", "atftp-windowsize", "tftp-hpa"])
def test_lossy_duplicating_link_delivers_identical_bytes(server, root, tmp_path, name, spare,
                                                         cmd):
    out = tmp_path / "out"
    sessions_before = server.metrics.total("tftp_sessions_total")
    with UdpRelay(("127.0.0.1", server.port), drop=0.1, duplicate=0.1, seed=4,
                  spare_first=spare) as relay:
        args = [a.format(out=out, port=relay.port, name=name) for a in cmd]
        result = subprocess.run(args, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert digest(out) == digest(root / name)
    assert relay.stats["dropped"] > 0 and relay.stats["duplicated"] > 0
    # the server records a transfer's retransmits when the session ends, which
    # can be after the client exits (its final ACK may be the packet dropped)
    deadline = time.monotonic() + 30
    while server.metrics.total("tftp_sessions_total") <= sessions_before and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics.total("tftp_retransmits_total") > 0
