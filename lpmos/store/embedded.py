"""The embedded default: a private etcd server process on loopback.

With no ``--etcd-endpoints`` a service calls :func:`ensure_local_etcd` with
its state directory.  The first caller starts Debian's ``etcd`` binary with
its data under ``STATE/etcd``, on free loopback ports, and records the PID
and client URL there; later callers on the same state directory find it
healthy and reuse it.  Each user registers its own PID; on exit
(:meth:`LocalEtcd.release`) a user removes its registration, and the last
live user stops the server (by the PID we recorded, after checking that the
process is still our etcd on that data directory).

A file lock (``flock``) serialises start-up, so two services started at
once on one state directory share one etcd.

The server is started with :class:`EtcdOptions`: etcd's own periodic
compaction (``--auto-compaction-*``, by default history older than 5
minutes is dropped, so progress and timeline writes cannot grow it without
bound) and its backend quota (``--quota-backend-bytes``).  Defragmentation
and the alarms are watched by :mod:`lpmos.store.maintenance`.  The options
of whichever service starts the server apply until it is restarted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lpmos.procs import pid_alive

log = logging.getLogger(__name__)

ETCD_BINARY_CANDIDATES = ("etcd", "/usr/bin/etcd")

#: a Go duration (``5m``, ``1h30m``, ``90s``), as etcd parses the periodic retention
_GO_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")


class EmbeddedEtcdError(RuntimeError):
    pass


@dataclass(frozen=True)
class EtcdOptions:
    """The flags LPMOS gives an etcd it starts itself.

    ``auto_compaction_mode`` ``periodic`` keeps ``auto_compaction_retention``
    of history (a Go duration, ``5m``; etcd 3.4 compacts every retention
    period up to an hour), ``revision`` keeps that many revisions (checked
    every 5 minutes).  A watch that falls further behind than the retention
    reloads its prefix (:mod:`lpmos.store.cache`); nothing is lost.
    ``quota_backend_bytes`` 0 is etcd's default (2 GiB); past the quota etcd
    raises the NOSPACE alarm and refuses writes."""

    auto_compaction_mode: str = "periodic"
    auto_compaction_retention: str = "5m"
    quota_backend_bytes: int = 0

    def __post_init__(self) -> None:
        retention = self.auto_compaction_retention
        if self.auto_compaction_mode == "periodic":
            if not (_GO_DURATION.fullmatch(retention) or retention.isdigit()):
                raise ValueError(f"auto-compaction retention {retention!r}: periodic mode "
                                 "takes a duration such as 5m or 1h")
        elif self.auto_compaction_mode == "revision":
            if not retention.isdigit() or int(retention) < 1:
                raise ValueError(f"auto-compaction retention {retention!r}: revision mode "
                                 "takes a number of revisions such as 10000")
        else:
            raise ValueError(f"auto-compaction mode {self.auto_compaction_mode!r}: "
                             "periodic or revision")
        if self.quota_backend_bytes < 0:
            raise ValueError("quota-backend-bytes: 0 (etcd's default) or more")

    def args(self) -> list[str]:
        return ["--auto-compaction-mode", self.auto_compaction_mode,
                "--auto-compaction-retention", self.auto_compaction_retention,
                "--quota-backend-bytes", str(self.quota_backend_bytes)]


def find_etcd_binary() -> str:
    for candidate in ETCD_BINARY_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    raise EmbeddedEtcdError(
        "no etcd binary found: install Debian's etcd-server package "
        "(make setup does) or pass --etcd-endpoints to use an existing cluster"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def healthy(client_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=timeout) as resp:  # noqa: S310
            return bool(json.loads(resp.read()).get("health") in ("true", True))
    except (OSError, ValueError):
        return False


def _is_our_etcd(pid: int, data_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"etcd") and str(data_dir).encode() in cmdline


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class LocalEtcd:
    """A running private etcd: its client URL and how to let go of it."""

    client_url: str
    pid: int
    base: Path
    started_here: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def release(self) -> None:
        """Drop our registration; stop the server if no live user remains."""
        with _locked(self.base / "lock"):
            users_dir = self.base / "users"
            with contextlib.suppress(FileNotFoundError):
                (users_dir / str(os.getpid())).unlink()
            others = [p for p in users_dir.glob("*") if p.name.isdigit() and
                      pid_alive(int(p.name))]
            if others:
                return
            self._stop()

    def _stop(self) -> None:
        if not pid_alive(self.pid) or not _is_our_etcd(self.pid, self.data_dir):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                break
            if self.process is None and not pid_alive(self.pid):
                break
            time.sleep(0.05)
        else:
            os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
        with contextlib.suppress(FileNotFoundError):
            (self.base / "endpoint.json").unlink()


def start_etcd(
    data_dir: Path,
    *,
    name: str = "lpmos",
    client_port: int | None = None,
    peer_port: int | None = None,
    log_path: Path | None = None,
    extra_args: list[str] | None = None,
    wait: float = 20.0,
    initial_cluster: str | None = None,
    scheme: str = "http",
    wait_healthy: Callable[[str], bool] | None = lambda url: healthy(url, timeout=0.5),
    options: EtcdOptions | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start one etcd member on loopback; return the process and client URL.

    ``options`` (compaction, quota) default to :class:`EtcdOptions`'s.

    Used by :func:`ensure_local_etcd` and by the test fixtures (which also
    start clusters with ``initial_cluster`` and TLS with ``scheme="https"``
    plus ``extra_args``; ``wait_healthy=None`` returns without waiting, for a
    member that cannot be healthy before its peers start).  The process
    is started in its own session so a Ctrl-C to the parent does not reach
    it before the parent can shut it down in order.
    """
    binary = find_etcd_binary()
    client_port = client_port or free_port()
    peer_port = peer_port or free_port()
    client_url = f"{scheme}://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    args = [
        binary, "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster or f"{name}={peer_url}",
        "--grpc-keepalive-min-time", "1s",
        "--logger", "zap", "--log-outputs", "stderr",
        *(options or EtcdOptions()).args(),
    ]
    args += extra_args or []
    log_fh = (log_path or data_dir.parent / "etcd.log").open("ab")
    env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
    proc = subprocess.Popen(args, stdout=log_fh, stderr=log_fh, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    log_fh.close()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedEtcdError(
                f"etcd exited with code {proc.returncode}; "
                f"see {log_path or data_dir.parent / 'etcd.log'}"
            )
        if wait_healthy is None or wait_healthy(client_url):
            return proc, client_url
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise EmbeddedEtcdError(f"etcd did not become healthy within {wait:g}s")


def ensure_local_etcd(state_dir: Path, options: EtcdOptions | None = None) -> LocalEtcd:
    """Start, or reuse, the private etcd of ``state_dir``; register this
    process.  ``options`` apply when it is started here."""
    base = state_dir / "etcd"
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / "lock"):
        users_dir = base / "users"
        users_dir.mkdir(exist_ok=True)
        info_path = base / "endpoint.json"
        running: LocalEtcd | None = None
        if info_path.exists():
            try:
                info = json.loads(info_path.read_text())
                pid, url = int(info["pid"]), str(info["client_url"])
                if pid_alive(pid) and _is_our_etcd(pid, base / "data") and healthy(url):
                    running = LocalEtcd(url, pid, base, started_here=False)
            except (ValueError, KeyError, OSError):
                running = None
        if running is None:
            proc, url = start_etcd(base / "data", log_path=base / "etcd.log", options=options)
            info_path.write_text(json.dumps({"pid": proc.pid, "client_url": url}))
            running = LocalEtcd(url, proc.pid, base, started_here=True, process=proc)
            log.info("started private etcd (pid %d) at %s, data in %s", proc.pid, url,
                     base / "data")
        else:
            log.info("reusing private etcd (pid %d) at %s", running.pid, running.client_url)
        (users_dir / str(os.getpid())).touch()
        return running
