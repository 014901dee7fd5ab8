"""The peer's subscriber: streaming pull → ``EmailMessage`` → smtplib → ack.

Written as Google's Pub/Sub samples suggest and no more: the client's default flow control and
callback threads, one SMTP connection per callback thread kept open between mails, nack on an
SMTP error (the connection is dropped and opened again for the next mail). No record, no
tracing. ``python -m bench.peer.subscriber``; the environment names the subscription
(``GOOGLE_CLOUD_PROJECT``, ``PEER_SUBSCRIPTION``) and the SMTP server (``PEER_SMTP_HOST``,
``PEER_SMTP_PORT``).
"""

from __future__ import annotations

import json
import os
import smtplib
import threading
from email.message import EmailMessage
from typing import Any

from google.cloud import pubsub_v1

READY_MARKER = "pulling from"


def main() -> None:
    subscriber = pubsub_v1.SubscriberClient()
    subscription = subscriber.subscription_path(
        os.environ["GOOGLE_CLOUD_PROJECT"], os.environ["PEER_SUBSCRIPTION"]
    )
    smtp_host, smtp_port = os.environ["PEER_SMTP_HOST"], int(os.environ["PEER_SMTP_PORT"])
    local = threading.local()

    def connection() -> smtplib.SMTP:
        if getattr(local, "smtp", None) is None:
            local.smtp = smtplib.SMTP(smtp_host, smtp_port)
        return local.smtp  # type: ignore[no-any-return]

    def callback(message: Any) -> None:
        mail = json.loads(message.data)
        email = EmailMessage()
        email["From"] = mail["from"]
        email["To"] = ", ".join(mail["to"])
        email["Subject"] = mail["subject"]
        for name, value in mail.get("headers", {}).items():
            email[name] = value
        email.set_content(mail["text"])
        try:
            connection().send_message(email)
        except (smtplib.SMTPException, OSError):
            local.smtp = None
            message.nack()
            return
        message.ack()

    future = subscriber.subscribe(subscription, callback=callback)
    print(f"{READY_MARKER} {subscription}", flush=True)
    with subscriber:
        future.result()


if __name__ == "__main__":
    main()
