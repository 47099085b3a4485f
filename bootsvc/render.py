"""Template rendering: a sandboxed Jinja2 environment that fails loudly.

Contract (STYLE principle 7, RELIABILITY "bad input"):

* templates live under one directory (``templates/`` of the source tree by
  default) and are rendered by an :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`
  with :class:`jinja2.StrictUndefined`: a template cannot call unsafe
  attributes or mutate its inputs, and a missing variable raises
  :class:`RenderError` naming the template, the line and the variable;
* task and inventory values are *data*: Jinja never re-parses a value, so a
  task field holding ``{{ 7*7 }}`` renders as those eleven characters;
* single-line slots go through a filter that refuses or neutralises
  newlines and control characters:

  ``line``    refuse (RenderError) a value holding a control character;
  ``ipxe``    percent-encode everything outside a small safe set, so
              ``${...}``, ``#!ipxe``, ``;``, ``||`` and spaces are inert in
              an iPXE command line (the form is also a valid URI part);
  ``ipxe_text`` free text for ``echo``: anything but a plain character set
              becomes ``?``;
  ``ipxe_args`` a kernel argument string: split on blanks, each word
              ``ipxe``-encoded, joined with single spaces;
  ``shell``   a POSIX-shell single-quoted word (``shlex.quote``), refusing
              control characters;
  ``grub``    one GRUB script word, single-quoted (``$``, ``;``, blanks and
              braces are inert inside); a quote in the value is closed,
              escaped and reopened; control characters are refused;
  ``grub_args`` a kernel argument string: each blank-separated word ``grub``-quoted;
  ``grub_text`` free text for GRUB's ``echo``: the ``ipxe_text`` set, quoted;
  ``grub_file(attr)`` a catalog image's local ``kernel``/``initrd`` as the
              quoted TFTP path GRUB loads it by (``'/images/<name>/<file>'``);
              a URL is refused: Debian 12's signed GRUB has no HTTP client;
  ``urlquote`` a URI component (nothing left unescaped);
  ``to_yaml`` a YAML document built from data with ``yaml.safe_dump``
              (YAML templates build a dict and dump it; they never paste
              values into YAML text);
  ``to_json`` compact JSON;
  ``merge_cloud_config(text)`` our cloud-config (a dict) merged with the
              operator's ``#cloud-config`` text (:func:`lpmos.cloudconfig.merge_cloud_config`);
  ``network_config(mac, rename=True)`` ``params.network`` as NoCloud
              network-config v2 (:func:`lpmos.netconfig.build_network_config`).

Template variables (:func:`build_context`; the README's template section
should point here):

| variable            | what                                                          |
| ------------------- | ------------------------------------------------------------- |
| ``node``            | ``{url, idc, name}`` of the serving regional node             |
| ``decision``        | the boot decision (discovery, localboot, wait, claim, ...)    |
| ``reason``          | why, in words (shown by ``echo``; use ``ipxe_text``)          |
| ``sn``, ``mac``     | the machine (``mac`` lowercase with colons)                   |
| ``arch``, ``platform`` | as iPXE reported them (``x86_64``; ``pcbios`` / ``efi``)   |
| ``task``            | the task's fields (``{}`` when none) except the bulky ``logs``, |
|                     | ``history`` and ``event_seq``; ``task.progress`` is a dict     |
| ``params``          | ``task.params`` with ``ssh_keys`` a list of strings and       |
|                     | ``root_device_hints`` a dict                                  |
| ``server``          | the server record (``{}`` when none)                          |
| ``inventory``       | ``server.inventory`` (agent inventory schema v1)              |
| ``image``           | the catalog entry + ``kernel_url``, ``initrd_url``,           |
|                     | ``disk_image_url`` (``{}`` when none)                         |
| ``live``            | the live agent image entry, with its URLs and ``kernel_args`` |
| ``kernel_args``     | the image's kernel_args + ``params.kernel_args``              |
| ``hostname``        | ``params.hostname``'s first label if it is a valid host name, |
|                     | else derived from the SN                                      |
| ``fqdn``            | ``params.hostname`` when it is a valid FQDN, else ``hostname``|
| ``default_user``    | the image's default user: ``params.username``, else by OS     |
|                     | family (``debian``, ``ubuntu``, ``cloud-user``...)            |
| ``root_disk``       | ``root_device_hints.name`` or ``params.root_disk``            |
| ``root_disk_serial``| ``root_device_hints.serial``                                  |
| ``token``           | this machine's token (only in install scripts and configs)    |
| ``urls``            | ``boot``, ``config``, ``config_tokened`` (token in the path), |
|                     | ``callback``, ``callback_tokened`` (``?token=``), ``images``  |
| ``retry``           | ``{delay}`` seconds before a wait script asks again           |

:meth:`Renderer.render` is pure apart from reading template files (cached
by Jinja).  It returns text or raises :class:`RenderError`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lpmos.cloudconfig import default_user, merge_cloud_config, parse_cloud_config
from lpmos.models import ValidationError, validate_hostname
from lpmos.netconfig import build_network_config, parse_network

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
#: ``[`` and ``]`` stay: inert in iPXE, and an IPv6 URL's host needs them
#: literally (``lpmos.server=http://[fd00::1]:8081`` on the kernel command line)
_IPXE_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~:/=,+@-[]"
_IPXE_PLAIN_RE = re.compile(r"[A-Za-z0-9._~:/=,+@\[\]-]*")
_IPXE_TEXT_RE = re.compile(r"[^A-Za-z0-9 ._,:/()=+@-]")
_TEMPLATE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}(/[a-z0-9][a-z0-9_.-]{0,63}){0,2}")


def default_templates_dir() -> Path:
    """``templates/`` of the source tree (the package's sibling)."""
    return Path(__file__).resolve().parent.parent / "templates"


class RenderError(ValueError):
    """A template could not be rendered; ``str()`` names template and cause."""

    status_code = 500

    def __init__(self, template: str, message: str, line: int | None = None) -> None:
        where = f"{template}" + (f" line {line}" if line else "")
        super().__init__(f"template {where}: {message}")
        self.template = template
        self.line = line


class _SlotError(ValueError):
    """A filter refused a value (becomes a RenderError with the template)."""


# --- filters ---------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def filter_line(value: Any) -> str:
    """The value as one line; a newline or control character is refused."""
    text = _text(value)
    if _CONTROL_RE.search(text):
        raise _SlotError(f"value {text[:40]!r} has a newline or control character "
                         "and cannot go in a single-line slot")
    return text


def filter_ipxe(value: Any) -> str:
    """Inert in an iPXE command line: every character outside
    ``[A-Za-z0-9._~:/=,+@[]-]`` is percent-encoded (``$`` → ``%24``)."""
    text = _text(value)
    if _IPXE_PLAIN_RE.fullmatch(text):
        return text
    return quote(text, safe=_IPXE_SAFE[62:])


def filter_ipxe_text(value: Any) -> str:
    """Free text for an iPXE ``echo``: characters outside a plain set
    (letters, digits, blank and ``._,:/()=+@-``) become ``?``."""
    return _IPXE_TEXT_RE.sub("?", _text(value))[:200]


def filter_ipxe_args(value: Any) -> str:
    """A kernel argument string for an iPXE ``kernel`` line."""
    text = _text(value)
    return " ".join(filter_ipxe(word) for word in text.split())


def filter_shell(value: Any) -> str:
    """One single-quoted shell word; control characters are refused."""
    return shlex.quote(filter_line(value))


def filter_grub(value: Any) -> str:
    """One single-quoted GRUB word; control characters are refused."""
    return "'" + filter_line(value).replace("'", "'\\''") + "'"


def filter_grub_args(value: Any) -> str:
    """A kernel argument string for a GRUB ``linux`` line."""
    return " ".join(filter_grub(word) for word in _text(value).split())


def filter_grub_text(value: Any) -> str:
    """Free text for a GRUB ``echo``."""
    return filter_grub(filter_ipxe_text(value))


def filter_grub_file(image: Any, attr: str) -> str:
    """A catalog image's ``kernel`` or ``initrd`` as the quoted path GRUB
    loads it by from the node's TFTP (``'/images/<name>/<file>'``).  A URL is
    refused: Debian 12's signed GRUB has no HTTP client under Secure Boot."""
    if not isinstance(image, Mapping) or attr not in ("kernel", "initrd"):
        raise _SlotError("grub_file takes a catalog image and 'kernel' or 'initrd'")
    value = str(image.get(attr) or "")
    name = str(image.get("name") or "")
    if not value:
        raise _SlotError(f"catalog image {name!r} has no {attr}")
    if value.startswith(("http://", "https://")):
        raise _SlotError(f"catalog image {name!r} names a URL for its {attr}; GRUB (Secure "
                         "Boot) loads only from the node's TFTP: give the entry a local file")
    return filter_grub(f"/images/{name}/{Path(value).name}")


def filter_urlquote(value: Any) -> str:
    return quote(_text(value), safe="")


class _YamlDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings as ``|`` blocks (a script
    in write_files stays readable); PyYAML falls back to a quoted scalar
    where a block cannot hold the string exactly."""


def _str_presenter(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data.rstrip("\n") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_YamlDumper.add_representer(str, _str_presenter)


def filter_to_yaml(value: Any) -> str:
    return yaml.dump(_plain(value), Dumper=_YamlDumper, default_flow_style=False,
                     sort_keys=False, allow_unicode=False, width=1000)


def filter_to_json(value: Any) -> str:
    return json.dumps(_plain(value), separators=(",", ":"), sort_keys=True)


def _plain(value: Any) -> Any:
    """Jinja hands dict/list literals through as plain dicts and lists; make
    sure nothing else (Undefined, Markup) reaches the dumper."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def filter_merge_cloud_config(ours: Any, operator_text: Any) -> dict[str, Any]:
    """Our cloud-config merged with the operator's text (``""``: none)."""
    if not isinstance(ours, Mapping):
        raise _SlotError("merge_cloud_config applies to a mapping")
    if operator_text in (None, ""):
        return dict(ours)
    try:
        return merge_cloud_config(ours, parse_cloud_config(operator_text))
    except ValidationError as exc:
        raise _SlotError(str(exc)) from None


def filter_network_config(value: Any, mac: Any, rename: bool = True) -> dict[str, Any]:
    """``params.network`` (None: DHCP) as network-config v2 for boot MAC ``mac``."""
    try:
        net = parse_network(value, boot_mac=str(mac))
        return build_network_config(net, str(mac), rename=rename)
    except ValidationError as exc:
        raise _SlotError(str(exc)) from None


FILTERS = {
    "line": filter_line,
    "ipxe": filter_ipxe,
    "ipxe_args": filter_ipxe_args,
    "ipxe_text": filter_ipxe_text,
    "shell": filter_shell,
    "grub": filter_grub,
    "grub_args": filter_grub_args,
    "grub_text": filter_grub_text,
    "grub_file": filter_grub_file,
    "urlquote": filter_urlquote,
    "to_yaml": filter_to_yaml,
    "to_json": filter_to_json,
    "merge_cloud_config": filter_merge_cloud_config,
    "network_config": filter_network_config,
}


# --- the environment -----------------------------------------------------------------


class Renderer:
    """A sandboxed environment over one template directory (thread-safe)."""

    def __init__(self, templates_dir: Path | None = None) -> None:
        self.templates_dir = Path(templates_dir or default_templates_dir())
        self.env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(str(self.templates_dir)),
            undefined=StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
            cache_size=200,
        )
        self.env.filters.update(FILTERS)

    def exists(self, name: str) -> bool:
        return valid_template_name(name) and (self.templates_dir / name).is_file()

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.templates_dir)) for p in
                      self.templates_dir.rglob("*.j2") if p.is_file())

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        """Render template ``name`` with ``context``; :class:`RenderError` on
        any failure (missing template or variable, refused value, sandbox)."""
        if not valid_template_name(name):
            raise RenderError(name[:80], "not a template name")
        try:
            template = self.env.get_template(name)
            return template.render(**context)
        except TemplateNotFound:
            raise RenderError(name, "no such template") from None
        except TemplateSyntaxError as exc:
            raise RenderError(name, f"syntax error: {exc.message}", exc.lineno) from None
        except UndefinedError as exc:
            raise RenderError(name, f"undefined variable: {exc.message}",
                              _template_line(name)) from None
        except _SlotError as exc:
            raise RenderError(name, str(exc), _template_line(name)) from None
        except SecurityError as exc:
            raise RenderError(name, f"refused by the sandbox: {exc}",
                              _template_line(name)) from None
        except (TemplateError, TypeError, ValueError, yaml.YAMLError) as exc:
            raise RenderError(name, f"{type(exc).__name__}: {exc}",
                              _template_line(name)) from None


def valid_template_name(name: str) -> bool:
    """Anchored: ``family/file.ext.j2``; no ``..``, no absolute paths."""
    return bool(_TEMPLATE_NAME_RE.fullmatch(name)) and ".." not in name


def _template_line(name: str) -> int | None:
    """The template line being rendered when the current exception was raised
    (Jinja rewrites tracebacks so template frames carry the template file)."""
    tb = sys.exc_info()[2]
    line = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(name):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# --- the context every template gets ------------------------------------------------

def _wanted_hostname(params: Mapping[str, Any]) -> str:
    """``params.hostname`` checked and lowercased; ``""`` when unset or invalid."""
    try:
        return validate_hostname(params.get("hostname"))
    except ValidationError:
        return ""


def hostname_for(sn: str, params: Mapping[str, Any]) -> str:
    """The first label of ``params.hostname`` when it is a valid RFC 1123
    host name (label or FQDN), else one derived from the SN (lowercase,
    other characters as ``-``)."""
    wanted = _wanted_hostname(params)
    if wanted:
        return wanted.split(".", 1)[0]
    derived = re.sub(r"[^a-z0-9-]", "-", sn.lower()).strip("-")[:63].strip("-")
    return derived or "lpmos"


def fqdn_for(sn: str, params: Mapping[str, Any]) -> str:
    """``params.hostname`` when it is a valid FQDN, else :func:`hostname_for`."""
    wanted = _wanted_hostname(params)
    return wanted if "." in wanted else hostname_for(sn, params)


#: task fields templates do not get: bounded but bulky bookkeeping (the log
#: tail, the transition history, per-source event sequence numbers) that
#: made every render deep-copy the whole document
_TASK_BULK = frozenset({"logs", "history", "event_seq"})


def _record_view(record: Any, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A task or server record as template data without a deep copy.

    Scalars are copied; containers are shared with the node's cache, which
    is safe because templates run in an immutable sandbox (no method that
    mutates a list or dict can be called).  Nested records become dicts."""
    if record is None:
        return {}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        if f.name in skip:
            continue
        value = getattr(record, f.name)
        nested = dataclasses.is_dataclass(value) and not isinstance(value, type)
        out[f.name] = dataclasses.asdict(value) if nested else value  # type: ignore[arg-type]
    return out


def _clean_params(params: Any) -> dict[str, Any]:
    """Task parameters as templates may rely on them: ``ssh_keys`` is a list
    of strings, ``root_device_hints`` a dict; anything else passes as data."""
    out = dict(params) if isinstance(params, Mapping) else {}
    keys = out.get("ssh_keys", [])
    if isinstance(keys, str):
        keys = [keys]
    out["ssh_keys"] = [str(k) for k in keys if isinstance(k, str | int | float) and str(k)] \
        if isinstance(keys, list) else []
    hints = out.get("root_device_hints", {})
    out["root_device_hints"] = dict(hints) if isinstance(hints, Mapping) else {}
    return out


def file_url(node_url: str, image_name: str, value: str) -> str:
    """Where a machine fetches a catalog file: a URL as given, a local path
    from this node's ``/images/<name>/<file>``."""
    if not value:
        return ""
    if value.startswith(("http://", "https://")):
        return value
    return f"{node_url}/images/{image_name}/{Path(value).name}"


def image_context(node_url: str, image: Any) -> dict[str, Any]:
    """A catalog :class:`lpmos.catalog.Image` as template data, with URLs
    (a fresh dict each call; built once per image and node URL)."""
    if image is None:
        return {}
    return dict(_image_context(node_url, image))


@functools.lru_cache(maxsize=256)
def _image_context(node_url: str, image: Any) -> dict[str, Any]:
    data: dict[str, Any] = {f.name: getattr(image, f.name) for f in dataclasses.fields(image)}
    for attr in ("kernel", "initrd", "disk_image"):
        data[f"{attr}_url"] = file_url(node_url, image.name, data[attr])
    return data


def build_context(
    *,
    node_url: str,
    idc: str,
    node_name: str,
    decision: str = "",
    reason: str = "",
    sn: str = "",
    mac: str = "",
    arch: str = "",
    platform: str = "",
    task: Any = None,
    server: Any = None,
    image: Any = None,
    live: Any = None,
    live_kernel_args: str = "",
    token: str = "",
    retry_delay: int = 10,
) -> dict[str, Any]:
    """Every variable a template may use (the table in the module docstring).

    ``task`` and ``server`` are :class:`lpmos.models.Task` /
    :class:`lpmos.models.Server` (or ``None``); ``image`` and ``live`` are
    catalog images.  Pure: no I/O.
    """
    task_d = _record_view(task, skip=_TASK_BULK)
    server_d = _record_view(server)
    params = _clean_params(task_d.get("params", {}))
    task_d["params"] = params
    hints = params["root_device_hints"]
    img = image_context(node_url, image)
    live_d = image_context(node_url, live)
    if live_d:
        live_d["kernel_args"] = " ".join(x for x in (live.kernel_args, live_kernel_args) if x)
    kernel_args = " ".join(x for x in (img.get("kernel_args", ""),
                                       str(params.get("kernel_args", "") or "")) if x)
    base = f"{node_url}/config/{sn}"
    callback = f"{node_url}/callback/{sn}"
    return {
        "node": {"url": node_url, "idc": idc, "name": node_name},
        "decision": decision,
        "reason": reason,
        "sn": sn,
        "mac": mac,
        "arch": arch,
        "platform": platform,
        "hostname": hostname_for(sn or "lpmos", params),
        "fqdn": fqdn_for(sn or "lpmos", params),
        "default_user": default_user(params, str(img.get("os_family", ""))),
        "task": task_d,
        "params": params,
        "server": server_d,
        "inventory": server_d.get("inventory", {}),
        "image": img,
        "live": live_d,
        "kernel_args": kernel_args,
        "root_disk": str(hints.get("name", "") or params.get("root_disk", "") or ""),
        "root_disk_serial": str(hints.get("serial", "") or ""),
        "token": token,
        "urls": {
            "boot": f"{node_url}/boot.ipxe",
            "config": base,
            "config_tokened": f"{base}/t/{token}" if token else base,
            "callback": callback,
            "callback_tokened": f"{callback}?token={token}" if token else callback,
            "images": f"{node_url}/images",
        },
        "retry": {"delay": int(retry_delay)},
    }
