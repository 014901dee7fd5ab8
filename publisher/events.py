"""The publisher's delivery event: ``accepted``, once Pub/Sub has the mail (docs/events.md).

:class:`AcceptedEvents` wraps the app's :class:`~publisher.pubsub.MailPublisher`, so the event is
emitted right after the publish is confirmed, where the app waits for it: inside the request's
span for ``POST /v1/messages``, inside each mail's own span for the batch endpoint (the mail's
trace either way). Only then: a refused publish, or an idempotent replay of a key (which
publishes nothing), emits nothing. A failed emission never changes the answer (see
:mod:`mailpipe.events`).
"""

from __future__ import annotations

from collections.abc import Callable

from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import QueuedMail
from publisher.pubsub import MailPublisher


class AcceptedEvents:
    """A :class:`MailPublisher` that emits ``accepted`` for each mail it publishes."""

    def __init__(self, publisher: MailPublisher, events: EventEmitter) -> None:
        self._publisher = publisher
        self._events = events

    def publish(self, mail: QueuedMail) -> str:
        return self.start(mail)()

    def start(self, mail: QueuedMail) -> Callable[[], str]:
        wait = self._publisher.start(mail)

        def confirmed() -> str:
            message_id = wait()  # raises what a refused publish raises: no event
            self._events.emit(EventType.ACCEPTED, mail.mail_id, mail=mail)
            return message_id

        return confirmed

    def close(self) -> None:
        self._publisher.close()
        self._events.close()
