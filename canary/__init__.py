"""The canary: a Cloud Run job that sends a probe mail through the publisher and reads it back from
a real mailbox over IMAP (docs/canary.md).

``python -m canary`` runs it (canary/Dockerfile); ``mailpipe canary`` is the same command.
The probe itself is canary/probe.py, the command line canary/command.py. It imports only the core
(mailpipe/) and the publisher API's client (client/), never a service.
"""
