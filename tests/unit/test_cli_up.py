"""``mailpipe up``'s mailbox simulator options, parsed as a user types them."""

from __future__ import annotations

import pytest

from emulator.smtp import SIMULATOR_DOMAIN
from ops.cli import EXIT_USAGE, build_parser
from ops.cli.up import chosen_simulator_domain


def chosen(*argv: str) -> str | None:
    return chosen_simulator_domain(build_parser().parse_args(["up", *argv]))


def test_the_simulator_is_on_by_default_and_can_be_turned_off() -> None:
    assert chosen() == SIMULATOR_DOMAIN == "simulator.mailpipe.example"
    assert chosen("--no-simulator") is None


def test_another_simulator_domain_is_normalised() -> None:
    assert chosen("--simulator-domain", "Sim.Example.") == "sim.example"


def test_a_domain_the_publisher_refuses_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", "--simulator-domain", "simulator.test"])
    assert exited.value.code == EXIT_USAGE
    assert "special-use" in capsys.readouterr().err
