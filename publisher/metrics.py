"""The publisher's metrics: the accepted counter and the two gauges read from the record.

The instruments and their names in Prometheus and Cloud Monitoring are in
docs/observability.md; the names are an interface (dashboards and alerts query them). The meter
is the service's, from :func:`mailpipe.telemetry.setup_telemetry` (``Telemetry.meter``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from mailpipe.attributes import METRIC_STUCK_KIND

_log = logging.getLogger(__name__)

OldestUndeliveredSource = Callable[[], "float | None"]
StuckSource = Callable[[], "Mapping[str, int] | None"]


class PublisherMetrics:
    """Records the publisher's metrics through one ``Meter``; cheap and thread-safe."""

    def __init__(self, meter: Meter) -> None:
        self._accepted = meter.create_counter(
            "mailpipe.mails.accepted", unit="{mail}", description="Mails accepted (HTTP 202)."
        )
        self._sources: dict[str, Callable[[], Any] | None] = {}
        meter.create_observable_gauge(
            "mailpipe.oldest_undelivered_age",
            callbacks=[
                self._gauge("oldest-undelivered", lambda age: [Observation(max(0.0, float(age)))])
            ],
            unit="s",
            description="Age of the oldest accepted mail not yet delivered or given up on.",
        )
        meter.create_observable_gauge(
            "mailpipe.mails.stuck",
            callbacks=[self._gauge("stuck-records", _stuck_observations)],
            unit="{mail}",
            description="Records `mailpipe reconcile --fix` would settle (expired reservations, "
            "stalled deliveries) and those it marked unconfirmed, by mailpipe.stuck.kind.",
        )

    def accepted(self) -> None:
        """One mail was published and answered 202."""
        self._accepted.add(1)

    # The gauges' sources run on the metric reader's thread at each collection (keep them fast)
    # and return None when there is nothing to report: no point then, not a zero.

    def set_oldest_undelivered_source(self, source: OldestUndeliveredSource | None) -> None:
        """The age in seconds of the oldest undelivered mail, for the lag gauge."""
        self._sources["oldest-undelivered"] = source

    def set_stuck_source(self, source: StuckSource | None) -> None:
        """``{kind: count}`` (:func:`publisher.reconcile.stuck_counts`) for the stuck gauge."""
        self._sources["stuck-records"] = source

    def _gauge(
        self, name: str, observations: Callable[[Any], list[Observation]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_options: CallbackOptions) -> Iterable[Observation]:
            source = self._sources.get(name)
            try:
                value = None if source is None else source()
            except Exception:  # a broken source must not break every other metric's export
                _log.exception("%s source failed", name)
                return []
            return [] if value is None else observations(value)

        return callback


def _stuck_observations(counts: Mapping[str, int]) -> list[Observation]:
    return [
        Observation(max(0, int(count)), {METRIC_STUCK_KIND: str(kind)})
        for kind, count in sorted(counts.items())
    ]
