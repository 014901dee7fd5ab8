"""The delivery record: what happened to every mail, keyed by its mail id.

One interface (:class:`DeliveryRecord`), two backends: SQLite (the embedded default,
``sqlite:///PATH``) and Firestore on GCP (``firestore://DATABASE``). Open one with
:func:`open_record`. See :mod:`mailpipe.record.base` for the model, the rules and the error tree,
:mod:`mailpipe.record.store` for what a backend implements.
"""

from __future__ import annotations

from mailpipe.record.base import *  # noqa: F403 (the names in base.__all__)
