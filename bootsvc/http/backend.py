"""The state and logic behind the boot HTTP routes, one per app.

:class:`BootBackend` owns what the routes share (the catalog, the
renderer, machine tokens, the registrar, the event pipeline, the install
logs, the long polls) and decides and renders the per-machine boot script.
It neither listens nor speaks WSGI: :mod:`bootsvc.http.app` puts it behind
Flask routes, :mod:`bootsvc.http.fastpath` and :mod:`bootsvc.http.server`
call :meth:`BootBackend.fast_answer` for the boot scripts of a boot storm.

The boot script decision (:func:`bootsvc.policy.script.decide_script`) is
made from the node's watch cache, so a non-destructive answer makes no
etcd request (``http_boot_script_etcd_requests_total`` counts them per
decision, so a bench can prove it).  An install is served only after
:func:`bootsvc.state.claim.claim_install` confirmed it with etcd; otherwise
the machine gets a wait-and-retry script.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from flask import current_app

from bootsvc.context import NodeContext
from bootsvc.http.catalog import open_catalog
from bootsvc.http.common import JSON_TYPE, HttpError, error_body, is_sn, request_token
from bootsvc.http.longpoll import TaskChangeWaits
from bootsvc.http.script_query import BadScriptPath, ScriptQuery, parse_script_query
from bootsvc.http.settings import HttpSettings
from bootsvc.netif import plain_address
from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import (
    CLAIM,
    CONTINUE,
    DISCOVERY,
    LOADER_SUFFIXES,
    TEMPLATES,
    WAIT,
    ScriptDecision,
    decide_script,
    loader_template,
)
from bootsvc.render import Renderer, RenderError, build_context
from bootsvc.state.claim import claim_install
from bootsvc.state.events import EventPipeline, EventsRefused
from bootsvc.state.install_log import open_install_logs
from bootsvc.state.registration import Registrar
from bootsvc.state.tokens import MachineTokens, TokenError
from bootsvc.tftp.chain import render_grub_config
from lpmos.catalog import Catalog, Image
from lpmos.models import ProgressEvent, Task
from lpmos.store import StoreError
from lpmos.tasks import TaskService

log = logging.getLogger(__name__)

#: rendered non-destructive boot scripts kept for reuse (cleared when full)
SCRIPT_MEMO_SIZE = 50_000


@dataclass
class _ScriptAnswer:
    """A boot script decision and the records it is rendered from."""

    decision: ScriptDecision
    task: Any
    server: Any
    token: str = ""
    etcd_requests: int = 0


class BootBackend:
    """What the boot HTTP routes share, built once per app from the
    :class:`NodeContext`, and the boot script logic.  Unlike
    :class:`~bootsvc.http.service.HttpService` (which serves the app on a
    port), :class:`~bootsvc.http.fastpath.BootFastPath` (WSGI middleware) and
    :class:`~bootsvc.http.server.AsyncHttpServer` (the HTTP/1.1 server), it
    knows nothing of sockets or WSGI."""

    def __init__(self, ctx: NodeContext, *, catalog: Catalog | None = None,
                 templates_dir: Path | None = None) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.metrics = ctx.metrics
        settings = HttpSettings.from_config(cfg)
        self.discovery: bool = settings.discovery
        self.retry_delay: int = settings.retry_delay
        self.live_name: str = settings.live_image
        self.live_kernel_args: str = settings.live_kernel_args
        self.heartbeat_interval = settings.heartbeat_interval
        #: the seed (TOML) catalog; :attr:`catalog` is it plus the managed
        #: images verified on this node (:meth:`set_managed_images`)
        self.seed_catalog = catalog if catalog is not None else open_catalog(cfg.get("catalog"))
        self.catalog = self.seed_catalog
        #: why a task's managed image is not ready here (the image sync's
        #: :meth:`~bootsvc.images.sync.ImageSync.wait_reason`); None: no sync
        self.image_waits: Callable[[Task], str] | None = None
        self.renderer = Renderer(templates_dir or settings.templates)
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
                                    interval=settings.event_interval,
                                    by=f"node:{ctx.node_name}", logs=self.install_logs)
        self.task_waits = TaskChangeWaits(ctx, settings.long_polls)
        self._health_at = 0.0
        self._health_ok = False
        self._health_lock = threading.Lock()
        self.boot_script_texts: dict[str, str] = {}     # /boot.ipxe by node URL
        self.grub_config_text = ""
        # rendered non-destructive scripts: (template, decision, reason, sn, mac, arch,
        # platform, node URL) -> (task, server, image, live, text); a hit needs the very same
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
        m.describe("http_boot_script_seconds",
                   "time to decide and render a per-machine boot script", kind="histogram")
        m.describe("http_boot_constant_total",
                   "constant boot scripts served (/boot.ipxe, GRUB's grub.cfg)")
        m.describe("http_errors_total", "HTTP requests answered with an error, by error")
        m.describe("http_render_errors_total",
                   "boot scripts and install configs that failed to render, by template")
        m.describe("http_install_claims_total",
                   "install claims (approved -> booting by CAS), by result")
        m.describe("http_callbacks_total", "installer callbacks received, by shape")
        m.describe("http_configs_total", "rendered install configs served, by config name")
        m.describe("http_files_total", "images and iPXE files served over HTTP, by kind and "
                   "status")
        m.describe("http_heartbeats_total", "agent heartbeats received")

    @property
    def live(self) -> Image | None:
        img = self.catalog.images.get(self.live_name)
        return img if img is not None and img.kernel and img.initrd else None

    @property
    def parked(self) -> int:
        """Agent long polls waiting now (see :class:`TaskChangeWaits`)."""
        return self.task_waits.parked

    def start(self) -> None:
        self.tokens.start()
        self.events.start()

    def stop(self) -> None:
        self.task_waits.release_all()
        self.events.stop()
        self.tokens.stop()

    # -- what the routes share --------------------------------------------------------------

    def image_for(self, view: MachineView | None) -> Image | None:
        task = view.task if view is not None else None
        if task is None:
            return None
        return self.catalog.find(task.os_type, task.os_version, task.image)

    def image_wait(self, view: MachineView | None) -> str:
        """Why the task of ``view`` waits for its managed image on this node
        ("" when it does not: no task, no managed image, or ready)."""
        task = view.task if view is not None else None
        if task is None or self.image_waits is None:
            return ""
        return self.image_waits(task)

    def set_managed_images(self, images: Iterable[Image]) -> None:
        """Serve the seed catalog plus ``images`` (managed images whose
        files are verified in this node's cache), from now on: one
        assignment, so a request sees the old catalog or the new one."""
        self.catalog = self.seed_catalog.with_images(images)

    def node_url(self, remote_addr: str | None = None) -> str:
        """The base URL a machine at ``remote_addr`` reaches this node at:
        the IPv6 one (:attr:`NodeContext.advertise_url6`) for a client that
        came over IPv6, so its script, agent, image and callback URLs stay on
        the family it booted with; else the IPv4 one."""
        if self.ctx.advertise_url6 and remote_addr and ":" in plain_address(remote_addr):
            return self.ctx.advertise_url6
        return self.ctx.advertise_url

    def context(self, *, remote_addr: str | None = None, **kw: Any) -> dict[str, Any]:
        return build_context(node_url=self.node_url(remote_addr), idc=self.ctx.idc,
                             node_name=self.ctx.node_name, live=self.live,
                             live_kernel_args=self.live_kernel_args,
                             retry_delay=self.retry_delay, **kw)

    def authenticate(self, claimed: Any, token: str | None = None) -> str:
        """Check a request's machine token before anything else of the
        request is validated: no token or an unknown one → 401, another
        machine's → 403.  ``claimed`` is the SN the request names,
        unvalidated (from its path, query or body); when it is no valid SN
        the token must still be some machine's, and the caller's own
        validation then refuses the SN with a 400.  ``token`` is one from the
        path; by default the request's (header, else ``?token=``)."""
        token = request_token() if token is None else token
        try:
            if isinstance(claimed, str) and is_sn(claimed):
                self.tokens.check(claimed, token)
            else:
                self.tokens.authenticate(token)
        except TokenError as exc:
            raise HttpError(exc.status_code, "token_" + exc.reason, str(exc)) from None
        assert token is not None
        return token

    def submit_events(self, sn: str, events: list[ProgressEvent]) -> Any:
        """Hand progress events of ``sn`` to the event pipeline; its refusal as an HTTP error."""
        try:
            return self.events.submit(sn, events)
        except EventsRefused as exc:
            raise HttpError(exc.status_code, exc.error, str(exc)) from None

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

    # -- the boot scripts (the hot path) ----------------------------------------------------

    def constant_script(self, remote_addr: str | None = None) -> str:
        """``/boot.ipxe``: rendered once per node URL (IPv4, IPv6)."""
        self.metrics.inc("http_boot_constant_total")
        url = self.node_url(remote_addr)
        text = self.boot_script_texts.get(url)
        if text is None:
            text = self.boot_script_texts[url] = self.renderer.render(
                "ipxe/boot.ipxe.j2", self.context(remote_addr=remote_addr))
        return text

    def constant_grub_config(self) -> str:
        """GRUB's constant ``grub/grub.cfg`` (GRUB reads it over TFTP; HTTP
        serves the same text, for a look at what machines get)."""
        self.metrics.inc("http_boot_constant_total")
        if not self.grub_config_text:
            self.grub_config_text = render_grub_config().decode()
        return self.grub_config_text

    def boot_file(self, name: str, file: str, *, disk: bool = False) -> tuple[str, Path] | None:
        """The catalog file ``file`` of image ``name`` that a machine may
        fetch, as ``(which, path)`` (``which``: kernel, initrd, or with
        ``disk`` disk_image); ``None`` for anything else.  Only a local file
        the catalog names for that image qualifies."""
        catalog = self.catalog          # one snapshot: the sync may swap it meanwhile
        image = catalog.images.get(name)
        if image is None:
            return None
        for attr in ("kernel", "initrd", "disk_image") if disk else ("kernel", "initrd"):
            value = getattr(image, attr)
            if value and not image.is_url(value) and Path(value).name == file:
                path = catalog.local_path(value)
                return (attr, path) if path is not None else None
        return None

    def fast_answer(self, path: str, query: str, remote_addr: str, *,
                    inline: bool = True) -> tuple[int, str, bytes] | None:
        """``GET /boot.ipxe``, ``GET /boot/<mac>.ipxe``, ``GET /grub/grub.cfg``
        and ``GET /grub/<mac>.cfg`` without Flask: ``(status, content type,
        body)``, or ``None`` for any other path and (``inline``) for a script
        that needs etcd (an install claim).  The same answers as the ``boot``
        blueprint; the boot storm's hot path."""
        if path.startswith("/boot") and path.endswith(".ipxe"):
            loader = "ipxe"
        elif path.startswith("/grub/") and path.endswith(".cfg"):
            loader = "grub"
        else:
            return None
        try:
            if path == "/boot.ipxe":
                text: str | None = self.constant_script(remote_addr)
            elif path == "/grub/grub.cfg":
                text = self.constant_grub_config()
            elif path.count("/") == 2 and path.startswith(("/boot/", "/grub/")):
                args = dict(parse_qsl(query[:2048], keep_blank_values=True, max_num_fields=16))
                text = self.boot_script(path[6:], args, remote_addr, inline=inline,
                                        loader=loader)
            else:
                return None
        except HttpError as exc:
            self.metrics.inc("http_errors_total", error=exc.error)
            self.metrics.inc("http_requests_total")
            return exc.status, JSON_TYPE, json.dumps(error_body(exc)).encode()
        except ValueError:     # parse_qsl: too many fields
            self.metrics.inc("http_requests_refused_total", reason="bad_query")
            self.metrics.inc("http_requests_total")
            return 400, JSON_TYPE, json.dumps({"error": "bad_query",
                                               "detail": "too many query fields"}).encode()
        if text is None:
            return None
        self.metrics.inc("http_requests_total")
        return 200, "text/plain; charset=utf-8", text.encode()

    def boot_script(self, name: str, args: Mapping[str, str], remote_addr: str, *,
                    inline: bool = False, loader: str = "ipxe") -> str | None:
        """The per-machine iPXE script for ``/boot/<name>`` (``<mac>.ipxe``),
        or with ``loader="grub"`` the GRUB config for ``/grub/<name>``
        (``<mac>.cfg``): one decision, rendered from ``templates/<loader>/``.

        Decided from the cache; only ``claim``/``continue`` decisions reach
        etcd (through :func:`bootsvc.state.claim.claim_install`), and fail closed
        to a wait script.  Raises :class:`HttpError` for a bad name.  With
        ``inline`` (called on the event loop) a decision that needs etcd
        returns ``None`` instead: the caller runs it again on a thread.
        """
        started = time.perf_counter()
        try:
            query = parse_script_query(name, args, suffix=LOADER_SUFFIXES[loader])
        except BadScriptPath as exc:
            self.metrics.inc("http_requests_refused_total", reason=exc.reason)
            raise
        view, mac = self._find_machine(query)
        image = self.image_for(view)
        decision = decide_script(view, discovery=self.discovery, image=image,
                                 live_available=self.live is not None, now=time.time(),
                                 image_wait=self.image_wait(view) if image is None else "",
                                 arch=query.arch)
        answer = _ScriptAnswer(decision, view.task if view is not None else None,
                               view.server if view is not None else None)
        if decision.destructive and view is not None and image is not None:
            if inline:
                return None
            self._claim(answer, view, image, query.uuid)
        sn = view.sn if view is not None else ""
        text = self._render_or_wait(answer, query, sn=sn, mac=mac, image=image, loader=loader,
                                    remote_addr=remote_addr)
        decision = answer.decision
        if decision.action == DISCOVERY and sn:
            self.tokens.drop_async(sn, why="new boot")      # a new boot means a new agent
        stage = "grub config" if loader == "grub" else "boot script"
        self.ctx.timeline.record(f"sn:{sn}" if sn else mac, stage, {
            "decision": decision.action, "reason": decision.reason, "mac": mac,
            "ip": remote_addr, "arch": query.arch, "platform": query.platform})
        self.metrics.inc("http_boot_scripts_total", decision=decision.action)
        self.metrics.inc("http_boot_script_etcd_requests_total", answer.etcd_requests,
                         decision=decision.action)
        self.metrics.observe("http_boot_script_seconds", time.perf_counter() - started)
        return text

    def _find_machine(self, query: ScriptQuery) -> tuple[MachineView | None, str]:
        """The machine that asks and the MAC it is known by: its own, else
        (iPXE chain-loaded from another NIC) the ``bootmac`` it booted from."""
        machines = self.ctx.machines
        view = machines.lookup(query.mac, query.uuid or None, query.serial or None)
        if view is None and query.bootmac and query.bootmac != query.mac:
            view = machines.lookup(query.bootmac)
            if view is not None:
                return view, query.bootmac
        return view, query.mac

    def _claim(self, answer: _ScriptAnswer, view: MachineView, image: Image,
               boot_uuid: str) -> None:
        """Confirm a destructive decision with etcd (claim or continue the
        install); a refused claim turns ``answer`` into a wait script."""
        decision = answer.decision
        outcome = claim_install(self.ctx.store, self.ctx.keys, self.tokens, idc=self.ctx.idc,
                                sn=view.sn, node=self.ctx.node_name,
                                continuing=decision.action == CONTINUE,
                                renew="delete" if image.mode == "image" else "issue",
                                boot_uuid=boot_uuid)
        answer.etcd_requests = outcome.etcd_requests
        if outcome.install:
            answer.token = outcome.token
            answer.task, answer.server = outcome.task, outcome.server or answer.server
            # read-your-writes: the installer's next fetches are answered from the cache
            self.ctx.cache.wait_for_revision(outcome.revision, 1.0)
            self.metrics.inc("http_install_claims_total",
                             result="claimed" if decision.action == CLAIM else "confirmed")
        else:
            self.metrics.inc("http_install_claims_total", result="refused")
            answer.decision = ScriptDecision(WAIT, TEMPLATES[WAIT], outcome.reason,
                                             decision.sn)

    def _render_or_wait(self, answer: _ScriptAnswer, query: ScriptQuery, *, sn: str, mac: str,
                        image: Image | None, loader: str = "ipxe",
                        remote_addr: str | None = None) -> str:
        """The script of ``answer``; a template that fails to render gives a
        wait script that says so (and ``answer`` becomes that wait)."""
        decision = answer.decision
        try:
            return self._render_script(decision, sn=sn, mac=mac, arch=query.arch,
                                       platform=query.platform, task=answer.task,
                                       server=answer.server, image=image, token=answer.token,
                                       loader=loader, remote_addr=remote_addr)
        except RenderError as exc:
            log.error("boot %s for %s: %s", "config" if loader == "grub" else "script", mac, exc)
            template = loader_template(decision.template, loader)
            self.metrics.inc("http_render_errors_total", template=template)
            reason = f"the {decision.action} script could not be rendered; ask the operator"
            answer.decision = ScriptDecision(WAIT, TEMPLATES[WAIT], reason, sn)
            return self.renderer.render(loader_template(answer.decision.template, loader),
                                        self.context(decision=answer.decision.action,
                                                     reason=reason, sn=sn, mac=mac,
                                                     remote_addr=remote_addr))

    def _render_script(self, decision: ScriptDecision, *, sn: str, mac: str, arch: str,
                       platform: str, task: Any, server: Any, image: Image | None,
                       token: str, loader: str = "ipxe", remote_addr: str | None = None) -> str:
        """Render a boot script; one without a token (every non-destructive
        answer) is rendered once per state of the machine's records and
        reused while they stay the same (a pending machine's iPXE asks again
        every ``retry_delay`` seconds)."""
        live = self.live
        template = loader_template(decision.template, loader)
        key = (template, decision.action, decision.reason, sn, mac, arch, platform,
               self.node_url(remote_addr))
        if not token:
            hit = self._scripts.get(key)
            if hit is not None and hit[0] is task and hit[1] is server and hit[2] is image \
                    and hit[3] is live:
                self.metrics.inc("http_boot_script_renders_total", cached="yes")
                return hit[4]
        text = self.renderer.render(template, self.context(
            decision=decision.action, reason=decision.reason, sn=sn, mac=mac, arch=arch,
            platform=platform, task=task, server=server, image=image, token=token,
            remote_addr=remote_addr))
        self.metrics.inc("http_boot_script_renders_total", cached="no")
        if not token:
            if len(self._scripts) >= SCRIPT_MEMO_SIZE:
                self._scripts.clear()
            self._scripts[key] = (task, server, image, live, text)
        return text


def current_boot() -> BootBackend:
    """The :class:`BootBackend` of the app answering this request."""
    return current_app.extensions["lpmos_boot"]  # type: ignore[no-any-return]
