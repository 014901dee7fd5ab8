"""``python -m bench [--quick] [--only NAME ...] [--profile]``: run the benchmark, print tables,
write JSON."""

from __future__ import annotations

import os

# Before bench's modules import grpc: the benchmark starts the services with subprocess after
# using Pub/Sub clients, and gRPC's fork handlers can make such a child abort before exec.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.plan import PROFILES, tiny
from bench.report import markdown, print_tables, profile_errors
from bench.run import RESULTS_DIR, new_stamp, run_bench, write_result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ~2 minute profile")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a few mails through one scenario, or through each --only one (checks the harness)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="SCENARIO", help="run only these scenarios (see --list)"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the raw baselines")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each scenario's runs, one more under py-spy: where the services' CPU goes "
        "(.folded stacks next to the JSON; see bench/profile.py)",
    )
    args = parser.parse_args(argv)

    if args.tiny and args.only:  # a few mails through each scenario named
        profile = tiny(args.only[0], also=tuple(args.only[1:]))
    else:
        profile = tiny() if args.tiny else PROFILES["quick" if args.quick else "full"]
    console = Console()
    if args.list:
        for scenario in profile.scenarios:
            console.print(f"{scenario.name:24} {scenario.group:9} {scenario.label}")
        return 0
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = new_stamp()  # the JSON and the profiles' files share it
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def update(label: str, done: int, total: int) -> None:
            progress.update(task, description=label, completed=done, total=total or None)

        result = run_bench(
            profile,
            command=command.strip(),
            only=set(args.only) if args.only else None,
            baselines=not args.no_baselines,
            update=update,
            profile_dir=args.out if args.profile else None,
            stamp=stamp,
        )
    path = write_result(result, args.out, stamp)
    print_tables(result, console)
    for scenario in result["scenarios"]:
        if "error" in scenario:
            console.print(f"[red]{scenario['name']} failed:[/] {scenario['error']}")
        for service, why in profile_errors(scenario):
            console.print(f"[yellow]{scenario['name']}: no profile of {service}:[/] {why}")
    if args.markdown:
        print(markdown(result))  # plain: a console would wrap the table rows
    console.print(f"raw numbers: {path}")
    return 1 if any("error" in s for s in result["scenarios"]) else 0


if __name__ == "__main__":
    sys.exit(main())
