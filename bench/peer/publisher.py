"""The peer's publisher: a Flask route that publishes the request body and answers 202.

Written as Google's Pub/Sub samples suggest and no more: no validation, no record, no tracing.
Served by gunicorn like mailpipe's publisher (one worker, 16 threads)::

    python -m gunicorn --workers 1 --threads 16 'bench.peer.publisher:create_app()'

The environment names the topic: ``GOOGLE_CLOUD_PROJECT`` and ``PEER_TOPIC`` (the client library
finds the emulator through ``PUBSUB_EMULATOR_HOST``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Flask, request
from google.cloud import pubsub_v1


def create_app() -> Flask:
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["PEER_TOPIC"])
    app = Flask(__name__)

    @app.post("/v1/messages")
    def send() -> tuple[dict[str, Any], int]:
        data = json.dumps(request.get_json()).encode()
        message_id = publisher.publish(topic, data).result()
        return {"message_id": message_id}, 202

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
