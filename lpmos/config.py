"""Configuration: one table of settings, four sources, provenance kept.

Precedence (highest first): command-line flag > ``LPMOS_*`` environment
variable > TOML file (``--config``, default ``/etc/lpmos/lpmos.toml`` when it
exists) > built-in default.

Every setting is declared once as a :class:`Setting` (its TOML key, flag,
environment variable, type, default and help).  Each package declares the
settings it owns (``lpmos.config.COMMON``, ``bootsvc.settings.SETTINGS`` ...);
the CLI adds a flag per setting to the subcommands that use it, and
:func:`resolve` turns flags, environment and file into a :class:`Config`
whose values are parsed and validated.  A bad value raises
:class:`ConfigError` with one line naming the setting, the source and what is
allowed; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = Path("/etc/lpmos/lpmos.toml")

Parser = Callable[[Any], Any]


class ConfigError(ValueError):
    """A setting has a value that is not allowed.  ``str()`` is one line."""


#: keys LPMOS once read and no longer does, with what an operator should know
RETIRED: dict[str, str] = {
    "tftp.lockstep_threads": "removed; every TFTP transfer is driven from the event loop, "
                             "which busy-polls for ACKs for tftp.spin_us",
}


# --- value parsers -----------------------------------------------------------
# Each takes the raw value (a string from a flag or the environment, or a TOML
# value) and returns the parsed value or raises ValueError("allowed: ...").


def parse_str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("a string")
    return raw


def parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("true or false")


def int_range(lo: int, hi: int) -> Parser:
    def parse(raw: Any) -> int:
        # a float (TOML ``9.7``) is refused, not cut to 9, as "9.7" from a flag is
        if isinstance(raw, bool | float):
            raise ValueError(f"an integer from {lo} to {hi}")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise ValueError(f"an integer from {lo} to {hi}") from None
        if not lo <= value <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return value

    return parse


def float_range(lo: float, hi: float) -> Parser:
    def parse(raw: Any) -> float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"a number from {lo:g} to {hi:g}") from None
        if not lo <= value <= hi:
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return value

    return parse


def choice(*options: str) -> Parser:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in options:
            raise ValueError("one of " + ", ".join(options))
        return text

    parse.choices = options  # type: ignore[attr-defined]  # for --help's metavar
    return parse


def str_list(raw: Any) -> list[str]:
    """A comma-separated string or a TOML list of strings."""
    if isinstance(raw, list):
        items = [str(x).strip() for x in raw]
    elif isinstance(raw, str):
        items = [x.strip() for x in raw.split(",")]
    else:
        raise ValueError("a comma-separated list")
    return [x for x in items if x]


def choice_list(*options: str) -> Parser:
    def parse(raw: Any) -> list[str]:
        items = [x.lower() for x in str_list(raw)]
        bad = [x for x in items if x not in options]
        if bad or not items:
            raise ValueError("a comma-separated list of " + ", ".join(options))
        return items

    return parse


def parse_path(raw: Any) -> Path:
    if not isinstance(raw, str | Path) or not str(raw):
        raise ValueError("a file system path")
    return Path(raw)


def parse_optional_path(raw: Any) -> Path | None:
    if raw in (None, ""):
        return None
    return parse_path(raw)


def parse_ip(raw: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(raw).strip()))
    except ValueError:
        raise ValueError("an IP address such as 192.0.2.10") from None


def parse_optional_ip(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    return parse_ip(raw)


def parse_hostport(raw: Any) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
    text = str(raw).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("HOST:PORT such as 127.0.0.1:8080")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ValueError("HOST:PORT such as 127.0.0.1:8080") from None
    if not 0 <= number <= 65535:
        raise ValueError("HOST:PORT with a port from 0 to 65535")
    return host, number


def parse_endpoints(raw: Any) -> list[str]:
    """etcd endpoints: ``http(s)://host:port`` or ``host:port``, comma list."""
    result = []
    for item in str_list(raw):
        url = item if "://" in item else "http://" + item
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
            raise ValueError("a comma list of http(s)://HOST:PORT")
        result.append(f"{parts.scheme}://{parts.hostname}:{parts.port}")
    return result


def parse_url(raw: Any) -> str:
    text = str(raw).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("an http:// or https:// URL")
    return text.rstrip("/")


def parse_optional_url(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    return parse_url(raw)


def parse_name(raw: Any) -> str:
    """An identifier such as an IDC or node name: [a-z0-9][a-z0-9._-]{0,62}."""
    from lpmos.models import validate_name

    try:
        return validate_name(str(raw), "name")
    except Exception as exc:  # ValidationError carries its own wording
        raise ValueError(str(exc)) from None


def parse_optional_str(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    return parse_str(raw)


# --- the setting table -------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configurable value.

    ``key`` is its TOML key (``section.name`` or a top-level ``name``); the
    environment variable is ``LPMOS_`` + the key upper-cased with dots as
    underscores, unless ``env`` says otherwise.
    """

    key: str
    flag: str
    default: Any
    parse: Parser
    help: str
    env: str = ""
    metavar: str | None = None
    secret: bool = False

    @property
    def env_var(self) -> str:
        return self.env or "LPMOS_" + self.key.replace(".", "_").upper()

    @property
    def dest(self) -> str:
        return self.key.replace(".", "__")


def parsed_defaults(settings: Sequence[Setting]) -> dict[str, Any]:
    """Each setting's default, parsed as a value from any source would be
    (so ``"127.0.0.1:8080"`` is the tuple a flag would give)."""
    return {s.key: s.parse(s.default) for s in settings}


COMMON: tuple[Setting, ...] = (
    Setting("state_dir", "--state-dir", "/var/lib/lpmos", parse_path,
            "directory for local state: the embedded etcd, spools, logs, TLS material",
            metavar="DIR"),
    Setting("log_level", "--log-level", "info", choice("debug", "info", "warning", "error"),
            "log verbosity"),
    Setting("etcd.endpoints", "--etcd-endpoints", [], parse_endpoints,
            "comma list of etcd client URLs (http(s)://HOST:PORT); empty starts or reuses a "
            "private etcd server on loopback with its data under the state directory",
            metavar="URLS"),
    Setting("etcd.prefix", "--etcd-prefix", "/os", parse_str,
            "key prefix of every LPMOS key in etcd", metavar="PREFIX"),
    Setting("etcd.timeout", "--etcd-timeout", 2.0, float_range(0.1, 60.0),
            "deadline in seconds of every etcd call; past it the call fails with "
            "StoreUnavailable instead of hanging", metavar="SECONDS"),
    Setting("etcd.ca", "--etcd-ca", None, parse_optional_path,
            "CA certificate (PEM) to verify etcd's TLS certificate", metavar="FILE"),
    Setting("etcd.cert", "--etcd-cert", None, parse_optional_path,
            "client certificate (PEM) for etcd mutual TLS", metavar="FILE"),
    Setting("etcd.key", "--etcd-key", None, parse_optional_path,
            "client private key (PEM) for etcd mutual TLS", metavar="FILE"),
    Setting("etcd.user", "--etcd-user", None, parse_optional_str,
            "etcd user name when etcd authentication is enabled", metavar="NAME"),
    Setting("etcd.password", "--etcd-password", None, parse_optional_str,
            "etcd password (prefer the LPMOS_ETCD_PASSWORD environment variable)",
            metavar="PASSWORD", secret=True),
    Setting("etcd.auto_compaction_mode", "--etcd-auto-compaction-mode", "periodic",
            choice("periodic", "revision"),
            "embedded etcd: how --etcd-auto-compaction-retention is read (a cluster's "
            "operator sets etcd's own --auto-compaction-mode)"),
    Setting("etcd.auto_compaction_retention", "--etcd-auto-compaction-retention", "5m",
            parse_str,
            "embedded etcd: history etcd keeps, a duration (periodic: 5m, 1h) or a number of "
            "revisions (revision); a watch further behind reloads its prefix",
            metavar="RETENTION"),
    Setting("etcd.quota_backend_bytes", "--etcd-quota-backend-bytes", 0,
            int_range(0, 8 * 1024**3),
            "embedded etcd: backend quota in bytes (0: etcd's default, 2 GiB); past it etcd "
            "raises the NOSPACE alarm and refuses writes", metavar="BYTES"),
    Setting("etcd.maintenance_interval", "--etcd-maintenance-interval", 10.0,
            float_range(0.2, 3600.0),
            "seconds between checks of etcd's alarms and database size (shown in /healthz "
            "and /metrics); the embedded etcd is also defragmented when that pays",
            metavar="SECONDS"),
    Setting("catalog", "--catalog", None, parse_optional_path,
            "image catalog TOML (default: images/catalog.toml of the source tree when present)",
            metavar="FILE"),
)


@dataclass
class Config:
    """Resolved settings: ``values[key]`` and where each came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    settings: dict[str, Setting] = field(default_factory=dict)
    config_file: Path | None = None
    #: every key the config file sets (dotted, leaves only)
    file_keys: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def with_values(self, **overrides: Any) -> Config:
        """A copy with some values replaced (keys with ``__`` for dots)."""
        values = dict(self.values)
        sources = dict(self.sources)
        for dest, value in overrides.items():
            key = dest.replace("__", ".")
            values[key] = value
            sources[key] = "override"
        return Config(values, sources, self.settings, self.config_file, self.file_keys)

    def describe(self) -> list[tuple[str, str, str]]:
        """(key, shown value, source) rows; secrets are masked."""
        rows = []
        for key in sorted(self.values):
            value = self.values[key]
            setting = self.settings.get(key)
            if setting is not None and setting.secret and value:
                shown = "********"
            elif isinstance(value, list):
                shown = ",".join(str(v) for v in value)
            elif isinstance(value, tuple) and len(value) == 2:      # HOST:PORT
                host = f"[{value[0]}]" if ":" in str(value[0]) else value[0]
                shown = f"{host}:{value[1]}"
            elif value is None:
                shown = ""
            else:
                shown = str(value)
            rows.append((key, shown, self.sources[key]))
        return rows


def _lookup(data: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of a TOML document's values (tables walked, not listed)."""
    keys = []
    for name, value in data.items():
        if isinstance(value, Mapping):
            keys += leaf_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def unknown_keys(keys: Iterable[str], known: Iterable[str]) -> list[str]:
    """One line per key that no setting reads: a typo (with the closest
    setting, when one is close) or a retired setting, both ignored."""
    known = set(known)
    lines = []
    for key in keys:
        if key in known:
            continue
        if key in RETIRED:
            lines.append(f"{key}: {RETIRED[key]}; ignored")
            continue
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{key}: no such setting, ignored{hint}")
    return lines


def load_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def resolve(
    settings: Iterable[Setting],
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Config:
    """Resolve every setting from flags, environment, file and defaults.

    ``flags`` maps :attr:`Setting.dest` to a value or ``None`` (not given).
    ``config_file`` of ``None`` means the default file, read only if it
    exists; an explicitly named file must exist.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    table = {s.key: s for s in settings}
    data: dict[str, Any] = {}
    used_file: Path | None = None
    if config_file is not None:
        data = load_file(config_file)
        used_file = config_file
    elif DEFAULT_CONFIG_FILE.exists():
        data = load_file(DEFAULT_CONFIG_FILE)
        used_file = DEFAULT_CONFIG_FILE
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, setting in table.items():
        flag_value = flags.get(setting.dest)
        found, file_value = _lookup(data, key)
        if flag_value is not None:
            raw, source = flag_value, f"flag {setting.flag}"
        elif setting.env_var in environ:
            raw, source = environ[setting.env_var], f"env {setting.env_var}"
        elif found:
            raw, source = file_value, f"file {used_file}"
        else:
            # a default goes through the parser like any value, so a setting
            # has one type whatever its source ("127.0.0.1:8080" -> a tuple)
            try:
                values[key] = setting.parse(setting.default)
            except ValueError as exc:
                raise RuntimeError(f"{key}: the default {setting.default!r} is not "
                                   f"allowed ({exc})") from None
            sources[key] = "default"
            continue
        try:
            values[key] = setting.parse(raw)
        except ValueError as exc:
            shown = "********" if setting.secret else repr(raw)
            raise ConfigError(
                f"{key}: {shown} from {source} is not allowed; expected {exc}"
            ) from None
        sources[key] = source
    return Config(values, sources, table, used_file, leaf_keys(data))


def settings_by_key(groups: Sequence[Iterable[Setting]]) -> list[Setting]:
    """Merge setting groups, refusing two settings with one key."""
    seen: dict[str, Setting] = {}
    for group in groups:
        for setting in group:
            if setting.key in seen and seen[setting.key] is not setting:
                raise RuntimeError(f"setting {setting.key} declared twice")
            seen[setting.key] = setting
    return list(seen.values())
