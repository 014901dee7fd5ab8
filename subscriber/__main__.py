"""``python -m subscriber push|pull`` (see :mod:`subscriber.main`)."""

import sys

from mailpipe.config import ConfigError
from subscriber.main import main

USAGE = "usage: python -m subscriber push|pull"

if len(sys.argv) != 2 or sys.argv[1] not in ("push", "pull"):
    print(USAGE, file=sys.stderr)
    sys.exit(2)
try:
    main(sys.argv[1])
except (ConfigError, ValueError) as exc:
    print(f"mailpipe subscriber: {exc}", file=sys.stderr)
    sys.exit(2)
