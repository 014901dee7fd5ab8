"""``mailpipe canary``: the canary's command (canary/command.py), as a sub-command of the CLI."""

from __future__ import annotations

import argparse

from canary import command


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "canary",
        help="send a probe mail and time its arrival in a mailbox over IMAP",
        description=command.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_arguments(parser)
