"""mailpipe's benchmark: how fast the pipeline moves mail on this machine, and what tracing costs.

Run it with ``./dev bench`` (or ``python -m bench``; ``--quick`` for a two-minute run). It prints
tables and writes the raw numbers to ``bench/results/<timestamp>-<profile>.json``. See
docs/benchmarks.md for what is measured, how, and the results of a real run.

Modules: :mod:`bench.plan` (scenarios), :mod:`bench.run` (the harness), :mod:`bench.pipeline`
(one pipeline scenario), :mod:`bench.baselines` (raw SMTP and Pub/Sub rates), :mod:`bench.load`
(HTTP load generator), :mod:`bench.smtp_sink` (the SMTP server process), :mod:`bench.procstats`
(CPU and peak RSS from /proc), :mod:`bench.profile` (``--profile``: py-spy on the services),
:mod:`bench.report` (targets, tables, Markdown).
"""
