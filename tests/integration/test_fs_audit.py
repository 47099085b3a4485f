"""L5 filesystem audit: a whole ``lpmos regional`` run writes nothing outside
its state directory.

The node runs as an operator runs it (``python -m lpmos regional``, all three
services, the embedded etcd: no ``--etcd-endpoints``, so the node starts its
private etcd under ``STATE/etcd`` and stops it on exit; the default TFTP root
``STATE/tftp``) under ``strace -f``, which follows every thread and child
(the etcd server included).  Real traffic goes through it while traced (TFTP,
ProxyDHCP on both ports, boot scripts, an iPXE binary and a live kernel over
HTTP, an agent registering, claiming an install and posting events, /metrics,
/healthz), then it is stopped by SIGTERM.  The log is parsed and every path
the node created, modified, renamed, removed, linked, re-permissioned or
bound a Unix socket on must lie inside the state directory; the only
exception is ``/dev/null`` (see ``ALLOWED``).

What is audited: every syscall strace knows that takes a path (``%file``:
open/openat/openat2/creat with write flags, mkdir*, mknod*, rename*,
unlink*, rmdir, link*, symlink*, truncate, chmod/fchmodat, chown/lchown/
fchownat, utime*/utimensat, setxattr/removexattr and their l- forms) plus the
fd-based changes a read-only fd allows (fchmod, fchown, fsetxattr,
fremovexattr) and ftruncate, ``bind`` on AF_UNIX paths, and chdir/fchdir to
keep relative paths resolvable.  Attempts count, successful or not.
io_uring, open_by_handle_at, mount and chroot cannot be audited this way:
seeing one fails the test.  A path that cannot be resolved to an absolute
one fails the test rather than being skipped.

Paths are checked as written (made absolute against the dirfd or the cwd
strace printed), through symlinks (an existing parent resolved on disk, the
file an open really opened), and a file opened for writing must not be a
hard link (it could be another name of a file elsewhere).  The TFTP root is
filled with hard links to /usr/lib/ipxe (never opened for writing): the
audit allows that, link() creates only the new name.

What is not: reads (the node reads the Python tree, /etc, /usr/lib/ipxe,
/boot, the image root); writes through file descriptors the node inherited
(its stdout/stderr: the test's log file); changes through ioctl (chattr);
syscalls newer than the installed strace's table (fchmodat2 with strace
6.1); processes that are not the node's descendants (an external etcd
cluster); Python's bytecode cache (PYTHONDONTWRITEBYTECODE=1, see below).
Skipped only where strace is missing or cannot trace (ptrace refused).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import pytest
import requests

from bootsvc.wire import dhcp
from lpmos.models import Task
from lpmos.procs import pid_alive as _pid_alive
from lpmos.store.embedded import _is_our_etcd
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import (
    IDC,
    Regional,
    auth,
    decision_of,
    eventually,
    progress,
    register,
)

# -- the trace ------------------------------------------------------------------------------

# %file is every syscall with a path argument (reads included: they keep the
# per-process cwd known and are classified below, so a path-taking syscall this
# file does not know fails the audit instead of passing unnoticed).  The rest
# modify a file through a descriptor that need not be open for writing, bind
# Unix sockets, change the cwd, or bypass the syscall layer (io_uring,
# open_by_handle_at).
TRACED = ("%file,fchmod,fchown,fsetxattr,fremovexattr,ftruncate,fchdir,bind,"
          "io_uring_setup,open_by_handle_at")


def strace_cmd(log: Path) -> list[str]:
    # -f: threads and children (the embedded etcd); -y: descriptors (dirfds,
    # AT_FDCWD and results) printed with their paths; -s: no truncated strings;
    # --seccomp-bpf: untraced syscalls do not stop the process (keeps the node fast)
    return ["strace", "-f", "-qq", "-y", "-s", "4096", "--seccomp-bpf",
            "-e", "trace=" + TRACED, "-e", "signal=none", "-o", str(log)]


# Outside the state directory the node may write only these:
ALLOWED = frozenset({
    "/dev/null",   # subprocess.DEVNULL (O_RDWR) for the embedded etcd's stdin
})

# -- the parser -----------------------------------------------------------------------------

READ_ONLY = frozenset({
    "access", "faccessat", "faccessat2", "execve", "execveat", "stat", "lstat", "newfstatat",
    "statx", "statfs", "readlink", "readlinkat", "getxattr", "lgetxattr", "listxattr",
    "llistxattr", "getcwd", "inotify_add_watch", "fanotify_mark", "name_to_handle_at",
})
UNAUDITABLE = frozenset({
    "io_uring_setup", "open_by_handle_at", "chroot", "pivot_root", "mount", "umount2",
    "swapon", "swapoff", "acct", "quotactl", "uselib", "fsopen", "fspick", "fsmount",
    "move_mount", "open_tree", "mount_setattr",
})
# syscall -> the (dirfd index or None for the cwd, path index) pairs it changes
PATH_WRITES: dict[str, tuple[tuple[int | None, int], ...]] = {
    "creat": ((None, 0),),
    "mkdir": ((None, 0),), "mkdirat": ((0, 1),),
    "mknod": ((None, 0),), "mknodat": ((0, 1),),
    "rename": ((None, 0), (None, 1)), "renameat": ((0, 1), (2, 3)),
    "renameat2": ((0, 1), (2, 3)),
    "unlink": ((None, 0),), "unlinkat": ((0, 1),), "rmdir": ((None, 0),),
    # link/symlink: the new name is created; the old one (or the symlink's
    # text) is only pointed at
    "link": ((None, 1),), "linkat": ((2, 3),),
    "symlink": ((None, 1),), "symlinkat": ((1, 2),),
    "truncate": ((None, 0),),
    "chmod": ((None, 0),), "fchmodat": ((0, 1),),
    "chown": ((None, 0),), "lchown": ((None, 0),), "fchownat": ((0, 1),),
    "utime": ((None, 0),), "utimes": ((None, 0),), "futimesat": ((0, 1),),
    "utimensat": ((0, 1),),
    "setxattr": ((None, 0),), "lsetxattr": ((None, 0),),
    "removexattr": ((None, 0),), "lremovexattr": ((None, 0),),
}
FD_WRITES = frozenset({"fchmod", "fchown", "fsetxattr", "fremovexattr", "ftruncate"})
OPENS = {"open": (None, 0, 1), "openat": (0, 1, 2), "openat2": (0, 1, 2)}  # dirfd, path, flags
# open flags that cannot change anything; any other (O_WRONLY, O_RDWR, O_CREAT,
# O_TRUNC, O_APPEND, O_TMPFILE, a number strace did not decode...) counts as a write
READ_FLAGS = frozenset({
    "O_RDONLY", "O_CLOEXEC", "O_DIRECTORY", "O_NOFOLLOW", "O_NONBLOCK", "O_NDELAY",
    "O_LARGEFILE", "O_NOATIME", "O_NOCTTY", "O_PATH", "O_ASYNC", "O_DIRECT", "O_DSYNC",
    "O_SYNC", "O_RSYNC",
})

_LINE = re.compile(r"(\d+) +(.*)")
_CALL = re.compile(r"([a-z_0-9]+)\(")
_RESULT = re.compile(r"\s*=\s*(\?|-?\d+|0x[0-9a-f]+)(?:<([^>]*)>)?")
_FD = re.compile(r"(AT_FDCWD|-?\d+)(?:<([^>]*)>)?")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPES = {"n": 10, "t": 9, "r": 13, "v": 11, "f": 12, "a": 7, "b": 8, "e": 27,
            "\\": 92, '"': 34, "'": 39, "?": 63}


class Unresolved(Exception):
    """A modifying syscall whose path cannot be made absolute."""


def unescape(text: str) -> str:
    """strace's C-style escapes (``\\303\\251``, ``\\x41``, ``\\n``, ``\\76``) to a path."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "x":
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif nxt.isdigit():
            digits = re.match(r"[0-7]{1,3}", text[i + 1:])
            if digits is None:
                raise Unresolved(f"bad escape in {text!r}")
            out.append(int(digits.group(), 8))
            i += 1 + len(digits.group())
        else:
            raise Unresolved(f"unknown escape in {text!r}")
    return os.fsdecode(bytes(out))


def split_call(body: str) -> tuple[str, list[str], str]:
    """``name(a, {b, c}, "d,e") = 3</p>`` -> ("name", ["a", "{b, c}", '"d,e"'], " = 3</p>").

    Quotes, brackets and the ``<path>`` strace prints after a descriptor
    (``3</a,b>``, ``AT_FDCWD</x>``; a ``>`` inside is escaped as ``\\76``)
    never split an argument."""
    m = _CALL.match(body)
    if m is None:
        raise ValueError(body)
    args: list[str] = []
    depth, start, i = 0, m.end(), m.end()
    while i < len(body):
        ch = body[i]
        if ch == '"':
            i += 1
            while body[i] != '"':
                i += 2 if body[i] == "\\" else 1
        elif ch == "<" and re.search(r"(?:\d|AT_FDCWD)$", body[start:i]):
            i = body.index(">", i)
        elif ch in "([{":
            depth += 1
        elif ch in "}])" and depth:
            depth -= 1
        elif ch == ")":
            if body[start:i].strip():
                args.append(body[start:i].strip())
            return m.group(1), args, body[i + 1:]
        elif ch == "," and depth == 0:
            args.append(body[start:i].strip())
            start = i + 1
        i += 1
    raise ValueError(f"no closing parenthesis: {body}")


def fd_path(token: str) -> str | None:
    """The path strace printed for a descriptor (``5</x>``, ``AT_FDCWD</x>``), if any."""
    m = _FD.fullmatch(token)
    if m is None or m.group(2) is None:
        return None
    path = unescape(m.group(2))
    if not path.startswith("/"):
        return None          # socket:[..], pipe:[..], anon_inode:...
    return path.removesuffix(" (deleted)")


@dataclass(frozen=True)
class Target:
    """One path a syscall created, changed or removed (or tried to)."""

    pid: int
    syscall: str
    path: str               # absolute, normalised
    line: str
    opened: str | None = None   # for a successful open: the file the kernel opened


@dataclass
class Audit:
    """Feed it strace lines; it collects every modified path and every problem."""

    initial_cwd: str
    targets: list[Target] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    opened: list[str] = field(default_factory=list)     # every path opened (read or write)
    _pending: dict[int, str] = field(default_factory=dict)
    _cwd: dict[int, str] = field(default_factory=dict)  # pid -> cwd strace last printed
    _cwd_changed: bool = False

    def feed(self, lines: Iterable[str]) -> Audit:
        for raw in lines:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            m = _LINE.fullmatch(line)
            if m is None:
                self.problems.append(f"unparsed line: {line}")
                continue
            pid, body = int(m.group(1)), m.group(2)
            if body.startswith(("+++ ", "--- ")):
                continue              # exit and signal notes
            if body == "???( <detached ...>":
                # strace lost a thread that was exiting (or detached at the end)
                # before it could even read which call it was in: no arguments,
                # no result, nothing done on its behalf after it
                continue
            if body.endswith(" <unfinished ...>"):
                self._pending[pid] = body.removesuffix(" <unfinished ...>")
                continue
            resumed = re.match(r"<\.\.\. [a-z_0-9]+ resumed>", body)
            if resumed is not None:
                if pid not in self._pending:
                    self.problems.append(f"resumed without a start: {line}")
                    continue
                body = self._pending.pop(pid) + body[resumed.end():]
            try:
                self._syscall(pid, body)
            except (Unresolved, ValueError, IndexError) as exc:
                self.problems.append(f"{type(exc).__name__}: {exc} in: {line}")
        for pid, body in self._pending.items():
            self.problems.append(f"never resumed: {pid} {body}")
        self._pending.clear()
        return self

    def _syscall(self, pid: int, body: str) -> None:
        name, args, rest = split_call(body)
        result = _RESULT.match(rest)
        if result is None:
            raise ValueError("no result")
        ok = not result.group(1).startswith(("-", "?"))
        for arg in args:
            if arg.startswith("AT_FDCWD<") and (cwd := fd_path(arg)) is not None:
                self._cwd[pid] = cwd
        if name in ("chdir", "fchdir"):
            if ok:
                self._cwd_changed = True
                self._cwd.clear()
            return
        if name in READ_ONLY:
            return
        if name in UNAUDITABLE:
            raise Unresolved(f"{name} cannot be audited")
        if name in OPENS:
            dirfd, path, flags = OPENS[name]
            flag_text = args[flags]
            if name == "openat2":
                how = re.search(r"flags=([A-Z_0-9|x]+)", flag_text)
                flag_text = how.group(1) if how else "?"
            opened = fd_path(result.group(0).split("=", 1)[1].strip()) if ok else None
            if opened is not None:
                self.opened.append(opened)
            if not set(flag_text.split("|")) <= READ_FLAGS:
                self._add(pid, name, body, self._resolve(pid, dirfd, args, path), opened)
        elif name in PATH_WRITES:
            for dirfd, path in PATH_WRITES[name]:
                self._add(pid, name, body, self._resolve(pid, dirfd, args, path))
        elif name in FD_WRITES:
            where = fd_path(args[0])
            if where is None:
                raise Unresolved(f"descriptor without a path: {args[0]}")
            self._add(pid, name, body, where)
        elif name == "bind":
            if "sa_family=AF_UNIX" in args[1]:
                sun = re.search(r'sun_path=(@?)("(?:[^"\\]|\\.)*")', args[1])
                if sun is not None and not sun.group(1):     # @: abstract, no file
                    self._add(pid, name, body, self._resolve(pid, None, [sun.group(2)], 0))
        else:
            raise Unresolved(f"syscall {name} not classified by this audit")

    def _resolve(self, pid: int, dirfd: int | None, args: list[str], index: int) -> str:
        token = args[index]
        if token == "NULL" and dirfd is not None:      # utimensat(fd, NULL, ...): the fd
            base = fd_path(args[dirfd])
            if base is None:
                raise Unresolved(f"descriptor without a path: {args[dirfd]}")
            return os.path.normpath(base)
        m = _STRING.fullmatch(token)
        if m is None:
            raise Unresolved(f"not a whole path string: {token[:80]}")
        path = unescape(m.group(1))
        if path.startswith("/"):
            return os.path.normpath(path)
        if dirfd is not None:
            base = fd_path(args[dirfd])
            if base is None:
                raise Unresolved(f"relative path {path!r} against {args[dirfd]}")
        elif not self._cwd_changed:
            base = self.initial_cwd        # nobody changed directory: every process's cwd
        elif pid in self._cwd:
            base = self._cwd[pid]          # printed by this pid since the last chdir
        else:
            raise Unresolved(f"relative path {path!r} after a chdir, cwd unknown")
        return os.path.normpath(os.path.join(base, path))

    def _add(self, pid: int, name: str, body: str, path: str, opened: str | None = None) -> None:
        self.targets.append(Target(pid, name, path, body, opened))


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def violations(audit: Audit, root: str) -> list[str]:
    """Every target outside ``root`` and ``ALLOWED``, lexically and on disk
    (an existing parent resolved through symlinks, the file an open really
    opened), and every file opened for writing that shares its inode (a hard
    link) with a name that may lie elsewhere."""
    out = []
    for t in audit.targets:
        if t.path in ALLOWED:
            continue
        parent, name = os.path.split(t.path)
        where = [t.path, t.opened or t.path,
                 os.path.join(os.path.realpath(parent), name)]   # through symlinks
        if not all(inside(p, root) for p in where):
            out.append(f"{t.path}: {t.line}")
        elif t.opened and os.path.isfile(t.opened) and os.stat(t.opened).st_nlink != 1:
            out.append(f"{t.opened} (a hard link, opened for writing): {t.line}")
    return out


# -- the parser on synthetic lines ----------------------------------------------------------

def _audit(*lines: str, cwd: str = "/work") -> Audit:
    return Audit(cwd).feed(lines)


def test_parser_flags_writes_outside_and_only_writes() -> None:
    audit = _audit(
        '10 openat(AT_FDCWD</work>, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 3</etc/passwd>',
        '10 openat(AT_FDCWD</work>, "/etc/lpmos.toml", O_WRONLY|O_CREAT|O_TRUNC, 0666)'
        ' = 3</etc/lpmos.toml>',
        '10 openat(AT_FDCWD</work>, "rel", O_RDWR|O_CLOEXEC) = -1 ENOENT (No such file)',
        '10 mkdirat(5</var/lib>, "lpmos", 0777) = 0',
        '10 newfstatat(AT_FDCWD</work>, "/state/x", {st_mode=S_IFREG|0644}, 0) = 0',
        '10 rename("/state/a", "/tmp/b") = 0',
        '10 link("/usr/lib/ipxe/undionly.kpxe", "/state/tftp/undionly.kpxe") = 0',
        '10 unlinkat(AT_FDCWD</work>, "/state/etcd/data/member/.touch", 0) = 0',
        '10 utimensat(7</home/x>, NULL, NULL, 0) = 0',
        '10 fchmod(4</root/.cache/f>, 0600) = 0',
        '10 openat2(AT_FDCWD</work>, "/run/x", {flags=O_RDWR|O_CREAT, mode=0600}, 24) = 3</run/x>',
        '10 bind(3<socket:[1]>, {sa_family=AF_UNIX, sun_path="s.sock"}, 110) = 0',
        '10 bind(3<socket:[2]>, {sa_family=AF_UNIX, sun_path=@"abstract"}, 11) = 0',
        '10 bind(3<socket:[3]>, {sa_family=AF_INET, sin_port=htons(0)}, 16) = 0',
        '10 --- SIGTERM {si_signo=SIGTERM} ---',
        '10 +++ exited with 0 +++',
    )
    assert audit.problems == []
    assert [t.path for t in audit.targets] == [
        "/etc/lpmos.toml", "/work/rel", "/var/lib/lpmos", "/state/a", "/tmp/b",
        "/state/tftp/undionly.kpxe", "/state/etcd/data/member/.touch", "/home/x",
        "/root/.cache/f", "/run/x", "/work/s.sock"]
    assert audit.opened == ["/etc/passwd", "/etc/lpmos.toml", "/run/x"]
    bad = [v.split(":")[0] for v in violations(audit, "/state")]
    assert bad == ["/etc/lpmos.toml", "/work/rel", "/var/lib/lpmos", "/tmp/b", "/home/x",
                   "/root/.cache/f", "/run/x", "/work/s.sock"]


def test_parser_skips_a_thread_detached_mid_call_but_nothing_else_unknown() -> None:
    audit = _audit("2637  ???( <detached ...>")
    assert audit.problems == []
    audit = _audit("2637  ???(0x1, 0x2) = 0")
    assert audit.problems


def test_parser_merges_unfinished_calls_and_decodes_escapes() -> None:
    audit = _audit(
        '11 openat(AT_FDCWD</w>, "/tmp/we,ird\\76d/\\303\\251\\n", O_WRONLY|O_CREAT'
        ' <unfinished ...>',
        '12 mkdir("/state/ok", 0777) = 0',
        '11 <... openat resumed>, 0600) = 3</tmp/we,ird\\76d/\\303\\251\\n>',
        '13 renameat2(4</a,b\\76c>, "x", AT_FDCWD</w>, "y", RENAME_NOREPLACE) = 0',
    )
    assert audit.problems == []
    assert [t.path for t in audit.targets] == ["/state/ok", "/tmp/we,ird>d/é\n",
                                               "/a,b>c/x", "/w/y"]


def test_parser_fails_on_what_it_cannot_resolve() -> None:
    audit = _audit(
        '20 mkdirat(5, "x", 0777) = 0',                                   # dirfd, no path
        '20 openat(7<socket:[9]>, "x", O_WRONLY) = -1 ENOTDIR',           # not a directory
        '20 chdir("/elsewhere") = 0',
        '21 mkdir("relative", 0777) = 0',                                 # cwd unknown now
        '20 unlink("/state/' + "a" * 20 + '"..., 0) = 0',                 # truncated string
        '20 fchown(3, 0, 0) = 0',
        '20 io_uring_setup(8, {...}) = 3',
        '20 frobnicate("/state/x") = 0',                                  # unknown syscall
        '20 <... openat resumed>) = 3',
        '20 garbage',
        '21 openat(AT_FDCWD</w>, "x", O_RDONLY <unfinished ...>',
    )
    assert len(audit.problems) == 10, audit.problems
    assert audit.targets == []
    # after a chdir, a pid's relative path resolves against the cwd strace printed for it
    audit = _audit('20 chdir("/b") = 0',
                   '21 openat(AT_FDCWD</b>, "/x", O_RDONLY) = 3</x>',
                   '21 mkdir("d", 0777) = 0')
    assert audit.problems == [] and [t.path for t in audit.targets] == ["/b/d"]


def test_parser_sees_through_symlinks_and_hard_links(tmp_path: Path) -> None:
    state, outside = tmp_path / "state", tmp_path / "outside"
    state.mkdir()
    outside.mkdir()
    (state / "escape").symlink_to(outside)
    (outside / "f").write_text("x")
    os.link(outside / "f", state / "linked")
    audit = _audit(f'1 mkdir("{state}/escape/d", 0777) = 0',
                   f'1 openat(AT_FDCWD</>, "{state}/escape/f", O_WRONLY) = 3<{outside}/f>',
                   f'1 openat(AT_FDCWD</>, "{state}/linked", O_WRONLY) = 3<{state}/linked>')
    assert audit.problems == []
    assert len(violations(audit, str(state))) == 3


# -- the whole node -------------------------------------------------------------------------

@functools.cache
def _strace_works() -> str | None:
    """Why this test cannot run here, or None."""
    if shutil.which("strace") is None:
        return "strace missing: run 'make setup' (Debian package strace)"
    probe = subprocess.run([*strace_cmd(Path(os.devnull)), "true"], capture_output=True,
                           text=True, timeout=30)
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace refused?): {probe.stderr.strip()[:200]}"
    return None


needs_strace = pytest.mark.skipif(_strace_works() is not None,
                                  reason=str(_strace_works()))


@needs_strace
def test_the_trace_and_parser_catch_a_real_write_outside(tmp_path: Path) -> None:
    """The same strace command and parser on a real process that writes outside."""
    state, outside, cwd = tmp_path / "state", tmp_path / "outside", tmp_path / "cwd"
    for d in (state, outside, cwd):
        d.mkdir()
    program = (f"import os\nopen({str(state / 'in')!r}, 'w').close()\n"
               f"os.chdir({str(outside)!r})\nopen('rel', 'w').close()\nos.mkdir('d')\n"
               f"os.rename({str(state / 'in')!r}, 'moved')\n")
    log = tmp_path / "trace.log"
    subprocess.run([*strace_cmd(log), sys.executable, "-c", program], cwd=cwd, check=True,
                   timeout=60, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    audit = Audit(str(cwd)).feed(log.read_text().splitlines())
    assert audit.problems == []
    bad = {v.split(": ")[0] for v in violations(audit, str(state))}
    assert bad == {str(outside / "rel"), str(outside / "d"), str(outside / "moved")}


def _children(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


@dataclass
class TracedRegional(Regional):
    """:class:`Regional` of the reliability suite, started under strace with
    the embedded etcd; ``node_pid`` is the node itself (strace's child)."""

    node_pid: int = 0

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    def command(self, catalog: Path) -> list[str]:
        # etcd_url "": the embedded etcd under the state dir
        return [*strace_cmd(self.workdir / "strace.log"), *super().command(catalog)]

    def spawn(self, cmd: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        cwd = self.workdir / "cwd"      # empty, not the state dir: a relative write shows
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
        # Python's own bytecode cache (__pycache__/*.pyc of the source tree) is
        # not the node's doing; a deployed node runs precompiled.
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)

    def start(self, *, wait_for: tuple[str, ...] = ("ok",), timeout: float = 40.0) -> Regional:
        super().start(wait_for=wait_for, timeout=timeout)
        assert self.proc is not None
        kids = _children(self.proc.pid)
        assert len(kids) == 1, kids
        self.node_pid = kids[0]
        return self

    def stop(self) -> None:
        """SIGTERM to the node (not strace); strace ends when its last tracee does."""
        os.kill(self.node_pid, signal.SIGTERM)

    def kill(self) -> None:
        """Teardown after a failure: the node, the etcd it started, then strace
        (a tracee outliving strace would run on untraced)."""
        if not self.node_pid and self.proc is not None and self.proc.poll() is None:
            self.node_pid = next(iter(_children(self.proc.pid)), 0)
        if self.node_pid and _pid_alive(self.node_pid):
            os.kill(self.node_pid, signal.SIGKILL)
        endpoint = self.state / "etcd" / "endpoint.json"
        if endpoint.exists():
            pid = int(json.loads(endpoint.read_text())["pid"])
            if _pid_alive(pid) and _is_our_etcd(pid, self.state / "etcd" / "data"):
                os.kill(pid, signal.SIGKILL)
        super().kill()


MAC_AGENT, MAC_NEW = "52:54:00:f5:00:01", "52:54:00:f5:00:02"


def _traffic(node: TracedRegional) -> None:
    """Every service once, and an install claimed and reported by an agent."""
    ipxe = Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
    # TFTP (curl is a real client)
    got = node.tftp("undionly.kpxe", node.workdir / "undionly.kpxe")
    assert hashlib.sha256(got).digest() == hashlib.sha256(ipxe).digest()
    # ProxyDHCP: a DISCOVER on the DHCP port (answered to our source address) ...
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(dhcp.build_request(MAC_NEW, dhcp.DISCOVER, xid=41, arch=0), ("127.0.0.1",
                                                                     node.ports["dhcp"]))
        offer = dhcp.parse_packet(s.recv(2048))
    assert offer.xid == 41 and offer.msg_type == dhcp.OFFER
    assert offer.file.rstrip(b"\0") == b"undionly.kpxe"
    # ... and a UEFI REQUEST on the boot-server port
    assert node.proxy_dhcp(MAC_NEW, 42).file.rstrip(b"\0") == b"ipxe.efi"
    # boot HTTP: the constant script, a discovery script, an iPXE binary, the live kernel
    r = requests.get(node.url + "/boot.ipxe", timeout=10)
    assert r.status_code == 200 and r.text.startswith("#!ipxe")
    r = requests.get(f"{node.url}/boot/{MAC_NEW}.ipxe", timeout=10)
    assert r.status_code == 200 and decision_of(r.text) == "discovery", r.text
    assert requests.get(node.url + "/ipxe/undionly.kpxe", timeout=10).content == ipxe
    assert requests.get(node.url + "/images/live/vmlinuz", timeout=10).status_code == 200
    # an agent registers, its approved task is claimed (CAS in etcd), it reports
    reg = register(node.url, "FSA-1", MAC_AGENT, "")
    assert reg.status_code == 200, reg.text
    token = reg.json()["token"]
    client_url = json.loads((node.state / "etcd" / "endpoint.json").read_text())["client_url"]
    store = EtcdStore([client_url], timeout=2.0)
    try:
        tasks = TaskService(store, Keys())
        tasks.create(Task(idc=IDC, sn="FSA-1", mac=MAC_AGENT, os_type="Lab OS"), by="alice")
        tasks.transition(IDC, "FSA-1", "approved", by="bob")

        def claimed() -> bool:
            r = requests.get(node.url + "/agent/v1/task", params={"sn": "FSA-1"},
                             headers=auth(token), timeout=30)
            return r.status_code == 200 and r.json()["action"] == "install"

        eventually(claimed, what="install claimed")
        evs = [{"source": "agent", "seq": 1, "kind": "state", "status": "installing",
                "message": "start"}, *progress(2, 3)]
        r = requests.post(node.url + "/agent/v1/events", json={"sn": "FSA-1", "events": evs},
                          headers=auth(token), timeout=30)
        assert r.json()["acked"] == ["agent:1", "agent:2", "agent:3"], r.text
        r = requests.post(node.url + "/agent/v1/heartbeat",
                          json={"sn": "FSA-1", "state": "installing"},
                          headers=auth(token), timeout=30)
        assert r.status_code == 200, r.text
        stored = tasks.get(IDC, "FSA-1")
        assert stored is not None and stored.task.status == "installing"
    finally:
        store.close()
    # ops
    assert node.metric("lpmos_http_boot_constant_total") == 1
    assert requests.get(node.url + "/healthz", timeout=10).json()["status"] == "ok"


@needs_strace
def test_whole_node_run_writes_nothing_outside_its_state_dir(tmp_path: Path) -> None:
    """Start (embedded etcd, TFTP root filled), traffic, SIGTERM: every path
    written by the node, its threads and its etcd lies in the state dir."""
    node = TracedRegional("", "/os", tmp_path, name="node-fsa")
    try:
        node.start()
        _traffic(node)
        node.stop()
        # strace exits when its last tracee does, with the node's exit status
        assert node.proc is not None and node.proc.wait(30) == 0, node.log()
    finally:
        node.kill()
    root = os.path.realpath(node.state)
    audit = Audit(str(tmp_path / "cwd")).feed(
        (tmp_path / "strace.log").read_text(errors="surrogateescape").splitlines())
    assert audit.problems == [], "\n".join(audit.problems[:20])
    bad = violations(audit, root)
    assert not bad, f"written outside {root}:\n" + "\n".join(bad)
    # the trace saw the node at work: its etcd's WAL, the TFTP root it filled,
    # the spool, and the TFTP transfer's file (read, from the traced process)
    written = {t.path for t in audit.targets}
    for part in ("/etcd/data/member/wal", "/tftp/undionly.kpxe", "/spool"):
        assert any(p.startswith(root + part) for p in written), part
    assert root + "/tftp/undionly.kpxe" in audit.opened
