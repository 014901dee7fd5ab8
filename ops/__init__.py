"""Operator tooling: the ``mailpipe`` command line (ops/cli/), the dead-letter replayer
(ops/replay.py) and the local trace viewer (ops/trace_view.py).

It may import every other package (the core, the canary, and the emulator for local runs); none
of them imports it (tests/unit/test_layers.py). ``python -m ops`` is the ``mailpipe`` command.
"""
