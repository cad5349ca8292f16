"""Checks shared by the CLI tests."""

from __future__ import annotations

from typing import Any


def assert_one_line_error(result: Any, code: int, text: str, context: object = None) -> None:
    """A failed command: its exit code, one `error:` line on stderr naming the problem, no traceback."""
    assert result.exit_code == code, (context, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), (context, result.stderr)
    assert text in " ".join(result.stderr.split()), (context, result.stderr)
    assert "Traceback" not in result.output
