"""``python -m canary``: one canary run (or ``--every``), configured from the environment."""

import sys

from canary.command import main

sys.exit(main())
