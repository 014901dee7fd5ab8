"""Which scenarios a run has: ``full`` (under ~10 minutes) or ``quick`` (under ~2 minutes).

The reference configuration is pull mode, 1 KiB mails, tracing to a file at 100 % sampling, SMTP
pool 4, one worker: the issue's targets are stated for it. Every other scenario changes one thing
from it, so each ratio compares runs of the same benchmark on the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bench.pipeline import Scenario

REFERENCE = "pull-1k"
# Tracing on and off alternate as off, on, on, off (ABBA) in the full profile: the mean of each
# then cancels a steady drift of the machine's speed, which on a shared machine is as large as
# the effect measured. The quick profile runs one pair.
TRACE_ON_RUNS = ("pull-1k-trace-1.0", "pull-1k-trace-1.0-2")
TRACE_OFF_RUNS = ("pull-1k-trace-off", "pull-1k-trace-off-2")
# The peer (bench.peer, the simplest pipeline) runs between mailpipe's tracing-on runs, ABBA again
# (on, peer, peer, on): the headline compares the means of PEER_RUNS and TRACE_ON_RUNS.
PEER_RUNS = ("peer-1k", "peer-1k-2")
# mailpipe through POST /v1/messages:batch, 100 mails a request, everything else the reference's.
BATCH_SIZE = 100
BATCH_RUNS = ("pull-1k-batch-100", "pull-1k-batch-100-2")
# Requests in flight in a batch run: 4 x 100 mails keeps the publisher's threads busy and lets a
# run of a few thousand mails go round several times (32 x 100 would send it all at once).
BATCH_CONCURRENCY = 4


@dataclass(frozen=True)
class Profile:
    name: str
    smtp_mails: int
    smtp_new_connection_mails: int
    pubsub_messages: int
    scenarios: tuple[Scenario, ...]


def _scenarios(
    mails: int, big_mails: int, warmup: int, latency_seconds: float, quick: bool
) -> tuple[Scenario, ...]:
    ref = Scenario(
        name=REFERENCE,
        group="pipeline",
        mails=mails,
        warmup=warmup,
        latency_fractions=(0.5, 0.9),
        latency_seconds=latency_seconds,
        stages=True,
    )
    big = replace(
        ref,
        stages=False,
        name="pull-100k",
        body_bytes=100 * 1024,
        mails=big_mails,
        warmup=warmup // 3,
        latency_fractions=(),
    )
    push = replace(
        ref,
        name="push-1k",
        mode="push",
        stages=False,  # a stopped push endpoint would only measure the emulator's retries
        latency_fractions=() if quick else (0.5, 0.9),
    )
    push_big = replace(big, name="push-100k", mode="push")
    scaled = replace(ref, latency_fractions=(), stages=False)
    off = replace(scaled, name=TRACE_OFF_RUNS[0], group="tracing", traces="none")
    on = replace(scaled, name=TRACE_ON_RUNS[0], group="tracing")  # the reference's configuration
    tenth = replace(scaled, name="pull-1k-trace-0.1", group="tracing", sample_ratio=0.1)
    two_workers = replace(scaled, name="pull-1k-2-workers", group="workers", subscribers=2)
    peer = replace(scaled, name=PEER_RUNS[0], group="peer", stack="peer", traces="none")
    batch = replace(
        scaled,
        name=BATCH_RUNS[0],
        group="batch",
        batch=BATCH_SIZE,
        concurrency=BATCH_CONCURRENCY,
        mails=max(2 * mails, BATCH_SIZE * BATCH_CONCURRENCY * 3),
        warmup=max(warmup, BATCH_SIZE * BATCH_CONCURRENCY),
    )
    if quick:  # one scenario per question
        return (ref, big, push, off, on, peer, batch, tenth, two_workers)
    tracing = [
        off,
        on,
        peer,
        replace(peer, name=PEER_RUNS[1]),
        replace(on, name=TRACE_ON_RUNS[1]),
        replace(off, name=TRACE_OFF_RUNS[1]),
    ]
    batches = [batch, replace(batch, name=BATCH_RUNS[1])]
    four_workers = replace(two_workers, name="pull-1k-4-workers", subscribers=4)
    pools = [replace(scaled, name=f"pull-1k-pool-{n}", group="pool", pool_size=n) for n in (1, 16)]
    return (ref, big, push, push_big, *tracing, *batches, tenth, two_workers, four_workers, *pools)


PROFILES = {
    "full": Profile(
        name="full",
        smtp_mails=3000,
        smtp_new_connection_mails=300,
        pubsub_messages=20_000,
        scenarios=_scenarios(
            mails=1200, big_mails=250, warmup=200, latency_seconds=8.0, quick=False
        ),
    ),
    "quick": Profile(
        name="quick",
        smtp_mails=800,
        smtp_new_connection_mails=100,
        pubsub_messages=4000,
        scenarios=_scenarios(mails=300, big_mails=60, warmup=80, latency_seconds=3.0, quick=True),
    ),
}


def tiny(name: str = REFERENCE, mails: int = 20, *, also: tuple[str, ...] = ()) -> Profile:
    """A few mails through one scenario (and those named in ``also``, without latency runs):
    checks the harness works (the smoke test)."""
    by_name = {s.name: s for s in PROFILES["quick"].scenarios}
    scenario = replace(
        by_name[name], mails=mails, warmup=5, latency_fractions=(0.5,), latency_seconds=1.0
    )
    others = tuple(_tiny(by_name[other], mails) for other in also)
    return Profile(
        name="tiny",
        smtp_mails=mails,
        smtp_new_connection_mails=mails,
        pubsub_messages=mails * 10,
        scenarios=(scenario, *others),
    )


def _tiny(scenario: Scenario, mails: int) -> Scenario:
    # A batch scenario keeps its batch size: a few requests of it.
    count = max(mails, 2 * scenario.batch)
    return replace(scenario, mails=count, warmup=min(scenario.warmup, count), latency_fractions=())
