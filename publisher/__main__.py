"""``python -m publisher``: serve the publisher on ``$PORT`` (see :mod:`publisher.main`)."""

import sys

from mailpipe.config import ConfigError
from publisher.main import serve

try:
    serve()
except ConfigError as exc:
    print(f"mailpipe publisher: {exc}", file=sys.stderr)
    sys.exit(2)
