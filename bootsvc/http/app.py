"""The boot HTTP API of a regional node (issue 5; agent_api.md).

Everything a machine fetches after iPXE is loaded:

| route                                   | auth           | concern (blueprint)         |
| --------------------------------------- | -------------- | --------------------------- |
| GET  /boot.ipxe                         | —              | boot: constant chain script |
| GET  /boot/<mac>.ipxe                   | —              | boot: per-machine script    |
| GET  /config/<sn>/<name>                | token          | config: rendered configs    |
| GET  /config/<sn>/t/<token>/<name>      | token in path  | (for cloud-init seedfrom)   |
| POST /callback/<sn>                     | token          | callback: installer hooks   |
| POST /agent/v1/register                 | token optional | agent                       |
| POST /agent/v1/heartbeat                | token          | agent                       |
| GET  /agent/v1/task                     | token          | agent (long poll)           |
| POST /agent/v1/events                   | token          | agent                       |
| GET  /images/<name>/<file>              | token for disk | files: Range, ETag          |
|                                         | images         |                             |
| GET  /ipxe/<file>                       | —              | files: iPXE binaries        |
| GET  /healthz, /metrics                 | —              | ops                         |
| GET  /node/v1/logs/<sn>                 | control plane  | bootsvc.http.node_api            |
|                                         | signature      |                             |

The boot script decision (:func:`bootsvc.policy.script.decide_script`) is made from
the node's watch cache: a non-destructive answer makes no etcd request
(``http_boot_script_etcd_requests_total`` counts them per decision, so a
bench can prove it).  An install is served only after
:func:`bootsvc.state.claim.claim_install` confirmed it with etcd; otherwise the
machine gets a wait-and-retry script.

:class:`HttpService` serves the app with :mod:`bootsvc.http.server` (HTTP/1.1
on the node's event loop; boot scripts that need no etcd request are
answered inline, the rest of the app runs on a bounded thread pool) with a
request deadline, an idle timeout, header and body size limits and a
connection limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from flask import Blueprint, Flask, Response, current_app, request

from bootsvc.context import NodeContext
from bootsvc.http.server import AsyncHttpServer
from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import (
    CLAIM,
    CONFIG_TEMPLATES,
    CONTINUE,
    DISCOVERY,
    REBOOT_STEP,
    TEMPLATES,
    WAIT,
    ScriptDecision,
    decide_script,
    install_kind,
)
from bootsvc.render import Renderer, RenderError, build_context, file_url
from bootsvc.state.claim import claim_install
from bootsvc.state.events import EventPipeline, EventsRefused
from bootsvc.state.install_log import open_install_logs
from bootsvc.state.registration import Registrar, RegistrationConflict, parse_register
from bootsvc.state.tokens import MachineTokens, TokenError
from bootsvc.threaded_loop import ThreadedLoop
from lpmos.catalog import Catalog, CatalogError, Image, default_catalog_path, load_catalog
from lpmos.config import (
    Setting,
    float_range,
    int_range,
    parse_bool,
    parse_optional_path,
    parse_str,
)
from lpmos.httpwire import phrase
from lpmos.models import ProgressEvent, ValidationError, normalize_mac, validate_sn, validate_uuid
from lpmos.states import FINAL, TaskStatus
from lpmos.store import KeyValue, StoreError
from lpmos.tasks import TaskService

log = logging.getLogger(__name__)

SETTINGS: tuple[Setting, ...] = (
    Setting("http.port", "--http-port", 8081, int_range(0, 65535),
            "TCP port of the boot HTTP server (0: any free port)", metavar="PORT"),
    Setting("http.discovery", "--discovery", True, parse_bool,
            "on: machines without a task boot the live discovery image; off: they boot "
            "their local disk", metavar="on|off"),
    Setting("http.threads", "--http-threads", 32, int_range(2, 512),
            "threads running the app for requests that wait on etcd or stream files (claims, "
            "agent API, configs, images); boot scripts are answered on the event loop",
            metavar="N"),
    Setting("http.connection_limit", "--http-connection-limit", 2000, int_range(10, 100000),
            "open connections at most; past it a new connection is answered 503 and closed",
            metavar="N"),
    Setting("http.max_body", "--http-max-body", 1024 * 1024, int_range(1024, 64 * 1024 * 1024),
            "largest request body in bytes (larger: 413 before it is buffered)",
            metavar="BYTES"),
    Setting("http.max_header", "--http-max-header", 16384, int_range(1024, 1024 * 1024),
            "largest request header block in bytes (larger: 431)", metavar="BYTES"),
    Setting("http.timeout", "--http-timeout", 30.0, float_range(1.0, 3600.0),
            "seconds a request may take to arrive in full from its first byte (else 408), "
            "and a keep-alive connection may stay idle, before it is closed",
            metavar="SECONDS"),
    Setting("http.live_image", "--live-image", "live", parse_str,
            "catalog entry whose kernel and initrd are the live agent image (discovery and "
            "image-mode installs)", metavar="NAME"),
    Setting("http.live_kernel_args", "--live-kernel-args", "console=tty0 console=ttyS0,115200n8",
            parse_str, "extra kernel arguments of the live image", metavar="ARGS"),
    Setting("http.templates", "--templates", None, parse_optional_path,
            "template directory (default: templates/ of the source tree)", metavar="DIR"),
    Setting("http.event_interval", "--event-interval", 0.5, float_range(0.05, 10.0),
            "seconds between two etcd writes of one task's progress events (coalescing); "
            "state changes are written at once", metavar="SECONDS"),
    Setting("http.heartbeat_interval", "--heartbeat-interval", 10.0, float_range(1.0, 300.0),
            "agent heartbeat interval in seconds told to agents; the liveness lease TTL is "
            "three times it", metavar="SECONDS"),
    Setting("http.retry_delay", "--boot-retry-delay", 10, int_range(1, 600),
            "seconds a machine waits before asking again after a wait-and-retry script",
            metavar="SECONDS"),
    Setting("http.long_polls", "--http-long-polls", 24, int_range(0, 10000),
            "concurrent agent task long-polls at most (each holds a worker thread); past it "
            "the task answer is returned at once", metavar="N"),
)

LONG_POLL_MAX = 30.0
EVENTS_MAX = 500
_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_CONFIG_NAME_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}")
_WORD_RE = re.compile(r"[^a-z0-9_-]")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,128}")
_JSON = "application/json"


class HttpError(Exception):
    """An HTTP-facing error: ``{"error": error, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def _word(value: str | None, limit: int = 16) -> str:
    return _WORD_RE.sub("", (value or "").lower())[:limit]


# --- the services the routes use ---------------------------------------------------------


#: rendered non-destructive boot scripts kept for reuse (cleared when full)
SCRIPT_MEMO_SIZE = 50_000


class BootHttp:
    """Everything the routes need, built once per app from the NodeContext."""

    def __init__(self, ctx: NodeContext, *, catalog: Catalog | None = None,
                 templates_dir: Path | None = None) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.metrics = ctx.metrics
        self.discovery: bool = bool(cfg.get("http.discovery", True))
        self.retry_delay: int = int(cfg.get("http.retry_delay", 10))
        self.live_name: str = str(cfg.get("http.live_image", "live"))
        self.live_kernel_args: str = str(cfg.get("http.live_kernel_args", ""))
        self.heartbeat_interval = float(cfg.get("http.heartbeat_interval", 10.0))
        self.catalog = catalog if catalog is not None else _load_catalog(cfg.get("catalog"))
        self.renderer = Renderer(templates_dir or cfg.get("http.templates"))
        state_dir = Path(cfg.get("state_dir", "/var/lib/lpmos"))
        self.tftp_root = Path(cfg.get("tftp.root") or state_dir / "tftp")
        self.tokens = MachineTokens(ctx.store, ctx.keys, ctx.idc, ctx.cache, ctx.metrics,
                                    node=ctx.node_name)
        self.tasks = TaskService(ctx.store, ctx.keys)
        self.registrar = Registrar(ctx.store, ctx.keys, ctx.idc, ctx.machines, self.tokens,
                                   ctx.cache, ctx.metrics, node=ctx.node_name,
                                   heartbeat_interval=self.heartbeat_interval)
        self.install_logs = open_install_logs(cfg, state_dir, ctx.node_name, ctx.metrics)
        self.events = EventPipeline(self.tasks, ctx.idc, ctx.metrics,
                                    state_dir / "spool" / ctx.node_name,
                                    interval=float(cfg.get("http.event_interval", 0.5)),
                                    by=f"node:{ctx.node_name}", logs=self.install_logs)
        self.long_polls = threading.BoundedSemaphore(max(1, int(cfg.get("http.long_polls", 24))))
        self.long_polls_enabled = int(cfg.get("http.long_polls", 24)) > 0
        self._waiters: dict[str, list[threading.Event]] = {}
        self._waiters_lock = threading.Lock()
        #: long-polls parked in wait_for_task_change: they hold a pool thread
        #: but need no GIL, so they do not count as the pool having work
        self.parked = 0
        self._stopping = False
        ctx.cache.add_listener(self._on_change)
        self._health_at = 0.0
        self._health_ok = False
        self._health_lock = threading.Lock()
        self.boot_script_text = ""
        # rendered non-destructive scripts: (template, decision, reason, sn, mac, arch,
        # platform) -> (task, server, image, live, text); a hit needs the very same
        # records (the machine index makes new objects on every change)
        self._scripts: dict[tuple[str, ...], tuple[Any, Any, Any, Any, str]] = {}
        self._describe_metrics()

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("http_boot_scripts_total", "per-machine boot scripts served, by decision")
        m.describe("http_boot_script_etcd_requests_total",
                   "etcd requests made while answering boot scripts, by decision (0 for "
                   "every non-destructive answer)")
        m.describe("http_requests_refused_total", "HTTP requests refused, by reason")
        m.describe("http_requests_total", "HTTP requests answered by the boot HTTP server")
        m.describe("http_boot_script_renders_total",
                   "per-machine boot scripts rendered (cached=no) or reused (cached=yes)")

    @property
    def live(self) -> Image | None:
        img = self.catalog.images.get(self.live_name)
        return img if img is not None and img.kernel and img.initrd else None

    def start(self) -> None:
        self.tokens.start()
        self.events.start()

    def release_long_polls(self) -> None:
        """Answer every waiting long poll now and no new one waits (stopping)."""
        self._stopping = True
        with self._waiters_lock:
            waiters = [e for lst in self._waiters.values() for e in lst]
        for event in waiters:
            event.set()

    def stop(self) -> None:
        self.release_long_polls()
        self.events.stop()
        self.tokens.stop()

    # -- long-poll wake-ups -------------------------------------------------------------

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.ctx.keys.parse(key)
        if parsed is None or parsed.kind != "task" or parsed.idc != self.ctx.idc:
            return
        with self._waiters_lock:
            waiters = self._waiters.pop(parsed.name, [])
        for event in waiters:
            event.set()

    def wait_for_task_change(self, sn: str, revision: int, timeout: float) -> None:
        event = threading.Event()
        with self._waiters_lock:
            self._waiters.setdefault(sn, []).append(event)
            self.parked += 1
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._stopping:
                if self.ctx.machines.view(sn).task_revision != revision:
                    return
                event.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                event.clear()
                with self._waiters_lock:
                    lst = self._waiters.setdefault(sn, [])
                    if event not in lst:
                        lst.append(event)
        finally:
            with self._waiters_lock:
                self.parked -= 1
                lst = self._waiters.get(sn, [])
                if event in lst:
                    lst.remove(event)
                if not lst:
                    self._waiters.pop(sn, None)

    # -- shared helpers ------------------------------------------------------------------

    def image_for(self, view: MachineView | None) -> Image | None:
        task = view.task if view is not None else None
        if task is None:
            return None
        return self.catalog.find(task.os_type, task.os_version, task.image)

    def context(self, **kw: Any) -> dict[str, Any]:
        return build_context(node_url=self.ctx.advertise_url, idc=self.ctx.idc,
                             node_name=self.ctx.node_name, live=self.live,
                             live_kernel_args=self.live_kernel_args,
                             retry_delay=self.retry_delay, **kw)

    def authenticate(self, claimed: Any, token: str | None = None) -> str:
        """Check a request's machine token before anything else of the
        request is validated (issue 16): no token or an unknown one → 401,
        another machine's → 403.  ``claimed`` is the SN the request names,
        unvalidated (from its path, query or body); when it is no valid SN
        the token must still be some machine's, and the caller's own
        validation then refuses the SN with a 400.  ``token`` is one from the
        path; by default the request's (header, else ``?token=``)."""
        token = request_token() if token is None else token
        try:
            if isinstance(claimed, str) and _is_sn(claimed):
                self.tokens.check(claimed, token)
            else:
                self.tokens.authenticate(token)
        except TokenError as exc:
            raise HttpError(exc.status_code, "token_" + exc.reason, str(exc)) from None
        assert token is not None
        return token

    def etcd_healthy(self) -> bool:
        """Whether etcd answers: the watch cache confirms it every second or
        so; otherwise a probe, at most once per 2 s."""
        if self.ctx.cache.staleness() < 3.0:
            return True
        with self._health_lock:
            if time.monotonic() - self._health_at < 2.0:
                return self._health_ok
            self._health_at = time.monotonic()
        try:
            self.ctx.store.revision()
            ok = True
        except StoreError:
            ok = False
        with self._health_lock:
            self._health_ok = ok
        return ok


    # -- the per-machine boot script (the hot path) ---------------------------------------

    def boot_script(self, name: str, args: Mapping[str, str], remote_addr: str, *,
                    inline: bool = False) -> str | None:
        """The per-machine iPXE script for ``/boot/<name>`` (``<mac>.ipxe``).

        Decided from the cache; only ``claim``/``continue`` decisions reach
        etcd (through :func:`bootsvc.state.claim.claim_install`), and fail closed
        to a wait script.  Raises :class:`HttpError` for a bad name.  With
        ``inline`` (called on the event loop) a decision that needs etcd
        returns ``None`` instead: the caller runs it again on a thread.
        """
        s = self
        started = time.perf_counter()
        if not name.endswith(".ipxe"):
            s.metrics.inc("http_requests_refused_total", reason="bad_boot_path")
            raise HttpError(404, "not_found", "per-machine scripts are /boot/<mac>.ipxe")
        try:
            mac = normalize_mac(name[:-5])
        except ValidationError as exc:
            s.metrics.inc("http_requests_refused_total", reason="bad_mac")
            raise HttpError(400, "bad_mac", str(exc)) from None
        uuid = ""
        if args.get("uuid"):
            try:
                uuid = validate_uuid(args["uuid"][:64])
            except ValidationError:
                uuid = ""
        serial = (args.get("serial") or "")[:64]
        arch = _word(args.get("arch"))
        platform = _word(args.get("platform"))
        bootmac = ""
        if args.get("bootmac"):
            try:
                bootmac = normalize_mac(args["bootmac"][:32])
            except ValidationError:
                bootmac = ""
        machines = s.ctx.machines
        view = machines.lookup(mac, uuid or None, serial or None)
        if view is None and bootmac and bootmac != mac:
            view = machines.lookup(bootmac)
            mac = bootmac if view is not None else mac
        image = s.image_for(view)
        live = s.live
        decision = decide_script(view, discovery=s.discovery, image=image,
                               live_available=live is not None)
        etcd_requests = 0
        token = ""
        task = view.task if view is not None else None
        server = view.server if view is not None else None
        if decision.destructive and view is not None and image is not None:
            if inline:
                return None
            outcome = claim_install(s.ctx.store, s.ctx.keys, s.tokens, idc=s.ctx.idc,
                                    sn=view.sn, node=s.ctx.node_name,
                                    continuing=decision.action == CONTINUE,
                                    renew="delete" if image.mode == "image" else "issue",
                                    boot_uuid=uuid)
            etcd_requests = outcome.etcd_requests
            if outcome.install:
                token = outcome.token
                task, server = outcome.task, outcome.server or server
                # read-your-writes: the installer's next fetches are answered from the cache
                s.ctx.cache.wait_for_revision(outcome.revision, 1.0)
                s.metrics.inc("http_install_claims_total",
                              result="claimed" if decision.action == CLAIM else "confirmed")
            else:
                s.metrics.inc("http_install_claims_total", result="refused")
                decision = ScriptDecision(WAIT, TEMPLATES[WAIT], outcome.reason, decision.sn)
        sn = view.sn if view is not None else ""
        try:
            text = s._render_script(decision, sn=sn, mac=mac, arch=arch, platform=platform,
                                    task=task, server=server, image=image, token=token)
        except RenderError as exc:
            log.error("boot script for %s: %s", mac, exc)
            s.metrics.inc("http_render_errors_total", template=decision.template)
            reason = f"the {decision.action} script could not be rendered; ask the operator"
            decision = ScriptDecision(WAIT, TEMPLATES[WAIT], reason, sn)
            text = s.renderer.render(decision.template, s.context(
                decision=decision.action, reason=reason, sn=sn, mac=mac))
        if decision.action == DISCOVERY and sn:
            s.tokens.drop_async(sn, why="new boot")      # a new boot means a new agent
        s.ctx.timeline.record(f"sn:{sn}" if sn else mac, "boot script", {
            "decision": decision.action, "reason": decision.reason, "mac": mac,
            "ip": remote_addr, "arch": arch, "platform": platform})
        s.metrics.inc("http_boot_scripts_total", decision=decision.action)
        s.metrics.inc("http_boot_script_etcd_requests_total", etcd_requests,
                      decision=decision.action)
        s.metrics.observe("http_boot_script_seconds", time.perf_counter() - started)
        return text

    def _render_script(self, decision: ScriptDecision, *, sn: str, mac: str, arch: str,
                       platform: str, task: Any, server: Any, image: Image | None,
                       token: str) -> str:
        """Render a boot script; one without a token (every non-destructive
        answer) is rendered once per state of the machine's records and
        reused while they stay the same (a pending machine's iPXE asks again
        every ``retry_delay`` seconds)."""
        live = self.live
        key = (decision.template, decision.action, decision.reason, sn, mac, arch, platform)
        if not token:
            hit = self._scripts.get(key)
            if hit is not None and hit[0] is task and hit[1] is server and hit[2] is image \
                    and hit[3] is live:
                self.metrics.inc("http_boot_script_renders_total", cached="yes")
                return hit[4]
        text = self.renderer.render(decision.template, self.context(
            decision=decision.action, reason=decision.reason, sn=sn, mac=mac, arch=arch,
            platform=platform, task=task, server=server, image=image, token=token))
        self.metrics.inc("http_boot_script_renders_total", cached="no")
        if not token:
            if len(self._scripts) >= SCRIPT_MEMO_SIZE:
                self._scripts.clear()
            self._scripts[key] = (task, server, image, live, text)
        return text

    def constant_script(self) -> str:
        self.metrics.inc("http_boot_constant_total")
        if not self.boot_script_text:
            self.boot_script_text = self.renderer.render("ipxe/boot.ipxe.j2", self.context())
        return self.boot_script_text

    def fast_answer(self, path: str, query: str, remote_addr: str, *,
                    inline: bool = True) -> tuple[int, str, bytes] | None:
        """``GET /boot.ipxe`` and ``GET /boot/<mac>.ipxe`` without Flask:
        ``(status, content type, body)``, or ``None`` for any other path and
        (``inline``) for a script that needs etcd (an install claim).  The
        same answers as the ``boot`` blueprint; the boot storm's hot path."""
        if not path.startswith("/boot") or not path.endswith(".ipxe"):
            return None
        try:
            if path == "/boot.ipxe":
                text: str | None = self.constant_script()
            elif path.startswith("/boot/") and path.count("/") == 2:
                args = dict(parse_qsl(query[:2048], keep_blank_values=True, max_num_fields=16))
                text = self.boot_script(path[6:], args, remote_addr, inline=inline)
            else:
                return None
        except HttpError as exc:
            self.metrics.inc("http_errors_total", error=exc.error)
            self.metrics.inc("http_requests_total")
            return exc.status, _JSON, json.dumps({"error": exc.error,
                                                  "detail": exc.detail}).encode()
        except ValueError:     # parse_qsl: too many fields
            self.metrics.inc("http_requests_refused_total", reason="bad_query")
            self.metrics.inc("http_requests_total")
            return 400, _JSON, json.dumps({"error": "bad_query",
                                           "detail": "too many query fields"}).encode()
        if text is None:
            return None
        self.metrics.inc("http_requests_total")
        return 200, "text/plain; charset=utf-8", text.encode()


def _load_catalog(path: Any) -> Catalog:
    chosen = Path(path) if path else default_catalog_path()
    if chosen is None:
        log.warning("no image catalog: installs and discovery are unavailable")
        return Catalog()
    try:
        catalog = load_catalog(chosen)
    except CatalogError as exc:
        log.error("%s; serving without a catalog", exc)
        return Catalog()
    for problem in catalog.check_files(verify_checksums=False):
        log.warning("catalog: %s", problem)
    return catalog


def svc() -> BootHttp:
    return current_app.extensions["lpmos_boot"]  # type: ignore[no-any-return]


def request_token() -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.args.get("token") or None


def read_json() -> Any:
    raw = request.get_data(cache=False)
    if not raw:
        raise HttpError(400, "bad_json", "a JSON body is required")
    try:
        return json.loads(raw)
    except RecursionError:
        raise HttpError(400, "bad_json", "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}") from None


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, mimetype=_JSON)


def text_response(text: str, status: int = 200) -> Response:
    resp = Response(text, status, mimetype="text/plain")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def checked_sn(sn: Any) -> str:
    if not isinstance(sn, str):
        raise HttpError(400, "bad_sn", "sn: a serial number is required")
    try:
        return validate_sn(sn)
    except ValidationError as exc:
        raise HttpError(400, "bad_sn", str(exc)) from None


def _is_sn(value: str) -> bool:
    try:
        validate_sn(value)
    except ValidationError:
        return False
    return True


# --- boot ------------------------------------------------------------------------------

boot_bp = Blueprint("boot", __name__)


@boot_bp.get("/boot.ipxe")
def boot_ipxe() -> Response:
    return text_response(svc().constant_script())


@boot_bp.get("/boot/<path:name>")
def boot_machine(name: str) -> Response:
    s = svc()
    text = s.boot_script(name, request.args, request.remote_addr or "")
    return text_response(text or "")


# --- rendered install configs ----------------------------------------------------------

config_bp = Blueprint("config", __name__)


@config_bp.get("/config/<sn>/<name>")
def config_file(sn: str, name: str) -> Response:
    return _config(sn, name, None)


@config_bp.get("/config/<sn>/t/<token>/<name>")
def config_file_tokened(sn: str, token: str, name: str) -> Response:
    return _config(sn, name, token)


def _config(sn: str, name: str, path_token: str | None) -> Response:
    s = svc()
    token = s.authenticate(sn, path_token)
    sn = checked_sn(sn)
    if not _CONFIG_NAME_RE.fullmatch(name):
        raise HttpError(404, "not_found", "no such config")
    view = s.ctx.machines.view(sn)
    task = view.task
    if task is None or task.state not in (TaskStatus.BOOTING, TaskStatus.INSTALLING):
        s.metrics.inc("http_requests_refused_total", reason="config_no_install")
        raise HttpError(409, "no_install", f"{sn} has no install in progress")
    image = s.image_for(view)
    if image is None:
        raise HttpError(409, "no_image", f"image {task.image or task.os_type} not in catalog")
    templates = CONFIG_TEMPLATES.get(install_kind(image), {})
    if name not in templates:
        raise HttpError(404, "not_found",
                        f"{install_kind(image)} installs have: {', '.join(sorted(templates))}")
    template = templates[name]
    text = ""
    if template:
        try:
            text = s.renderer.render(template, s.context(
                decision="config", sn=sn, mac=task.mac, task=task, server=view.server,
                image=image, token=token))
        except RenderError as exc:
            log.error("config %s of %s: %s", name, sn, exc)
            s.metrics.inc("http_render_errors_total", template=template)
            raise HttpError(500, "render_error", str(exc)) from None
    s.ctx.timeline.record(f"sn:{sn}", "config fetched", {"name": name,
                                                          "ip": request.remote_addr or ""})
    s.metrics.inc("http_configs_total", config=name)
    return text_response(text)


# --- installer and first-boot callbacks ---------------------------------------------------

callback_bp = Blueprint("callback", __name__)


def parse_callback(body: Any, *, now: float) -> ProgressEvent:
    """A callback body (ours, or the Ubuntu autoinstall ``reporting``
    webhook JSON) as a progress event.  Pure; ValidationError when unusable."""
    if not isinstance(body, dict):
        raise ValidationError("body", "a JSON object")
    if "event_type" in body and ("origin" in body or "name" in body):
        stamp = body.get("timestamp")
        ts = float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) \
            and 0 < stamp < 4e9 else now
        result = str(body.get("result") or "")
        text = f"{body.get('event_type')} {body.get('name', '')}: " \
               f"{body.get('description', '')} {result}".strip()
        return ProgressEvent.from_dict({
            "source": "autoinstall", "seq": int(ts * 1_000_000), "kind": "log",
            "step": str(body.get("name") or "")[:64], "message": text, "at": ts})
    event = _word(str(body.get("event") or "callback"), 32) or "callback"
    if not event[0].isalpha():
        event = "callback"
    status = str(body.get("status") or "progress")
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        seq = 1 if status in ("succeeded", "failed") else int(now * 1000)
    data: dict[str, Any] = {"source": event, "seq": seq, "message": body.get("message") or "",
                            "at": now}
    if status in ("installing", "succeeded", "failed"):
        data["kind"] = "state"
        data["status"] = status
    elif status == "progress":
        data["kind"] = "progress"
    else:
        data["kind"] = "log"
    percent = body.get("percent")
    if isinstance(percent, int | float) and not isinstance(percent, bool):
        data["percent"] = max(0.0, min(100.0, float(percent)))
    if body.get("step"):
        data["step"] = str(body["step"])
    return ProgressEvent.from_dict(data)


@callback_bp.post("/callback/<sn>")
def callback(sn: str) -> Response:
    s = svc()
    s.authenticate(sn)
    sn = checked_sn(sn)
    body = read_json()
    try:
        event = parse_callback(body, now=time.time())
    except ValidationError as exc:
        s.metrics.inc("http_requests_refused_total", reason="bad_callback")
        raise HttpError(400, "bad_event", str(exc)) from None
    s.ctx.timeline.record(f"sn:{sn}", "callback", {
        "source": event.source, "kind": event.kind, "status": event.status,
        "message": event.message[:120], "ip": request.remote_addr or ""})
    result = _submit(s, sn, [event])
    return json_response({"acked": result.acked, "task_status": result.task_status})


def _submit(s: BootHttp, sn: str, events: list[ProgressEvent]) -> Any:
    try:
        return s.events.submit(sn, events)
    except EventsRefused as exc:
        raise HttpError(exc.status_code, exc.error, str(exc)) from None


# --- the agent API ---------------------------------------------------------------------

agent_bp = Blueprint("agent", __name__, url_prefix="/agent/v1")


@agent_bp.post("/register")
def register() -> Response:
    s = svc()
    body = read_json()
    try:
        req = parse_register(body)
    except ValidationError as exc:
        s.metrics.inc("http_requests_refused_total", reason="bad_register")
        raise HttpError(400, "bad_request", str(exc)) from None
    ip = request.remote_addr or ""
    try:
        result = s.registrar.register(req, request_token(), ip=ip)
    except RegistrationConflict as exc:
        s.ctx.timeline.record(f"sn:{s.registrar.identify(req)}", "agent refused",
                              {"reason": "token held", "mac": req.boot_mac, "ip": ip})
        raise HttpError(409, "token_held", str(exc)) from None
    except StoreError as exc:
        raise HttpError(503, "etcd_unavailable", str(exc)) from None
    s.ctx.timeline.record(f"sn:{result.sn}", "agent registered", {
        "mac": req.boot_mac, "ip": ip, "agent_version": req.agent_version,
        "token": "issued" if result.token else "kept", "conflict": result.conflict})
    return json_response({
        "sn": result.sn, "idc": s.ctx.idc, "token": result.token, "server_time": time.time(),
        "heartbeat_interval": s.heartbeat_interval,
        "task": result.task.to_dict() if result.task is not None else None})


def _agent_body(s: BootHttp) -> tuple[str, dict[str, Any]]:
    """An agent POST's machine and body.  The token comes first: without
    one the answer is 401 before the body is parsed; then it must be the
    machine's the body names (403), and only then is the body judged (400)."""
    if not request_token():
        s.authenticate(None)
    try:
        body, error = read_json(), None
    except HttpError as exc:
        body, error = None, exc
    s.authenticate(body.get("sn") if isinstance(body, dict) else None)
    if error is not None:
        raise error
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "a JSON object is required")
    return checked_sn(body.get("sn")), body


@agent_bp.post("/heartbeat")
def heartbeat() -> Response:
    s = svc()
    sn, body = _agent_body(s)
    state = body.get("state", "unknown")
    if not isinstance(state, str):
        raise HttpError(400, "bad_request", "state: a string such as idle or installing")
    try:
        s.registrar.heartbeat(sn, str(state))
    except StoreError as exc:
        raise HttpError(503, "etcd_unavailable", str(exc)) from None
    s.metrics.inc("http_heartbeats_total")
    task = s.ctx.machines.view(sn).task
    return json_response({"server_time": time.time(),
                          "task_status": task.status if task is not None else None})


@agent_bp.get("/task")
def agent_task() -> Response:
    s = svc()
    token = s.authenticate(request.args.get("sn"))
    sn = checked_sn(request.args.get("sn"))
    try:
        wait = max(0.0, min(LONG_POLL_MAX, float(request.args.get("wait", 0))))
        raw_rev = request.args.get("revision")
        known = int(raw_rev) if raw_rev not in (None, "") else None
    except ValueError:
        raise HttpError(400, "bad_request", "wait and revision must be numbers") from None
    view = s.ctx.machines.view(sn)
    if known is not None and known == view.task_revision and wait > 0 \
            and s.long_polls_enabled and s.long_polls.acquire(blocking=False):
        try:
            s.wait_for_task_change(sn, known, wait)
        finally:
            s.long_polls.release()
        view = s.ctx.machines.view(sn)
    return json_response(_task_answer(s, view, token))


def _task_answer(s: BootHttp, view: MachineView, token: str) -> dict[str, Any]:
    """The agent's task answer; claims an approved image-mode task (fresh
    read + CAS) so an agent already running in discovery can install."""
    task, revision = view.task, view.task_revision
    answer: dict[str, Any] = {"revision": revision, "task": None, "action": "none",
                              "install": None}
    if task is None:
        return answer
    image = s.image_for(view)
    image_mode = image is not None and image.mode == "image"
    conflict = bool(view.server is not None and view.server.conflict)
    status = task.state
    action = "wait"
    if status in FINAL:
        action = "done"
    elif status is TaskStatus.APPROVED and image_mode and not conflict:
        outcome = claim_install(s.ctx.store, s.ctx.keys, s.tokens, idc=s.ctx.idc, sn=view.sn,
                                node=s.ctx.node_name, continuing=False, renew="keep")
        # the token is kept: this very agent uses it (and renders it into the seed)
        if outcome.install and outcome.task is not None:
            s.ctx.cache.wait_for_revision(outcome.revision, 1.0)
            task, revision, action = outcome.task, outcome.revision, "install"
            s.metrics.inc("http_install_claims_total", result="claimed_by_agent")
            s.ctx.timeline.record(f"sn:{view.sn}", "install claimed", {"by": "agent poll"})
        else:
            s.metrics.inc("http_install_claims_total", result="refused")
    elif status in (TaskStatus.BOOTING, TaskStatus.INSTALLING) and image_mode and not conflict \
            and task.progress.step != REBOOT_STEP:
        action = "install"
    answer.update(revision=revision, task=task.to_dict(), action=action)
    if action == "install" and image is not None:
        answer["install"] = _install_spec(s, view, task, image, token)
    return answer


def _install_spec(s: BootHttp, view: MachineView, task: Any, image: Image,
                  token: str) -> dict[str, Any]:
    ctx = s.context(decision="install", sn=view.sn, mac=task.mac, task=task, server=view.server,
                    image=image, token=token)
    seed = {}
    for name, template in CONFIG_TEMPLATES["image"].items():
        if template and name != "vendor-data":
            seed[name] = s.renderer.render(template, ctx)
    size = image.size
    local = s.catalog.local_path(image.disk_image)
    if not size and local is not None and local.is_file():
        size = local.stat().st_size
    params = ctx["params"]
    return {
        "mode": "image", "image": image.name,
        "image_url": file_url(s.ctx.advertise_url, image.name, image.disk_image),
        "sha256": image.sha256, "size": size,
        "root_device_hints": params.get("root_device_hints", {}),
        "seed": seed, "allow_removable": bool(params.get("allow_removable", False)),
    }


@agent_bp.post("/events")
def agent_events() -> Response:
    s = svc()
    sn, body = _agent_body(s)
    raw = body.get("events")
    if not isinstance(raw, list) or len(raw) > EVENTS_MAX:
        raise HttpError(400, "bad_request", f"events: a list of at most {EVENTS_MAX} events")
    events = []
    for i, item in enumerate(raw):
        try:
            events.append(ProgressEvent.from_dict(item))
        except ValidationError as exc:
            s.metrics.inc("http_requests_refused_total", reason="bad_event")
            raise HttpError(400, "bad_event", f"events[{i}]: {exc}") from None
    result = _submit(s, sn, events)
    states = [e for e in events if e.kind == "state"]
    if states:
        s.ctx.timeline.record(f"sn:{sn}", "agent state", {"status": states[-1].status,
                                                          "message": states[-1].message[:120]})
    return json_response({"acked": result.acked, "task_status": result.task_status})


# --- files ---------------------------------------------------------------------------------

files_bp = Blueprint("files", __name__)


@files_bp.get("/images/<name>/<file>")
def image_file(name: str, file: str) -> Response:
    s = svc()
    image = s.catalog.images.get(name)
    if image is None or not _FILE_RE.fullmatch(file):
        raise HttpError(404, "not_found", "no such image file")
    which = None
    for attr in ("kernel", "initrd", "disk_image"):
        value = getattr(image, attr)
        if value and not image.is_url(value) and Path(value).name == file:
            which = attr
            break
    if which is None:
        raise HttpError(404, "not_found", "no such image file")
    if which == "disk_image":
        s.authenticate(None)        # any machine's token (a disk image is no secret of one)
    path = s.catalog.local_path(getattr(image, which))
    assert path is not None
    etag = image.sha256 if which == "disk_image" and image.sha256 else None
    return serve_file(path, etag_hint=etag, metric=which)


@files_bp.get("/ipxe/<file>")
def ipxe_file(file: str) -> Response:
    s = svc()
    if not _FILE_RE.fullmatch(file):
        s.metrics.inc("http_requests_refused_total", reason="bad_path")
        raise HttpError(404, "not_found", "no such file")
    root = s.tftp_root.resolve()
    path = (root / file).resolve()
    if path.parent != root:
        s.metrics.inc("http_requests_refused_total", reason="outside_root")
        raise HttpError(404, "not_found", "no such file")
    return serve_file(path, metric="ipxe")


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def serve_file(path: Path, *, etag_hint: str | None = None, metric: str = "file") -> Response:
    """A file with ETag / If-None-Match and one Range (206, or 416),
    streamed in 256 KiB blocks (the server's ``wsgi.file_wrapper`` when it
    has one)."""
    s = svc()
    try:
        fh = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HttpError(404, "not_found", "no such file") from None
    try:
        st = os.fstat(fh.fileno())
        size = st.st_size
        etag = '"' + (etag_hint or hashlib.sha256(
            f"{path}:{size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]) + '"'
        headers = {"ETag": etag, "Accept-Ranges": "bytes",
                   "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                  time.gmtime(st.st_mtime)),
                   "Cache-Control": "no-cache"}
        inm = request.headers.get("If-None-Match")
        if inm and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            fh.close()
            s.metrics.inc("http_files_total", kind=metric, status="304")
            return Response(status=304, headers=headers)
        start, length, status = 0, size, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and (not if_range or if_range.strip() == etag):
            m = _RANGE_RE.fullmatch(rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    first = int(m.group(1))
                    last = int(m.group(2)) if m.group(2) else size - 1
                else:
                    first = max(0, size - int(m.group(2)))
                    last = size - 1
                last = min(last, size - 1)
                if first >= size or first > last:
                    fh.close()
                    s.metrics.inc("http_files_total", kind=metric, status="416")
                    headers["Content-Range"] = f"bytes */{size}"
                    return Response(status=416, headers=headers)
                start, length, status = first, last - first + 1, 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            # a multi-range or malformed Range is ignored: the whole file (RFC 9110)
        fh.seek(start)
        headers["Content-Length"] = str(length)
        wrapper = request.environ.get("wsgi.file_wrapper")
        body: Iterable[bytes] = wrapper(fh, 1 << 18) if wrapper else _limited(fh, length)
        s.metrics.inc("http_files_total", kind=metric, status=str(status))
        resp = Response(body, status=status, headers=headers,
                        mimetype="application/octet-stream", direct_passthrough=True)
        resp.call_on_close(fh.close)
        return resp
    except HttpError:
        raise
    except Exception:
        fh.close()
        raise


def _limited(fh: Any, length: int) -> Iterable[bytes]:
    remaining = length
    while remaining > 0:
        chunk = fh.read(min(1 << 18, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        yield chunk


# --- ops -------------------------------------------------------------------------------------

ops_bp = Blueprint("ops", __name__)


@ops_bp.get("/healthz")
def healthz() -> Response:
    s = svc()
    cache = s.ctx.cache
    staleness = cache.staleness()
    reachable = s.etcd_healthy()
    spooled = len(s.events.spooled_tasks())
    reasons = [why for check in s.ctx.degraded_checks for why in check()]
    if not reachable:
        reasons.append("etcd does not answer")
    if not cache.loaded:
        reasons.append("the IDC cache has not loaded from etcd yet")
    elif staleness > 10.0:
        reasons.append(f"etcd has not confirmed the IDC cache for {staleness:.0f} s")
    if spooled:
        reasons.append(f"progress of {spooled} task(s) is spooled to disk, not yet in etcd")
    degraded = bool(reasons)
    body = {"status": "degraded" if degraded else "ok", "reasons": reasons,
            "node": s.ctx.node_name, "idc": s.ctx.idc,
            "etcd": {"reachable": reachable},
            "cache": {"loaded": cache.loaded,
                      "staleness_seconds": None if staleness == float("inf")
                      else round(staleness, 3),
                      "revision": cache.revision},
            "catalog": {"images": len(s.catalog.images), "live": s.live is not None},
            "events_spooled_tasks": spooled,
            "installs": "refused while degraded" if degraded else "allowed",
            "warnings": sorted(s.ctx.warnings.values())}
    return json_response(body, 503 if degraded else 200)


@ops_bp.get("/metrics")
def metrics() -> Response:
    return Response(svc().metrics.render(), mimetype="text/plain; version=0.0.4")


# --- the app -------------------------------------------------------------------------------


class BootFastPath:
    """WSGI middleware answering ``GET /boot.ipxe`` and ``GET /boot/<mac>.ipxe``
    without Flask's request machinery (the hot path of a boot storm); every
    other request goes to the Flask app.  Same logic, same answers as the
    ``boot`` blueprint (both call :meth:`BootHttp.boot_script`)."""

    def __init__(self, boot: BootHttp, app: Any) -> None:
        self.boot = boot
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "GET":
            return self.app(environ, start_response)
        answer = self.boot.fast_answer(environ.get("PATH_INFO", ""),
                                       environ.get("QUERY_STRING", ""),
                                       environ.get("REMOTE_ADDR", ""), inline=False)
        if answer is None:
            return self.app(environ, start_response)
        status, ctype, body = answer
        start_response(f"{status} {phrase(status)}",
                       [("Content-Type", ctype), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [body]


def create_app(ctx: NodeContext, *, catalog: Catalog | None = None,
               templates_dir: Path | None = None) -> Flask:
    """The boot HTTP WSGI app for ``ctx`` (dependencies injected, one
    blueprint per concern).  Call ``app.extensions["lpmos_boot"].start()``
    (or use :class:`HttpService`) to run its background workers."""
    app = Flask("bootsvc")
    app.config["MAX_CONTENT_LENGTH"] = int(ctx.config.get("http.max_body", 1024 * 1024))
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["lpmos_boot"] = BootHttp(ctx, catalog=catalog, templates_dir=templates_dir)
    for bp in (boot_bp, config_bp, callback_bp, agent_bp, files_bp, ops_bp):
        app.register_blueprint(bp)
    from bootsvc.http import node_api  # it imports this module's helpers

    node_api.register(app)
    app.wsgi_app = BootFastPath(app.extensions["lpmos_boot"], app.wsgi_app)  # type: ignore[method-assign]

    @app.after_request
    def count(resp: Response) -> Response:
        ctx.metrics.inc("http_requests_total")
        return resp

    @app.errorhandler(HttpError)
    def on_http_error(exc: HttpError) -> Response:
        ctx.metrics.inc("http_errors_total", error=exc.error)
        resp = json_response({"error": exc.error, "detail": exc.detail}, exc.status)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="lpmos"'
        return resp

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def on_werkzeug(exc: Any) -> Response:
        code = int(getattr(exc, "code", 500))
        name = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(code, "error")
        ctx.metrics.inc("http_requests_refused_total", reason=name)
        return json_response({"error": name, "detail": getattr(exc, "description", "")}, code)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        if hasattr(exc, "code") and isinstance(getattr(exc, "code", None), int):
            code = int(exc.code)  # type: ignore[attr-defined]
            return json_response({"error": "http_error", "detail": str(exc)}, code)
        log.exception("unexpected error on %s %s", request.method, request.path)
        ctx.metrics.inc("http_errors_total", error="internal")
        return json_response({"error": "internal", "detail": type(exc).__name__}, 500)

    return app


# --- the server ----------------------------------------------------------------------------


class HttpService:
    """Serves :func:`create_app` on ``regional.listen``:``http.port`` with
    :class:`bootsvc.http.server.AsyncHttpServer`.

    The node awaits :meth:`start_async` / :meth:`stop_async` on its own
    event loop (the one DHCP and TFTP run on); :meth:`start` / :meth:`stop`
    run it on a private loop thread instead (tests, tools)."""

    def __init__(self, ctx: NodeContext, *, app: Flask | None = None) -> None:
        self.ctx = ctx
        self.app = app or create_app(ctx)
        self.boot: BootHttp = self.app.extensions["lpmos_boot"]
        self._server: AsyncHttpServer | None = None
        self._own_loop: ThreadedLoop | None = None
        self.port = 0

    async def start_async(self) -> HttpService:
        cfg = self.ctx.config
        metrics = self.ctx.metrics
        self.boot.start()
        server = AsyncHttpServer(
            self.app.wsgi_app,
            host=cfg.get("regional.listen", "0.0.0.0"),
            port=int(cfg.get("http.port", 8081)),
            threads=int(cfg.get("http.threads", 32)),
            connection_limit=int(cfg.get("http.connection_limit", 2000)),
            timeout=float(cfg.get("http.timeout", 30.0)),
            max_body=int(cfg.get("http.max_body", 1024 * 1024)),
            max_header=int(cfg.get("http.max_header", 16384)),
            fast=self.boot.fast_answer,
            on_refused=lambda reason: metrics.inc("http_requests_refused_total", reason=reason),
        )
        await server.start()
        self._server = server
        # the pool has work unless all it holds are parked agent long-polls
        self.ctx.busy_checks.append(lambda: server.in_app > self.boot.parked)
        metrics.gauge("http_connections_open", lambda: float(len(server.conns)),
                      "client connections open on the boot HTTP server")
        metrics.gauge("http_requests_in_app", lambda: float(server.in_app),
                      f"requests queued for or running on the {server.threads} app threads "
                      "(claims, agent API, configs, files); boot scripts are answered inline")
        self.port = server.port
        if not self.ctx.advertise_url:
            host = self.ctx.server_ip or cfg.get("regional.listen", "127.0.0.1")
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            self.ctx.advertise_url = f"http://{host}:{self.port}"
        log.info("boot HTTP on %s:%d (machines use %s)", cfg.get("regional.listen"), self.port,
                 self.ctx.advertise_url)
        return self

    async def stop_async(self) -> None:
        self.boot.release_long_polls()
        if self._server is not None:
            await self._server.stop()
            self._server = None
        self.boot.stop()

    def start(self) -> HttpService:
        self._own_loop = ThreadedLoop("http-loop")
        try:
            self._own_loop.call(self.start_async())
        except BaseException:
            self._own_loop.close()
            self._own_loop = None
            raise
        return self

    def stop(self) -> None:
        if self._own_loop is not None:
            try:
                self._own_loop.call(self.stop_async())
            finally:
                self._own_loop.close()
                self._own_loop = None


__all__: list[str] = ["SETTINGS", "BootHttp", "HttpError", "HttpService", "create_app",
                      "parse_callback"]
