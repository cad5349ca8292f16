"""What users read: messages carry file names and hints verbatim, brackets included."""

from __future__ import annotations

from typer.testing import CliRunner

from cli_checks import assert_one_line_error
from edgepack.cli import app


def test_brackets_in_messages_are_not_taken_as_markup(tmp_path):
    # Rich would read "[x]" or "[boosting]" as a style tag and drop it from the message.
    result = CliRunner().invoke(app, ["build", str(tmp_path / "model[x].skops"), "--input-shape", "4", "--quiet"])
    assert_one_line_error(result, 3, "model[x].skops: no such model file")


def test_hints_keep_extras_in_brackets(tmp_path):
    (tmp_path / "notes[v2].txt").write_text("not a model\n")
    result = CliRunner().invoke(app, ["build", str(tmp_path / "notes[v2].txt"), "--input-shape", "4", "--quiet"])
    assert result.exit_code == 3
    assert "notes[v2].txt" in result.stderr
