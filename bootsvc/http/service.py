"""The boot HTTP service of a regional node: the app of
:func:`bootsvc.http.app.create_app` served on ``regional.listen``:``http.port``
by :class:`bootsvc.http.server.AsyncHttpServer`, with a request deadline,
an idle timeout, header and body size limits and a connection limit (the
``http.*`` settings).

The boot scripts that need no etcd request are answered inline on the
event loop, the catalog's files are sent from it with sendfile
(:mod:`bootsvc.http.file_fastpath`); the rest of the app runs on a
bounded thread pool.
"""

from __future__ import annotations

import logging

from flask import Flask

from bootsvc.context import NodeContext
from bootsvc.http.app import create_app
from bootsvc.http.backend import BootBackend
from bootsvc.http.file_fastpath import CatalogFiles
from bootsvc.http.server import AsyncHttpServer
from bootsvc.http.settings import HttpSettings
from bootsvc.netif import url_host
from bootsvc.threaded_loop import ThreadedLoop

log = logging.getLogger(__name__)


class HttpService:
    """The node's boot HTTP, like its ``DhcpService`` and ``TftpService``:
    builds the app and its :class:`BootBackend`, starts the backend's
    workers and an :class:`AsyncHttpServer` on the port, publishes the
    server's gauges and the node's ``advertise_url``, and stops them in
    order (long polls released first).  It holds no request logic.

    The node awaits :meth:`start_async` / :meth:`stop_async` on its own
    event loop (the one DHCP and TFTP run on); :meth:`start` / :meth:`stop`
    run it on a private loop thread instead (tests, tools)."""

    def __init__(self, ctx: NodeContext, *, app: Flask | None = None) -> None:
        self.ctx = ctx
        self.app = app or create_app(ctx)
        self.boot: BootBackend = self.app.extensions["lpmos_boot"]
        self._server: AsyncHttpServer | None = None
        self._own_loop: ThreadedLoop | None = None
        self.port = 0

    async def start_async(self) -> HttpService:
        cfg = self.ctx.config
        settings = HttpSettings.from_config(cfg)
        metrics = self.ctx.metrics
        self.boot.start()
        server = AsyncHttpServer(
            self.app.wsgi_app,
            host=cfg.get("regional.listen", "0.0.0.0"),
            port=settings.port,
            threads=settings.threads,
            connection_limit=settings.connection_limit,
            timeout=settings.timeout,
            max_body=settings.max_body,
            max_header=settings.max_header,
            fast=self.boot.fast_answer,
            files=CatalogFiles(self.boot).answer,
            on_refused=lambda reason: metrics.inc("http_requests_refused_total", reason=reason),
        )
        await server.start()
        self._server = server
        # the pool has work unless all it holds are parked agent long-polls
        self.ctx.busy_checks.append(lambda: server.in_app > self.boot.parked)
        metrics.gauge("http_connections_open", lambda: float(len(server.conns)),
                      "client connections open on the boot HTTP server")
        metrics.gauge("http_requests_in_app", lambda: float(server.in_app),
                      "requests queued for or running on the app threads (--http-threads: "
                      "claims, agent API, configs, files); boot scripts are answered inline")
        self.port = server.port
        if not self.ctx.advertise_url:
            host = self.ctx.server_ip or cfg.get("regional.listen", "127.0.0.1")
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            self.ctx.advertise_url = f"http://{url_host(host)}:{self.port}"
        log.info("boot HTTP on %s:%d (machines use %s)", cfg.get("regional.listen"), self.port,
                 self.ctx.advertise_url)
        return self

    async def stop_async(self) -> None:
        self.boot.task_waits.release_all()
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
