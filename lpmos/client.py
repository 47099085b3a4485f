"""The control plane's REST API seen from outside: an HTTP client, the
profiles file that ``lpmos login`` writes, and the exit codes of the client
commands (:mod:`lpmos.cli_client`).

Stdlib only (``urllib``, ``tomllib``): the client works on any install of
the package, against a control plane on another host.  Every call has a
deadline; an answer the API did not give (refused connection, timeout,
TLS failure) becomes :class:`Unavailable`, an error answer becomes
:class:`ApiRefused` with the API's ``{"error", "detail"}``.  Both carry the
exit code the command returns, so a script can tell what went wrong without
parsing text.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import tempfile
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# -- exit codes ---------------------------------------------------------------------

EXIT_OK = 0
EXIT_FAILURE = 1        # anything else: an answer the client does not understand
EXIT_USAGE = 2          # bad flags, no profile, a local file that cannot be read
EXIT_AUTH = 3           # 401/403: unknown or revoked token, or a role too low
EXIT_NOT_FOUND = 4      # 404: no such task, server, template or log
EXIT_CONFLICT = 5       # 409: the object changed or is not in the state the call needs
EXIT_UNAVAILABLE = 6    # no answer, a timeout, 429 or 5xx: try again later
EXIT_INVALID = 7        # 400/413/422: the API refused the input

#: (code, what it means) in the order the help shows them
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "an unexpected answer"),
    (EXIT_USAGE, "usage: bad flags, no profile, an unreadable local file"),
    (EXIT_AUTH, "authentication or permission (HTTP 401, 403)"),
    (EXIT_NOT_FOUND, "not found (HTTP 404)"),
    (EXIT_CONFLICT, "conflict: changed meanwhile or in the wrong state (HTTP 409)"),
    (EXIT_UNAVAILABLE, "unavailable: no connection, timeout, HTTP 429 or 5xx"),
    (EXIT_INVALID, "bad input (HTTP 400, 413, 422)"),
)


def exit_code_for_status(status: int) -> int:
    """The exit code of an HTTP error status (pure)."""
    if status in (401, 403):
        return EXIT_AUTH
    if status == 404:
        return EXIT_NOT_FOUND
    if status == 409:
        return EXIT_CONFLICT
    if status in (400, 413, 422):
        return EXIT_INVALID
    if status == 429 or status >= 500:
        return EXIT_UNAVAILABLE
    return EXIT_FAILURE


class ClientError(Exception):
    """A call that did not succeed; ``exit_code`` is the command's."""

    exit_code = EXIT_FAILURE


class Unavailable(ClientError):
    """No answer from the API: refused, reset, timed out, TLS or DNS failure."""

    exit_code = EXIT_UNAVAILABLE


class ApiRefused(ClientError):
    """The API answered with an error status; ``error`` and ``detail`` are
    its own words (``body`` the whole decoded answer)."""

    def __init__(self, status: int, error: str, detail: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status} {error}: {detail}" if detail else f"HTTP {status} {error}")
        self.status = status
        self.error = error
        self.detail = detail
        self.body = body
        self.exit_code = exit_code_for_status(status)


class ProfileError(ClientError):
    """No usable profile, or a profiles file that cannot be read or written."""

    exit_code = EXIT_USAGE


# -- HTTP ---------------------------------------------------------------------------

MAX_ANSWER_BYTES = 64 << 20      # the largest answer read (a full install log is ~1 MiB)


class ApiClient:
    """JSON calls to one control plane: ``base_url`` (``http(s)://host:port``,
    the API is under ``/api/v1``) with a bearer token.  Not thread-safe to
    share across changes of ``token``; otherwise stateless."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 10.0,
                 cafile: str | None = None) -> None:
        self.base_url = normalize_url(base_url)
        self.token = token
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=cafile) if cafile else None

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """The absolute URL of an API ``path`` (``/tasks``); ``query``
        values that are ``None`` or empty are left out."""
        url = f"{self.base_url}/api/v1{path}"
        if query:
            pairs = [(k, str(v)) for k, v in query.items() if v not in (None, "")]
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        return url

    def call(self, method: str, path: str, body: Any = None,
             query: Mapping[str, Any] | None = None) -> Any:
        """The decoded JSON answer of one call (``None`` when empty).
        ApiRefused for an error status, Unavailable when there is no answer."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url(path, query), data=data,  # noqa: S310
                                     method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout,  # noqa: S310
                                        context=self._ssl) as resp:
                return _decode(resp.read(MAX_ANSWER_BYTES + 1), resp.status)
        except urllib.error.HTTPError as exc:
            raise _refused(exc.code, str(exc.reason), exc.read(MAX_ANSWER_BYTES)) from None
        except urllib.error.URLError as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {_reason(exc.reason)}") from None
        except TimeoutError:
            raise Unavailable(f"{self.base_url} did not answer within {self.timeout:g} s") \
                from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {_reason(exc)}") from None

    def upload(self, path: str, file: Path, *,
               progress: Callable[[int, int], None] | None = None,
               timeout: float = 120.0) -> Any:
        """PUT ``file``'s bytes to API ``path``, streamed in 1 MiB blocks
        (never read whole), ``progress(sent, total)`` after each; the
        decoded JSON answer, or the errors of :meth:`call`.  ``timeout``
        bounds each socket operation, not the whole upload."""
        url = urllib.parse.urlsplit(self.url(path))
        total = file.stat().st_size
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.netloc, timeout=timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(url.netloc, timeout=timeout)
        target = url.path + (f"?{url.query}" if url.query else "")
        try:
            conn.putrequest("PUT", target)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(total))
            conn.putheader("Accept", "application/json")
            if self.token:
                conn.putheader("Authorization", f"Bearer {self.token}")
            conn.endheaders()
            sent = 0
            with file.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    conn.send(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress(sent, total)
            resp = conn.getresponse()
            raw = resp.read(MAX_ANSWER_BYTES + 1)
        except (BrokenPipeError, ConnectionResetError):
            # the server answered early (a refusal) and closed: read it if we can
            try:
                resp = conn.getresponse()
                raw = resp.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException) as exc:
                raise Unavailable(f"{self.base_url} closed the upload: {_reason(exc)}") \
                    from None
        except TimeoutError:
            raise Unavailable(f"{self.base_url} did not answer within {timeout:g} s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unavailable(f"cannot reach {self.base_url}: {_reason(exc)}") from None
        finally:
            conn.close()
        if resp.status >= 400:
            raise _refused(resp.status, str(resp.reason), raw[:MAX_ANSWER_BYTES])
        return _decode(raw, resp.status)


def _refused(status: int, reason: str, raw: bytes) -> ApiRefused:
    """The error of an answer with an error ``status``: its JSON
    ``{"error", "detail"}`` when it has one, else its text."""
    try:
        answer: Any = json.loads(raw)
    except ValueError:
        answer = raw.decode(errors="replace").strip()
    if isinstance(answer, dict):
        return ApiRefused(status, str(answer.get("error", reason)),
                          str(answer.get("detail", "")), answer)
    return ApiRefused(status, reason, str(answer)[:200], answer)


def _decode(raw: bytes, status: int) -> Any:
    if len(raw) > MAX_ANSWER_BYTES:
        raise ClientError(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError(f"HTTP {status} with a body that is not JSON (is this the "
                          "control plane's URL?)") from None


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def normalize_url(url: str) -> str:
    """``url`` as a base URL: scheme http or https, a host, no query; the
    trailing ``/`` and a trailing ``/api/v1`` removed.  ValueError else."""
    url = url.strip()
    if "://" not in url:
        raise ValueError(f"{url!r}: give the control plane's URL, e.g. http://127.0.0.1:8080")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment")
    path = parts.path.rstrip("/").removesuffix("/api/v1").rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


# -- profiles ---------------------------------------------------------------------

PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class Profile:
    name: str
    url: str
    token: str


@dataclass
class Profiles:
    """What the profiles file holds: profiles by name and the default's name."""

    profiles: dict[str, Profile]
    default: str = ""

    def choose(self, name: str | None) -> Profile:
        """The profile ``name``, else the default, else the only one."""
        wanted = name or self.default or (next(iter(self.profiles)) if len(self.profiles) == 1
                                          else "")
        if not wanted:
            if not self.profiles:
                raise ProfileError("no profile: run 'lpmos login URL --token TOKEN' first")
            raise ProfileError("several profiles and no default: pass --profile NAME "
                               f"(one of {', '.join(sorted(self.profiles))})")
        if wanted not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ProfileError(f"no profile named {wanted!r} (profiles: {known}); "
                               "'lpmos login URL --profile NAME' adds one")
        return self.profiles[wanted]


def profiles_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$LPMOS_CLIENT_CONFIG``, else ``$XDG_CONFIG_HOME/lpmos/profiles.toml``,
    else ``~/.config/lpmos/profiles.toml``."""
    environ = os.environ if environ is None else environ
    if environ.get("LPMOS_CLIENT_CONFIG"):
        return Path(environ["LPMOS_CLIENT_CONFIG"])
    base = Path(environ["XDG_CONFIG_HOME"]) if environ.get("XDG_CONFIG_HOME") \
        else Path.home() / ".config"
    return base / "lpmos" / "profiles.toml"


def parse_profiles(text: str) -> Profiles:
    """The profiles of a profiles file's text (pure); ProfileError names
    what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"not TOML: {exc}") from None
    default = data.get("default", "")
    if not isinstance(default, str):
        raise ProfileError("'default' must be a profile name")
    table = data.get("profiles", {})
    if not isinstance(table, dict):
        raise ProfileError("[profiles] must be a table")
    profiles = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or \
                not isinstance(entry.get("token", ""), str):
            raise ProfileError(f"profile {name!r}: needs url and token strings")
        profiles[name] = Profile(name, entry["url"], entry.get("token", ""))
    return Profiles(profiles, default)


def _toml_string(value: str) -> str:
    """A TOML basic string (json's escapes are TOML's, control characters too)."""
    return json.dumps(value, ensure_ascii=False)


def render_profiles(profiles: Profiles) -> str:
    """The profiles file's text (pure); :func:`parse_profiles` reads it back."""
    lines = ["# lpmos client profiles, written by 'lpmos login'. It holds API tokens:",
             "# keep it mode 0600.", ""]
    if profiles.default:
        lines += [f"default = {_toml_string(profiles.default)}", ""]
    for name in sorted(profiles.profiles):
        p = profiles.profiles[name]
        lines += [f"[profiles.{_toml_string(name)}]", f"url = {_toml_string(p.url)}",
                  f"token = {_toml_string(p.token)}", ""]
    return "\n".join(lines)


def read_profiles(path: Path) -> Profiles:
    """The profiles in ``path`` (none when it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Profiles({})
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from None
    try:
        return parse_profiles(text)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None


def write_profiles(path: Path, profiles: Profiles) -> None:
    """Replace ``path`` with ``profiles``, atomically and mode 0600 from the
    start (the temporary file is created 0600, so the tokens are never
    readable by others, not even for a moment); a new directory is 0700."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".profiles-", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(render_profiles(profiles))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ProfileError(f"cannot write {path}: {exc}") from None


def validate_profile_name(name: str) -> str:
    if not PROFILE_NAME_RE.fullmatch(name):
        raise ProfileError(f"profile name {name!r}: 1-64 of A-Z, a-z, 0-9, '.', '_', '-'")
    return name
