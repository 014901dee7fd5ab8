"""The benchmark's profile summary: collapsed stacks → per-function inclusive and self shares."""

from __future__ import annotations

import pytest

from bench.profile import NO_PYTHON_FRAME, function_of, parse_collapsed, summarize_collapsed
from bench.report import markdown, profile_errors

# Ten samples. handle and send_message each appear at two lines (one function each); walk
# recurses, so it is three frames of one stack but one sample.
STACKS = """\
<module> (app.py:10);main (app.py:5);handle (app.py:20);send_message (publisher/app.py:168) 4
<module> (app.py:10);main (app.py:5);handle (app.py:21);send_message (publisher/app.py:170) 2

<module> (app.py:10);main (app.py:5);handle (app.py:20);send_message (publisher/app.py:168);\
dumps (json/__init__.py:231) 3
<module> (app.py:10);walk (tree.py:3);walk (tree.py:4);walk (tree.py:4) 1
"""


def shares(pairs: tuple[tuple[float, str], ...]) -> dict[str, float]:
    return {function: round(share, 6) for share, function in pairs}


def test_inclusive_share_counts_a_function_once_per_stack() -> None:
    summary = summarize_collapsed(STACKS)

    assert summary.samples == 10
    assert shares(summary.inclusive) == {
        "<module> (app.py)": 1.0,
        "main (app.py)": 0.9,
        "handle (app.py)": 0.9,
        "send_message (publisher/app.py)": 0.9,
        "dumps (json/__init__.py)": 0.3,
        "walk (tree.py)": 0.1,  # not 0.3: recursion is still one sample
    }
    # Largest first, ties by name.
    assert [f for _, f in summary.inclusive][:4] == [
        "<module> (app.py)",
        "handle (app.py)",
        "main (app.py)",
        "send_message (publisher/app.py)",
    ]


def test_the_top_inclusive_list_leaves_out_functions_that_only_pass_their_time_on() -> None:
    summary = summarize_collapsed(STACKS)

    # main and handle hand all their samples to one callee; <module> hands 90 % to main, and
    # send_message keeps 60 % itself. walk's callee is walk: recursion is no hand-over.
    assert summary.passthrough == {"main (app.py)", "handle (app.py)"}
    assert [[round(s, 6), f] for s, f in summary.top_inclusive()] == [
        [1.0, "<module> (app.py)"],
        [0.9, "send_message (publisher/app.py)"],
        [0.3, "dumps (json/__init__.py)"],
        [0.1, "walk (tree.py)"],
    ]
    assert summarize_collapsed(STACKS, passthrough=0.9).passthrough == {
        "<module> (app.py)",
        "main (app.py)",
        "handle (app.py)",
    }


def test_self_share_is_the_innermost_frame_and_adds_up_to_one() -> None:
    summary = summarize_collapsed(STACKS)

    assert shares(summary.exclusive) == {
        "send_message (publisher/app.py)": 0.6,
        "dumps (json/__init__.py)": 0.3,
        "walk (tree.py)": 0.1,
    }
    assert [f for _, f in summary.exclusive] == [
        "send_message (publisher/app.py)",
        "dumps (json/__init__.py)",
        "walk (tree.py)",
    ]
    assert sum(share for share, _ in summary.exclusive) == pytest.approx(1.0)


def test_equal_stacks_add_up() -> None:
    stacks = parse_collapsed("a (x.py:1);b (x.py:2) 2\na (x.py:1);b (x.py:2) 5\n")

    assert stacks == {("a (x.py:1)", "b (x.py:2)"): 7}


def test_an_empty_stack_is_a_sample_without_a_python_frame() -> None:
    # py-spy writes " COUNT" for GIL-holding samples of a thread with no Python frame.
    summary = summarize_collapsed("a (x.py:1);b (x.py:2) 3\n 1\n")

    assert summary.samples == 4
    assert shares(summary.exclusive) == {"b (x.py)": 0.75, NO_PYTHON_FRAME: 0.25}
    assert shares(summary.inclusive)[NO_PYTHON_FRAME] == 0.25


@pytest.mark.parametrize(
    ("frame", "function"),
    [
        ("send_message (publisher/app.py:168)", "send_message (publisher/app.py)"),
        ("<module> (<frozen runpy>:88)", "<module> (<frozen runpy>)"),
        ("_run_once (asyncio/base_events.py:1922)", "_run_once (asyncio/base_events.py)"),
        ("_wrap (a (b)/c.py:3)", "_wrap (a (b)/c.py)"),
        ("already (plain.py)", "already (plain.py)"),  # py-spy --nolineno
        ("<native>", "<native>"),
    ],
)
def test_function_of_drops_only_the_line_number(frame: str, function: str) -> None:
    assert function_of(frame) == function


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_input_is_no_samples(text: str) -> None:
    summary = summarize_collapsed(text)

    assert summary.samples == 0
    assert summary.inclusive == summary.exclusive == ()
    assert summary.to_json() == {"samples": 0, "top_inclusive": [], "top_self": []}


@pytest.mark.parametrize("line", ["main (app.py:5)", "main (app.py:5) many", "3"])
def test_a_line_without_a_count_is_an_error(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_collapsed(f"a (x.py:1) 1\n{line}\n")


def test_to_json_keeps_the_top_functions_with_rounded_shares() -> None:
    found = summarize_collapsed(STACKS + "other (z.py:1) 2\n").to_json(top_inclusive=2, top_self=1)

    assert found == {
        "samples": 12,
        "top_inclusive": [[0.8333, "<module> (app.py)"], [0.75, "send_message (publisher/app.py)"]],
        "top_self": [[0.5, "send_message (publisher/app.py)"]],
    }


def _result(profile: dict[str, object]) -> dict[str, object]:
    machine = {
        "nproc": 4,
        "cpu_model": "test",
        "ram_gib": 8.0,
        "python": "3.11",
        "platform": "linux",
        "loadavg": [0.0],
    }
    return {
        "command": "python -m bench --profile",
        "profile": "tiny",
        "started_at": "now",
        "duration_s": 1.0,
        "machine": machine,
        "loadavg_end": [0.0],
        "scenarios": [{"name": "pull-1k", "profile": profile}],
    }


def test_markdown_lists_each_profiled_service_and_report_names_the_missing_ones() -> None:
    good = {"file": "x-pull-1k-publisher.folded", **summarize_collapsed(STACKS).to_json()}
    profile = {"publisher": good, "subscriber": {"error": "Permission denied"}}

    text = markdown(_result(profile))

    assert "**Profile pull-1k / publisher (10 GIL samples): top by inclusive" in text
    assert "| 90.0% | `send_message (publisher/app.py)` |" in text
    assert "| 60.0% | `send_message (publisher/app.py)` |" in text  # the self table
    assert "pull-1k / subscriber" not in text
    assert profile_errors({"profile": profile}) == [("subscriber", "Permission denied")]
    assert profile_errors({"profile": {"error": "py-spy not found"}}) == [
        ("the services", "py-spy not found")
    ]
    assert profile_errors({}) == []
