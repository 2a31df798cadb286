"""Tests for the command line's shape: version, descriptions, and the flags each command reads."""

from __future__ import annotations

import pytest
from rich.table import Table

from worker import __version__
from worker.cli.app import build_parser
from worker.cli.common import console


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`memory-worker --version` prints the version and exits 0."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"memory-worker {__version__}"


@pytest.mark.parametrize(
    ("argv", "absent"),
    [
        (["publish"], "--concurrency"),
        (["publish"], "--grace-s"),
        (["dlq", "stats"], "--session-buddy-url"),
        (["dlq", "purge"], "--timeout-s"),
        (["demo"], "--queue"),
        (["publish"], "--dead-letter-queue"),
        (["dlq", "stats"], "--queue"),
        (["dlq", "list"], "--queue"),
        (["dlq", "show"], "--queue"),
        (["dlq", "purge"], "--queue"),
    ],
)
def test_help_lists_only_the_flags_a_command_reads(
    capsys: pytest.CaptureFixture[str], argv: list[str], absent: str
) -> None:
    """A subcommand's --help has a description and none of the settings flags it ignores."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    text = capsys.readouterr().out
    assert absent not in text
    assert "--config" in text
    usage_end = text.index("\n\n")
    assert text[usage_end:].strip().split("\n")[0][:1].isupper()  # a description sentence


def test_piped_output_keeps_each_table_row_on_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off a terminal a table is as wide as its rows, not folded to 80 columns."""
    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    table.add_column("id")
    table.add_column("detail")
    detail = "Unterminated string starting at: line 1 column 13 (char 12) " * 2
    table.add_row("904a1198fdbd4f76aa2b6e4", detail.strip())
    console().print(table)
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 5  # top, header, rule, the one row, bottom
    assert detail.strip() in rows[3]
