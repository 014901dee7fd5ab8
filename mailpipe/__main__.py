"""``python -m mailpipe`` is the ``mailpipe`` command."""

import sys

from mailpipe.cli import main

sys.exit(main())
