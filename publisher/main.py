"""The publisher's production entry point: gunicorn serving the app on ``$PORT``.

``python -m publisher`` runs it (see :mod:`mailpipe.serving` for the SIGTERM behaviour).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from flask import Flask

from mailpipe.config import PublisherConfig
from mailpipe.logs import configure_logging
from mailpipe.record import open_record
from mailpipe.serving import serve_wsgi
from mailpipe.telemetry import setup_telemetry
from publisher.app import create_app
from publisher.pubsub import PubSubMailPublisher


def build_app(config: PublisherConfig) -> tuple[Flask, Callable[[], None]]:
    """Wire the production collaborators; returns the app and its ``close()``."""
    telemetry = setup_telemetry(config.telemetry)
    configure_logging(config.telemetry, project=config.pubsub.project)
    publisher = PubSubMailPublisher(config.pubsub, timeout=config.publish_timeout)
    record = open_record(config.record)
    app = create_app(
        config,
        publisher=publisher,
        record=record,
        metrics=telemetry.metrics,
        tracer_provider=telemetry.tracer_provider,
    )

    def close() -> None:
        publisher.close()
        record.close()
        telemetry.shutdown()

    return app, close


def serve(environ: Mapping[str, str] | None = None) -> None:
    """Read the config (failing fast) and serve until SIGTERM."""
    config = PublisherConfig.from_env(os.environ if environ is None else environ)
    serve_wsgi(lambda: build_app(config), host=config.host, port=config.port)
