"""Progress output: the terminal rule and the line-per-N fallback."""
from __future__ import annotations

import io

import pytest

from flan_rlhf.progress import RowProgress, interactive_terminal, line_interval


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_interactive_only_on_a_terminal_outside_ci(monkeypatch):
    for name in ("CI", "JENKINS_URL", "TF_BUILD"):
        monkeypatch.delenv(name, raising=False)
    assert interactive_terminal(FakeTerminal())
    assert not interactive_terminal(io.StringIO())
    monkeypatch.setenv("CI", "true")
    assert not interactive_terminal(FakeTerminal())
    monkeypatch.setenv("CI", "false")
    assert interactive_terminal(FakeTerminal())


@pytest.mark.parametrize("total, expected", [(70, 7), (5, 1), (100, 10), (101, 11), (None, 100), (0, 100)])
def test_line_interval(total, expected):
    assert line_interval(total) == expected


def test_row_progress_prints_a_line_every_n_rows_and_at_the_end():
    stream = io.StringIO()
    with RowProgress(25, "score", stream=stream, interactive=False, every=10) as progress:
        for _ in range(5):
            progress.update(5)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ")[1] for line in lines] == ["10/25", "20/25", "25/25"]
    assert lines[0].startswith("[score] 10/25 rows (40%)")


def test_row_progress_in_a_terminal_draws_a_bar_and_no_lines():
    stream = FakeTerminal()
    with RowProgress(4, "generate", stream=stream, interactive=True) as progress:
        progress.update(4)
    text = stream.getvalue()
    assert "4/4" in text and "[generate]" not in text


def test_row_progress_writes_no_closing_line_after_an_error():
    stream = io.StringIO()
    with pytest.raises(RuntimeError):
        with RowProgress(10, "score", stream=stream, interactive=False, every=100):
            raise RuntimeError("boom")
    assert stream.getvalue() == ""
