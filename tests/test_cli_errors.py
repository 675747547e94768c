"""Every bad input ends in one `aesthetics:` line on stderr, the documented exit code, no traceback, and
nothing written under the output; each case drives the real command in a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_cases import CASES, Case, can_make_immutable, run_case, workspace


@pytest.fixture
def ws(tmp_path, sample_dataset):
    return workspace(tmp_path, Path(sample_dataset.shards_dir))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_input_ends_in_one_line_and_its_exit_code(case: Case, ws):
    if case.name == "output folder cannot be written" and not can_make_immutable(ws.root):
        pytest.skip("this filesystem cannot make a folder immutable (chattr +i), so no unwritable folder for root")
    outcome = run_case(case, ws)
    assert "Traceback" not in outcome.stderr + outcome.stdout, outcome.stderr
    assert len(outcome.stderr_lines) == 1, outcome.stderr
    assert outcome.stderr_lines[0].startswith("aesthetics: "), outcome.stderr
    assert outcome.code == case.expected, outcome.stderr
    assert outcome.written == [], f"wrote under the output: {outcome.written}"


def test_debug_shows_the_traceback_and_still_ends_in_the_line(ws):
    case = next(case for case in CASES if case.name == "head is not a torch file")
    outcome = run_case(case, ws, "--debug")
    assert "Traceback" in outcome.stderr
    assert outcome.stderr_lines[-1].startswith("aesthetics: ") and outcome.code == case.expected
