"""Shared fixtures: a real etcd server (Debian's binary) for the whole session,
and a store on it with a fresh key prefix per test so tests never see each
other's keys."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lpmos.store.embedded import free_port, healthy, start_etcd
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore

REPO = Path(__file__).resolve().parent.parent


def _restore_empty_fixture_dirs() -> None:
    """git keeps no empty directories, but the captured sysfs trees need
    theirs (an empty ``sys/firmware/efi`` means UEFI); they are listed in
    ``tests/fixtures/agent/empty-dirs.txt`` and recreated here."""
    base = REPO / "tests" / "fixtures" / "agent"
    listing = base / "empty-dirs.txt"
    if listing.exists():
        for line in listing.read_text().splitlines():
            if line.strip():
                (base / line.strip()).mkdir(parents=True, exist_ok=True)


_restore_empty_fixture_dirs()


@dataclass
class EtcdServer:
    """A real etcd member the test may stop, continue, kill and restart."""

    data_dir: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        self.proc, _ = start_etcd(self.data_dir, client_port=self.client_port,
                                  peer_port=self.peer_port,
                                  log_path=self.data_dir.parent / "etcd.log")

    def stop(self) -> None:   # SIGSTOP: the process hangs, TCP stays open
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        # kill() returns before every thread has stopped: on a loaded machine a
        # request sent at once could still be answered; wait until all are
        deadline = time.monotonic() + 5
        tasks = Path(f"/proc/{self.proc.pid}/task")
        while time.monotonic() < deadline:
            states = []
            for t in tasks.iterdir():
                try:
                    states.append((t / "stat").read_text().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue
            if states and all(st in ("T", "t") for st in states):
                return
            time.sleep(0.01)

    def cont(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.start()

    def healthy(self) -> bool:
        return healthy(self.url)

    def shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _new_server(tmp: Path) -> EtcdServer:
    server = EtcdServer(tmp / "data", free_port(), free_port())
    server.start()
    return server


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the session (shared; do not stop or kill it)."""
    if shutil.which("etcd") is None:
        pytest.fail("etcd binary missing: run 'make setup' (Debian package etcd-server)")
    server = _new_server(tmp_path_factory.mktemp("etcd"))
    yield server
    server.shutdown()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd of this test's own, to stop, kill or compact freely."""
    server = _new_server(tmp_path / "etcd")
    yield server
    server.shutdown()


@pytest.fixture
def keys() -> Keys:
    return Keys("/t-" + uuid.uuid4().hex[:12])


@pytest.fixture
def etcd_store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    yield store
    store.close()


@pytest.fixture
def memory_store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture(params=["etcd", "memory"])
def any_store(request: pytest.FixtureRequest, etcd_server: EtcdServer) -> Iterator[object]:
    """The contract suite runs against both the real etcd and the double."""
    if request.param == "memory":
        yield MemoryStore()
    else:
        store = EtcdStore([etcd_server.url], timeout=2.0)
        yield store
        store.close()
