"""The push endpoint as functions-framework targets (Cloud Run functions, or any FaaS host).

    functions-framework --source subscriber/function.py --target deliver --port 8080
    functions-framework --source subscriber/function.py --target dead_letter --port 8081

Same handler as ``python -m subscriber push`` (:class:`subscriber.push.PushHandler`): the Pub/Sub
push envelope or its CloudEvent form, the same OIDC check, the same ack/nack answers. The
collaborators are built from the environment on the first request, not at import. Every answer
with a body is JSON, as from the push app: a method other than POST gets 405, an unknown path
404, an unexpected failure 500 (logged; Pub/Sub retries it) — registered through
functions-framework's own ``errorhandler``.

Push authentication: on Cloud Run functions (Cloud Run IAM in front, invoker check on) set
``MAILPIPE_PUSH_AUTH=cloud-run``; on any other host keep the default ``signature``. The handler
exports its spans before answering when the instance goes idle (request-based CPU).
"""

from __future__ import annotations

import logging
import os
import threading

import functions_framework
from flask import Request, Response
from werkzeug.exceptions import MethodNotAllowed

from mailpipe.httpjson import json_error_handlers
from subscriber.config import SubscriberConfig
from subscriber.main import build_push_handler, build_services
from subscriber.push import PushHandler

log = logging.getLogger(__name__)
_handler: PushHandler | None = None
_lock = threading.Lock()
_NOT_FOUND_HINT = "Pub/Sub pushes to this function's URL with POST"


for _error_class, _on_error in json_error_handlers(not_found_hint=_NOT_FOUND_HINT, log=log).items():
    functions_framework.errorhandler(_error_class)(_on_error)


def _require_post(request: Request) -> None:
    # functions-framework routes every method to the function.
    if request.method != "POST":
        raise MethodNotAllowed(valid_methods=["POST"])


def _push_handler() -> PushHandler:
    global _handler  # noqa: PLW0603 - the FaaS model: one handler per instance, built lazily
    with _lock:
        if _handler is None:
            config = SubscriberConfig.from_env(os.environ, push=True)
            services = build_services(config)
            try:
                _handler = build_push_handler(config, services)
            except BaseException:
                # Each request tries again: without this, each would leave a Telemetry (its
                # exporter threads), a record and an SMTP pool behind.
                services.close()
                raise
        return _handler


@functions_framework.http
def deliver(request: Request) -> Response:
    """Deliver one pushed mail (the mail subscription's push endpoint)."""
    _require_post(request)
    return _push_handler().deliver(request)


@functions_framework.http
def dead_letter(request: Request) -> Response:
    """Record one dead-lettered mail (the dead-letter record subscription's push endpoint)."""
    _require_post(request)
    return _push_handler().dead_letter(request)
