"""The delivery record: what happened to every mail, keyed by its mail id; :func:`open_record`
opens SQLite (``sqlite:///PATH``) or Firestore (``firestore://DATABASE``). The model, rules and
errors: :mod:`mailpipe.record.base`; what a backend implements: :mod:`mailpipe.record.store`."""

from __future__ import annotations

from mailpipe.record.base import *  # noqa: F403 (the names in base.__all__)
