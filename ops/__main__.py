"""``python -m ops`` is the ``mailpipe`` command."""

import sys

from ops.cli import main

sys.exit(main())
