"""mailpipe: the reference asynchronous mail pipeline on Google Cloud (HTTP → Pub/Sub → SMTP)."""

__version__ = "0.1.0"
