"""``POST /v1/messages:batch`` on the real pipeline: the publisher over HTTP, the Pub/Sub emulator,
a streaming-pull subscriber and aiosmtpd. Each mail of a batch is accepted (or refused) as the
single endpoint would, delivered on its own, and traced on its own with a link to the request.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
from opentelemetry.trace import SpanKind

from mailpipe.attributes import SPAN_LINK_KIND, SPAN_MAIL_ID
from mailpipe.record import MailStatus
from publisher.app import BATCH_LINK_KIND, BATCH_MAIL_SPAN, MAX_REQUEST_BYTES
from publisher.listing import list_mails
from publisher.openapi import MAX_BATCH_MAILS
from publisher.pubsub import MAX_PUBSUB_DATA_BYTES
from tests.fixtures.pipeline import Pipeline
from tests.integration.test_publisher_api import assert_json_error

BATCH = "/v1/messages:batch"


def mail(number: int, **changes: Any) -> dict[str, Any]:
    return {
        "from": "Ada <ada@example.com>",
        "to": [f"rcpt{number}@example.org"],
        "subject": f"batch mail {number}",
        "text": f"hello {number}",
        **changes,
    }


def post_batch(pipeline: Pipeline, mails: Any, **kwargs: Any) -> httpx.Response:
    return pipeline.http.post(BATCH, json={"messages": mails}, **kwargs)


def assert_nothing_accepted(pipeline: Pipeline) -> None:
    assert list_mails(pipeline.record, limit=10).items == []
    assert pipeline.smtp.messages == []


def delivered(pipeline: Pipeline, mail_ids: list[str]) -> None:
    for mail_id in mail_ids:
        pipeline.wait_for_record(mail_id, lambda r: r.status is MailStatus.DELIVERED)


def test_every_mail_of_a_batch_is_delivered_in_its_own_trace_linked_to_the_request(
    pipeline: Pipeline,
) -> None:
    response = post_batch(pipeline, [mail(n) for n in range(3)])

    assert response.status_code == 202, response.text
    body = response.json()
    assert (body["accepted"], body["refused"]) == (3, 0)
    items = body["items"]
    assert [item["index"] for item in items] == [0, 1, 2]
    assert {item["status_code"] for item in items} == {202}
    assert {item["status"] for item in items} == {"queued"}
    mail_ids = [item["mail_id"] for item in items]
    trace_ids = [item["trace_id"] for item in items]
    assert len(set(mail_ids)) == 3
    assert len(set(trace_ids)) == 3 and body["trace_id"] not in trace_ids

    received = pipeline.smtp.wait_for(3, timeout=30)
    assert sorted(m.message["Subject"] for m in received) == [f"batch mail {n}" for n in range(3)]
    delivered(pipeline, mail_ids)
    topic = pipeline.topology.mail_topic.name
    for item in items:
        record = pipeline.record.get(item["mail_id"])
        assert record.message_id == item["message_id"]
        assert record.trace_id == item["trace_id"]
        spans = pipeline.wait_for_spans(
            item["trace_id"], {BATCH_MAIL_SPAN, f"{topic} create", "mail deliver"}
        )
        names = {s.name for s in spans}
        assert {BATCH_MAIL_SPAN, f"{topic} create", "mail deliver"} <= names, names
        [root] = [s for s in spans if s.name == BATCH_MAIL_SPAN]
        assert root.parent is None and root.kind is SpanKind.INTERNAL
        assert root.attributes[SPAN_MAIL_ID] == item["mail_id"]
        [link] = root.links
        assert format(link.context.trace_id, "032x") == body["trace_id"]
        assert link.attributes[SPAN_LINK_KIND] == BATCH_LINK_KIND
        [create] = [s for s in spans if s.name == f"{topic} create"]
        assert create.parent.span_id == root.context.span_id


def test_a_mixed_batch_answers_207_per_item_and_delivers_only_the_accepted(
    pipeline: Pipeline,
) -> None:
    too_large = mail(3, text="a" * (MAX_PUBSUB_DATA_BYTES + 1000))  # fits the request limit
    response = post_batch(
        pipeline, [mail(0), mail(1, to=["not an address"]), 42, too_large, mail(4)]
    )

    assert response.status_code == 207, response.text
    body = response.json()
    assert (body["accepted"], body["refused"]) == (2, 3)
    first, invalid, not_a_mail, large, last = body["items"]
    assert [first["index"], last["index"]] == [0, 4]
    assert first["status_code"] == last["status_code"] == 202
    assert invalid["index"] == 1 and invalid["status_code"] == 400
    assert invalid["error"]["code"] == "invalid_request"
    assert "to.0" in invalid["error"]["fields"]
    assert not_a_mail["status_code"] == 400 and "JSON object" in not_a_mail["error"]["message"]
    assert large["index"] == 3 and large["status_code"] == 413
    assert large["error"]["code"] == "mail_too_large"
    assert "mail_id" not in invalid and "mail_id" not in large

    delivered(pipeline, [first["mail_id"], last["mail_id"]])
    subjects = sorted(m.message["Subject"] for m in pipeline.smtp.messages)
    assert subjects == ["batch mail 0", "batch mail 4"]
    records = list_mails(pipeline.record, limit=10).items
    assert sorted(r.mail_id for r in records) == sorted([first["mail_id"], last["mail_id"]])


def test_the_largest_batch_is_accepted_and_delivered_whole(pipeline: Pipeline) -> None:
    response = post_batch(pipeline, [mail(n) for n in range(MAX_BATCH_MAILS)])

    assert response.status_code == 202, response.text
    items = response.json()["items"]
    assert len({item["mail_id"] for item in items}) == MAX_BATCH_MAILS
    assert len(pipeline.smtp.wait_for(MAX_BATCH_MAILS, timeout=120)) == MAX_BATCH_MAILS


def test_idempotency_keys_are_per_mail(pipeline: Pipeline) -> None:
    key = f"order-{uuid.uuid4()}"
    mails = [mail(0, idempotency_key=key), mail(1)]
    first = post_batch(pipeline, mails).json()["items"]

    again = post_batch(pipeline, mails)

    assert again.status_code == 202, again.text
    keyed, unkeyed = again.json()["items"]
    assert keyed["mail_id"] == first[0]["mail_id"] and keyed["idempotent_replayed"] is True
    assert unkeyed["mail_id"] != first[1]["mail_id"] and "idempotent_replayed" not in unkeyed
    delivered(pipeline, [first[0]["mail_id"], first[1]["mail_id"], unkeyed["mail_id"]])
    assert len(pipeline.smtp.messages) == 3  # the keyed mail once, the other twice

    # The same key for a different mail, and the same key twice in one batch.
    other = f"order-{uuid.uuid4()}"
    response = post_batch(
        pipeline,
        [
            mail(5, idempotency_key=key),
            mail(6, idempotency_key=other),
            mail(6, idempotency_key=other),
        ],
    )
    assert response.status_code == 207, response.text
    reused, fresh, twice = response.json()["items"]
    assert reused["status_code"] == 422 and reused["error"]["code"] == "idempotency_key_reused"
    assert fresh["status_code"] == 202
    # The second is refused while the first holds the key (409), or replays it once queued.
    assert twice["status_code"] in {409, 202}
    if twice["status_code"] == 202:
        assert twice["mail_id"] == fresh["mail_id"] and twice["idempotent_replayed"] is True


def test_a_request_that_is_not_a_valid_batch_is_refused_whole(pipeline: Pipeline) -> None:
    http = pipeline.http
    cases = {
        "bare list": http.post(BATCH, json=[mail(0)]),
        "messages not a list": http.post(BATCH, json={"messages": {"0": mail(0)}}),
        "no messages": http.post(BATCH, json={"mails": [mail(0)]}),
        "empty": post_batch(pipeline, []),
        "one too many": post_batch(pipeline, [mail(n) for n in range(MAX_BATCH_MAILS + 1)]),
        "unknown field": http.post(BATCH, json={"messages": [mail(0)], "priority": "high"}),
        "header key": post_batch(pipeline, [mail(0)], headers={"Idempotency-Key": "k-1"}),
    }
    for name, response in cases.items():
        error = assert_json_error(response, 400, "invalid_request")
        assert "messages" in error["message"] or "Idempotency-Key" in error["message"], name
    assert "500" in cases["one too many"].json()["error"]["fields"]["messages"]
    assert "501" in cases["one too many"].json()["error"]["fields"]["messages"]
    assert "priority" in cases["unknown field"].json()["error"]["fields"]
    assert "Idempotency-Key" in cases["header key"].json()["error"]["fields"]

    not_json = http.post(
        BATCH, content=b'{"messages": [', headers={"Content-Type": "application/json"}
    )
    assert_json_error(not_json, 400, "invalid_json")
    wrong_type = http.post(BATCH, content=b"messages", headers={"Content-Type": "text/plain"})
    assert_json_error(wrong_type, 415, "unsupported_media_type")
    huge = json.dumps({"messages": [mail(0, text="a" * MAX_REQUEST_BYTES)]}).encode()
    too_large = http.post(BATCH, content=huge, headers={"Content-Type": "application/json"})
    assert_json_error(too_large, 413, "request_too_large")
    assert_nothing_accepted(pipeline)


def test_the_openapi_document_describes_the_batch_endpoint(pipeline: Pipeline) -> None:
    document = pipeline.http.get("/openapi.json").json()
    operation = document["paths"][BATCH]["post"]
    assert {"202", "207", "400", "413", "415"} <= set(operation["responses"])
    batch = document["components"]["schemas"]["BatchRequest"]
    assert batch["properties"]["messages"]["maxItems"] == MAX_BATCH_MAILS
