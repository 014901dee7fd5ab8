"""``mailpipe canary``: the canary's command (canary/command.py), as a sub-command of the CLI."""

from __future__ import annotations

import argparse

from canary import command
from ops.cli import add_command


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        subparsers,
        "canary",
        "send a probe mail and time its arrival in a mailbox over IMAP",
        command.__doc__,
    )
    command.add_arguments(parser)
