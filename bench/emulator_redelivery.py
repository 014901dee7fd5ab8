"""Measure how often the Pub/Sub emulator redelivers the messages of a killed streaming consumer.

Production redelivers a dead consumer's messages once their ack deadline passes. The emulator
sometimes does and sometimes keeps them leased to the dead stream; this measures how often, with and
without CPU load beside it, so docs/local-vs-gcp.md (row 9b) and the contract test state what holds
every time.

    python -m bench.emulator_redelivery --trials 10 --load 0 --load 2 --observe 40 [--policies]

Each trial: a fresh topic and subscription (ack deadline 10 s), 3 messages published, a consumer
process that receives them and never acks is SIGKILLed, then the subscription is polled with unary
pull for ``--observe`` seconds. Prints one line per trial and a summary; ``--json`` writes the raw
results. Everything runs on 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from emulator import publisher_client, start_pubsub_emulator, subscriber_client

ACK_DEADLINE_SECONDS = 10
PROJECT = "redelivery-measure"

# The consumer a trial kills; tests/integration/test_emulator_contract.py runs the same one.
DYING_CONSUMER = r"""
import sys
from google.cloud.pubsub_v1.types import FlowControl
from emulator import subscriber_client
received = []
def callback(message):
    received.append(message)  # hold it: never ack, never nack
    print("received", flush=True)
subscriber_client(sys.argv[1]).subscribe(
    sys.argv[2], callback, flow_control=FlowControl(max_duration_per_lease_extension=10)
).result()
"""


@dataclass
class Trial:
    load: int
    held: int
    redelivered: int
    first_redelivery_s: float | None  # seconds after the kill
    loadavg: float


def _burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        pass


def _trial(host: str, load: int, observe: float, *, policies: bool, messages: int = 3) -> Trial:
    publisher = publisher_client(host)
    subscriber = subscriber_client(host)
    suffix = uuid.uuid4().hex[:8]
    topic = f"projects/{PROJECT}/topics/held-{suffix}"
    subscription = f"projects/{PROJECT}/subscriptions/held-{suffix}"
    publisher.create_topic(name=topic)
    request: dict[str, object] = {
        "name": subscription,
        "topic": topic,
        "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
    }
    if policies:  # the contract test's delivery subscription (tests/fixtures/emulators.py)
        dead_letter_topic = f"{topic}-dead"
        publisher.create_topic(name=dead_letter_topic)
        request["retry_policy"] = {"minimum_backoff": "1s", "maximum_backoff": "2s"}
        request["dead_letter_policy"] = {
            "dead_letter_topic": dead_letter_topic,
            "max_delivery_attempts": 5,
        }
    subscriber.create_subscription(request=request)
    for i in range(messages):
        publisher.publish(topic, b"held %d" % i).result(timeout=60)
    burners = [
        multiprocessing.Process(target=_burn, args=(time.monotonic() + observe + 30,))
        for _ in range(load)
    ]
    for burner in burners:
        burner.start()
    try:
        consumer = subprocess.Popen(
            [sys.executable, "-c", DYING_CONSUMER, host, subscription],
            stdout=subprocess.PIPE,
        )
        try:
            assert consumer.stdout is not None
            output = b""
            deadline = time.monotonic() + 30
            # The stream may hand over fewer than all messages: never block on a read.
            while output.count(b"received") < messages and time.monotonic() < deadline:
                ready, _, _ = select.select([consumer.stdout], [], [], 0.5)
                if ready:
                    output += os.read(consumer.stdout.fileno(), 4096)
            received = output.count(b"received")
        finally:
            consumer.send_signal(signal.SIGKILL)
            consumer.wait(timeout=10)
        killed_at = time.monotonic()
        redelivered, first = 0, None
        while time.monotonic() < killed_at + observe and redelivered < received:
            response = subscriber.pull(
                request={"subscription": subscription, "max_messages": 10},
                timeout=5,
            )
            if response.received_messages:
                first = first if first is not None else time.monotonic() - killed_at
                redelivered += len(response.received_messages)
                subscriber.acknowledge(
                    request={
                        "subscription": subscription,
                        "ack_ids": [m.ack_id for m in response.received_messages],
                    }
                )
            time.sleep(0.5)
        return Trial(load, received, redelivered, first, os.getloadavg()[0])
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
        subscriber.delete_subscription(request={"subscription": subscription})
        publisher.delete_topic(request={"topic": topic})
        if policies:
            publisher.delete_topic(request={"topic": f"{topic}-dead"})
        subscriber.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per load level")
    parser.add_argument(
        "--load", type=int, action="append", help="CPU-burning processes beside (repeatable)"
    )
    parser.add_argument("--observe", type=float, default=40.0, help="seconds to wait after a kill")
    parser.add_argument(
        "--policies",
        action="store_true",
        help="retry policy 1-2 s and dead-lettering after 5, as the contract test's subscription",
    )
    parser.add_argument("--json", type=Path, help="write the raw trials here")
    args = parser.parse_args(argv)
    loads = args.load or [0, 2]
    results: list[Trial] = []
    with start_pubsub_emulator(reuse_env=False) as emulator:
        host = emulator.host
        for load in loads:
            for n in range(args.trials):
                trial = _trial(host, load, args.observe, policies=args.policies)
                results.append(trial)
                when = (
                    f"first after {trial.first_redelivery_s:.1f} s"
                    if trial.first_redelivery_s is not None
                    else "none"
                )
                print(
                    f"load {load} trial {n + 1}: held {trial.held}, redelivered "
                    f"{trial.redelivered} ({when}), loadavg {trial.loadavg:.1f}",
                    flush=True,
                )
    for load in loads:
        trials = [t for t in results if t.load == load]
        some = sum(1 for t in trials if t.redelivered)
        every = sum(1 for t in trials if t.redelivered == t.held)
        firsts = sorted(t.first_redelivery_s for t in trials if t.first_redelivery_s is not None)
        span = f"{firsts[0]:.1f} to {firsts[-1]:.1f} s after the kill" if firsts else "none"
        print(
            f"load {load}: {some}/{len(trials)} trials redelivered some, {every}/{len(trials)} "
            f"all held messages within {args.observe:g} s ({span})"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
