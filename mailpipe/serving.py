"""Serving a WSGI app with gunicorn, configured in code (both services use it).

The app is built by ``build()`` inside the worker, after the fork, because gRPC clients must not
cross a fork. On SIGTERM (Cloud Run's stop signal) gunicorn stops accepting, finishes requests in
flight within ``graceful_timeout``, then ``close()`` runs in the worker: it flushes the Pub/Sub
publisher's batch and the telemetry so the last spans are exported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

WsgiApp = Callable[..., Any]
Build = Callable[[], tuple[WsgiApp, Callable[[], None]]]


class _Server(BaseApplication):
    def __init__(self, build: Build, options: dict[str, Any]) -> None:
        self._build = build
        self._options = options
        self._close: Callable[[], None] | None = None
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)
        self.cfg.set("worker_exit", self._worker_exit)

    def _worker_exit(self, _arbiter: Any, _worker: Any) -> None:
        if self._close is not None:
            self._close()

    def load(self) -> WsgiApp:
        app, self._close = self._build()
        return app


def serve_wsgi(
    build: Build,
    *,
    host: str,
    port: int,
    threads: int = 16,
    graceful_timeout: int = 8,
) -> None:
    """Serve ``build()``'s app on ``host:port`` with one gthread worker until SIGTERM/SIGINT.

    One worker with threads: the process holds one Pub/Sub client and one SMTP pool; Cloud Run
    scales by instances. ``graceful_timeout`` stays under Cloud Run's 10 s SIGTERM grace period.
    """
    options: dict[str, Any] = {
        "bind": f"{host}:{port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 0,  # Cloud Run enforces the request timeout; the arbiter must not kill us
        "graceful_timeout": graceful_timeout,
        "accesslog": None,
        "loglevel": "warning",
    }
    _Server(build, options).run()
