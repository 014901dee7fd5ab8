"""The publisher's delivery event: ``accepted``, once Pub/Sub has the mail (docs/events.md).

:class:`AcceptedEvents` wraps the app's :class:`~publisher.pubsub.MailPublisher`, so the event is
emitted inside the request's span (the mail's trace) right after the publish is confirmed, and
only then: a refused publish, or an idempotent replay of a key (which publishes nothing), emits
nothing. A failed emission never changes the answer (see :mod:`mailpipe.events`).
"""

from __future__ import annotations

from mailpipe.events import EventEmitter, EventType
from mailpipe.mail import QueuedMail
from publisher.pubsub import MailPublisher


class AcceptedEvents:
    """A :class:`MailPublisher` that emits ``accepted`` for each mail it publishes."""

    def __init__(self, publisher: MailPublisher, events: EventEmitter) -> None:
        self._publisher = publisher
        self._events = events

    def publish(self, mail: QueuedMail) -> str:
        message_id = self._publisher.publish(mail)
        self._events.emit(EventType.ACCEPTED, mail.mail_id, mail=mail)
        return message_id

    def close(self) -> None:
        self._publisher.close()
        self._events.close()
