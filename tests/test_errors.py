"""One table of exit codes, kept by the README; every failure becomes one line and its code."""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.errors import ExitCode, InputError, WeightsError, explain

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_exit_codes() -> dict[int, str]:
    text = README.read_text()
    table = text[text.index("**Exit codes**"):]
    table = table[: table.index("\n\n", table.index("| code |"))]
    return {int(code): meaning for code, meaning in re.findall(r"^\| (\d+) \| (.+) \|$", table, re.M)}


def test_the_readme_lists_exactly_the_exit_codes_the_commands_use():
    assert sorted(_readme_exit_codes()) == sorted(code.value for code in ExitCode)


def test_a_user_error_keeps_its_code_and_its_headline_on_one_line():
    error = WeightsError("weights 'x.pth' not found\n  - tried /a\nput it in a --weights-dir")
    assert explain(error) == (ExitCode.WEIGHTS, "weights 'x.pth' not found - tried /a put it in a --weights-dir")


def test_the_error_inside_a_wrapped_one_is_found():
    class RayTaskError(Exception):  # Ray keeps the task's own exception as .cause
        def __init__(self, cause):
            super().__init__("long trace")
            self.cause = cause

    try:
        try:
            raise InputError("input 'x' does not exist")
        except InputError as inner:
            raise RuntimeError("while planning") from RayTaskError(inner)
    except RuntimeError as outer:
        assert explain(outer) == (ExitCode.INPUT, "input 'x' does not exist")


def test_an_unexpected_error_is_a_bug_on_one_line():
    code, line = explain(KeyError("a\nb"))
    assert code == ExitCode.INTERNAL and "\n" not in line and "--debug" in line


def test_each_failure_a_user_can_fix_has_its_documented_code():
    from pipeline.config import ConfigError
    from pipeline.errors import OutputError
    from pipeline.io.lease import LeaseHeld
    from pipeline.models.heads import HeadFormatError
    from pipeline.models.weights import WeightsChecksumMismatch, WeightsNotFound
    from pipeline.submit import ClusterUnreachable

    codes = {ConfigError: ExitCode.USAGE, LeaseHeld: ExitCode.BUSY, ClusterUnreachable: ExitCode.UNREACHABLE,
             InputError: ExitCode.INPUT, WeightsNotFound: ExitCode.WEIGHTS, WeightsChecksumMismatch: ExitCode.WEIGHTS,
             HeadFormatError: ExitCode.WEIGHTS, OutputError: ExitCode.OUTPUT}
    assert {kind: explain(kind("why"))[0] for kind in codes} == codes
