"""The gRPC channel every mailpipe Pub/Sub client uses against the emulator.

With ``PUBSUB_EMULATOR_HOST`` set, google-cloud-pubsub builds ``grpc.insecure_channel(host)``,
which keeps gRPC's 4 MiB receive limit: messages over about 4 MiB then fail on unary pull and
vanish silently on streaming pull (docs/local-vs-gcp.md, row 9). Mail with
attachments can be up to 10 MB, so mailpipe passes this channel instead.
"""

from __future__ import annotations

import grpc

UNLIMITED_MESSAGE_SIZE = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
]


def emulator_channel(host: str) -> grpc.Channel:
    """An insecure channel to the emulator at ``host`` without message size limits."""
    return grpc.insecure_channel(host, options=UNLIMITED_MESSAGE_SIZE)
