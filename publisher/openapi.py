"""The OpenAPI 3.1 document served at ``/openapi.json``.

The request schema is generated from :class:`mailpipe.mail.MailRequest`, the same model that
validates requests, so the document cannot drift from what the service accepts.
"""

from __future__ import annotations

import functools
from typing import Any

from mailpipe import __version__
from mailpipe.mail import MailRequest
from mailpipe.record import MailStatus, SuppressionReason

_REF = "#/components/schemas/{model}"
# The text form of the ids QueuedMail.accept assigns (UUIDv7, lowercase hex).
MAIL_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# Mails one POST /v1/messages:batch takes: Postmark's batch limit (its /email/batch takes up to
# 500), which users moving from it expect; the request's size limit applies to the whole batch.
MAX_BATCH_MAILS = 500


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    request_schema = MailRequest.model_json_schema(by_alias=True, ref_template=_REF)
    definitions = request_schema.pop("$defs", {})
    schemas: dict[str, Any] = {
        **definitions,
        "MailRequest": request_schema,
        "Accepted": {
            "type": "object",
            "required": ["mail_id", "message_id", "trace_id", "status"],
            "properties": {
                "mail_id": {"type": "string", "description": "UUIDv7 assigned to the mail"},
                "message_id": {"type": ["string", "null"], "description": "Pub/Sub message id"},
                "trace_id": {"type": ["string", "null"], "description": "W3C trace id (32 hex)"},
                "status": {"type": "string", "enum": ["queued"]},
            },
        },
        "BatchRequest": {
            "type": "object",
            "required": ["messages"],
            "additionalProperties": False,
            "properties": {
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH_MAILS,
                    "items": {"$ref": "#/components/schemas/MailRequest"},
                    "description": "The mails, each as POST /v1/messages takes it (its own "
                    "idempotency_key included)",
                }
            },
        },
        "BatchResult": {
            "type": "object",
            "required": ["accepted", "refused", "trace_id", "items"],
            "properties": {
                "accepted": {"type": "integer", "description": "Mails queued"},
                "refused": {"type": "integer", "description": "Mails not accepted"},
                "trace_id": {
                    "type": ["string", "null"],
                    "description": "The request's trace; each mail has its own, linked to it",
                },
                "items": {
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/BatchItem"},
                    "description": "One per mail, in the request's order",
                },
            },
        },
        "BatchItem": {
            "type": "object",
            "required": ["index", "status_code"],
            "description": "An accepted mail: POST /v1/messages's 202 body (plus "
            "`idempotent_replayed` when its key's earlier mail is answered); a refused one: "
            "its error as POST /v1/messages would have answered it (send it again once fixed)",
            "properties": {
                "index": {"type": "integer", "description": "The mail's place in messages"},
                "status_code": {
                    "type": "integer",
                    "description": "What POST /v1/messages would have answered for this mail",
                },
                "mail_id": {"type": "string"},
                "message_id": {"type": ["string", "null"]},
                "trace_id": {"type": ["string", "null"], "description": "The mail's own trace"},
                "status": {"type": "string", "enum": ["queued"]},
                "idempotent_replayed": {"type": "boolean"},
                "error": {"$ref": "#/components/schemas/Error/properties/error"},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string", "description": "What to fix"},
                        "fields": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                            "description": "Each invalid field (dotted path) and what is wrong",
                        },
                    },
                }
            },
        },
        "MailRecord": {
            "type": "object",
            "required": ["mail_id", "status", "attempts"],
            "properties": {
                "mail_id": {"type": "string"},
                "status": {"type": "string", "enum": [s.value for s in MailStatus]},
                "accepted_at": {"type": ["string", "null"], "format": "date-time"},
                "updated_at": {"type": ["string", "null"], "format": "date-time"},
                "delivered_at": {"type": ["string", "null"], "format": "date-time"},
                "trace_id": {"type": ["string", "null"]},
                "message_id": {"type": ["string", "null"]},
                "recipient_domains": {"type": "array", "items": {"type": "string"}},
                "last_error": {"type": ["string", "null"]},
                "replays": {"type": "array", "items": {"type": "string"}},
                "attempts": {"type": "array", "items": {"type": "object"}},
                "deliver_by": {"type": ["string", "null"], "format": "date-time"},
                "next_attempt_at": {
                    "type": ["string", "null"],
                    "format": "date-time",
                    "description": "Dead-lettered: when `mailpipe dlq replay --due` retries it",
                },
                "stuck": {
                    "oneOf": [{"$ref": "#/components/schemas/StuckMail"}, {"type": "null"}],
                    "description": "Set when `mailpipe reconcile --fix` would settle this record",
                },
            },
        },
        "Suppression": {
            "type": "object",
            "required": ["key", "reason", "created_at", "domain"],
            "properties": {
                "key": {"type": "string", "description": "The address, or hmac-sha256:<hex>"},
                "reason": {"type": "string", "enum": [r.value for r in SuppressionReason]},
                "created_at": {"type": "string", "format": "date-time"},
                "domain": {"type": "string"},
                "address": {
                    "type": ["string", "null"],
                    "description": "Only where MAILPIPE_LOG_ADDRESSES=full",
                },
                "reply_code": {"type": ["integer", "null"]},
                "enhanced_status": {"type": ["string", "null"]},
                "reply": {"type": ["string", "null"]},
                "mail_id": {"type": ["string", "null"], "description": "The bounced mail"},
                "expires_at": {"type": ["string", "null"], "format": "date-time"},
            },
        },
        "StuckMail": {
            "type": "object",
            "required": ["mail_id", "kind", "status", "stuck_since"],
            "properties": {
                "mail_id": {"type": "string"},
                "kind": {"type": "string", "enum": ["expired_reservation", "stalled_delivery"]},
                "status": {"type": "string", "enum": [s.value for s in MailStatus]},
                "accepted_at": {"type": "string", "format": "date-time"},
                "stuck_since": {"type": "string", "format": "date-time"},
                "stuck_for_seconds": {"type": "number"},
                "attempts": {"type": "integer"},
                "fix": {"type": "string", "description": "What `reconcile --fix` does to it"},
            },
        },
    }
    json_only = {
        "415": _error("The body is not application/json"),
        "413": _error("The body or the encoded mail exceeds Pub/Sub's 10 MB message limit"),
        "408": _error("The request did not arrive within MAILPIPE_HTTP_READ_TIMEOUT"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailpipe publisher",
            "version": __version__,
            "description": "Accepts mails and queues them on Pub/Sub for SMTP delivery.",
        },
        "paths": {
            "/v1/messages": {
                "post": {
                    "operationId": "sendMessage",
                    "summary": "Queue a mail for delivery",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": 200,
                                "pattern": r"^[\x21-\x7e]+$",
                            },
                            "description": "Same as the body's idempotency_key: a bare "
                            'token, or a Structured Field string (`"key"`, RFC 8941) as the IETF '
                            "Idempotency-Key draft writes it. Keys are scoped to the caller; the "
                            "same key with a different request is refused with 422.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/MailRequest"}
                            }
                        },
                    },
                    "responses": {
                        "202": _json("Accepted", "Queued: Pub/Sub has the mail"),
                        "400": _error(
                            "Invalid request (JSON deeper than 32 levels, integers over 100 "
                            "digits, non-finite numbers, lone surrogates, invalid UTF-8 "
                            "included); `fields` names every bad field"
                        ),
                        "403": _error(
                            "The `from` domain is not in MAILPIPE_ALLOWED_SENDER_DOMAINS, or "
                            "`sandbox: false` from a caller in MAILPIPE_SANDBOX_CALLERS "
                            "(code sandbox_required)"
                        ),
                        "409": _error("The idempotency key's first request is still in flight"),
                        "422": _error(
                            "The idempotency key was already used for a different request "
                            "(code idempotency_key_reused); use a new key for a new mail"
                        ),
                        **json_only,
                        "503": _error("Pub/Sub or the delivery record is unavailable; retry"),
                    },
                },
                "get": {
                    "operationId": "listMessages",
                    "summary": "List delivery records, oldest first",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": [s.value for s in MailStatus]},
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "page_token",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A page of records",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "items": {
                                                "type": "array",
                                                "items": {
                                                    "$ref": "#/components/schemas/MailRecord"
                                                },
                                            },
                                            "next_page_token": {"type": ["string", "null"]},
                                        },
                                    }
                                }
                            },
                        },
                        "400": _error("Invalid query"),
                        "503": _error("The delivery record is unavailable"),
                    },
                },
            },
            "/v1/messages:batch": {
                "post": {
                    "operationId": "sendMessages",
                    "summary": f"Queue up to {MAX_BATCH_MAILS} mails in one request",
                    "description": "Each mail is validated, published and answered on its own, "
                    "as POST /v1/messages would: 202 when every mail was queued, 207 when one "
                    "or more were not (read `items`; send only the refused ones again). Each "
                    "mail may carry its own idempotency_key; the Idempotency-Key header is "
                    "refused here. A request that is not a valid batch is refused whole "
                    "(400/413/415) and nothing in it is queued.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/BatchRequest"}
                            }
                        },
                    },
                    "responses": {
                        "202": _json("BatchResult", "Every mail queued: Pub/Sub has them all"),
                        "207": _json(
                            "BatchResult",
                            "Some or all mails were not queued: each item says why",
                        ),
                        "400": _error(
                            'Not a batch: the body is not {"messages": [...]}, holds 0 or more '
                            f"than {MAX_BATCH_MAILS} mails, or has an Idempotency-Key header"
                        ),
                        **json_only,
                    },
                },
            },
            "/v1/messages/{mail_id}": {
                "get": {
                    "operationId": "getMessage",
                    "summary": "The delivery record of one mail",
                    "parameters": [
                        {
                            "name": "mail_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": MAIL_ID_PATTERN},
                        }
                    ],
                    "responses": {
                        "200": _json("MailRecord", "The record"),
                        "404": _error("No such mail, or not a mail id (`fields` says so)"),
                        "503": _error("The delivery record is unavailable"),
                    },
                }
            },
            "/v1/stats": {
                "get": {
                    "operationId": "stats",
                    "summary": "Delivery lag (the oldest mail not yet delivered) and stuck records",
                    "responses": {
                        "200": {
                            "description": "Lag",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "oldest_undelivered_mail_id": {
                                                "type": ["string", "null"]
                                            },
                                            "oldest_undelivered_age_seconds": {
                                                "type": ["number", "null"]
                                            },
                                            "stuck": {
                                                "type": "object",
                                                "properties": {
                                                    "expired_reservations": {"type": "integer"},
                                                    "stalled_deliveries": {"type": "integer"},
                                                    "unconfirmed": {"type": "integer"},
                                                    "grace_seconds": {"type": "number"},
                                                    "complete": {"type": "boolean"},
                                                    "mails": {
                                                        "type": "array",
                                                        "items": {
                                                            "$ref": "#/components/schemas/StuckMail"
                                                        },
                                                    },
                                                },
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        "503": _error("The delivery record is unavailable"),
                    },
                }
            },
            **_suppression_paths(),
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "responses": {"200": {"description": "The process is serving"}},
                }
            },
        },
        "components": {"schemas": schemas},
    }


def _suppression_paths() -> dict[str, Any]:
    """``/v1/suppressions[/{address}]`` (publisher/suppressions.py)."""
    off = _error("The suppression list is off (code suppressions_disabled) or unavailable")
    address = {
        "name": "address",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 3},
        "description": "A percent-encoded email address; for GET and DELETE also an entry's key",
    }
    query = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in (
            ("reason", {"type": "string", "enum": [r.value for r in SuppressionReason]}),
            ("domain", {"type": "string"}),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 1000}),
            ("page_token", {"type": "string"}),
        )
    ]
    page = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Suppression"}},
            "next_page_token": {"type": ["string", "null"]},
        },
    }
    put_body = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "reason": {"type": "string", "enum": ["manual", "complaint"], "default": "manual"},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
        },
    }
    bad = _error("Invalid address or body; `fields` names what to fix")
    return {
        "/v1/suppressions": {
            "get": {
                "operationId": "listSuppressions",
                "summary": "Suppressed recipients, oldest first (expired entries left out)",
                "parameters": query,
                "responses": {
                    "200": {
                        "description": "A page of entries",
                        "content": {"application/json": {"schema": page}},
                    },
                    "400": _error("Invalid query"),
                    "503": off,
                },
            }
        },
        "/v1/suppressions/{address}": {
            "parameters": [address],
            "get": {
                "operationId": "getSuppression",
                "responses": {
                    "200": _json("Suppression", "The entry"),
                    "400": bad,
                    "404": _error("Not suppressed"),
                    "503": off,
                },
            },
            "put": {
                "operationId": "putSuppression",
                "summary": "Suppress a recipient (manual or complaint), optionally until a time",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": put_body}},
                },
                "responses": {
                    "200": _json("Suppression", "Replaced"),
                    "201": _json("Suppression", "Added"),
                    "400": bad,
                    "503": off,
                },
            },
            "delete": {
                "operationId": "deleteSuppression",
                "summary": "Reactivate a recipient",
                "responses": {
                    "204": {"description": "Removed"},
                    "400": bad,
                    "404": _error("Not suppressed"),
                    "503": off,
                },
            },
        },
    }
