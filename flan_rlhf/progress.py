"""Progress output: a live bar in a terminal, one line every N units elsewhere (CI, logs, pipes).

Every command reports progress through here, so the rule for "is this a terminal" is one rule:
:func:`interactive_terminal`.
"""
from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

# Environment variables that CI services set (GitHub Actions, GitLab, Buildkite, CircleCI, Travis, ...
# all set ``CI``; Jenkins sets ``BUILD_NUMBER`` and ``JENKINS_URL``).
_CI_VARIABLES = ("CI", "JENKINS_URL", "TF_BUILD")


def interactive_terminal(stream: IO[str] | None = None) -> bool:
    """Whether progress may redraw a line: ``stream`` (default stderr) is a terminal and no CI variable is set."""
    stream = sys.stderr if stream is None else stream
    if any(os.environ.get(name, "").strip().lower() not in ("", "0", "false") for name in _CI_VARIABLES):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def line_interval(total: int | None, lines: int = 10) -> int:
    """Units between two progress lines so that a run of ``total`` units prints about ``lines`` of them.

    Examples: ``line_interval(70) == 7``, ``line_interval(5) == 1``, ``line_interval(None) == 100``.
    """
    if not total or total <= 0:
        return 100
    return max(1, -(-total // lines))


def seconds(elapsed: float) -> str:
    """A duration for a progress line: ``"0.4 s"``, ``"9.9 s"``, ``"18 s"`` (tenths under ten seconds)."""
    return f"{elapsed:.1f} s" if elapsed < 9.95 else f"{elapsed:.0f} s"


class RowProgress:
    """Progress of a loop over ``total`` items (rows, batches): a tqdm bar in a terminal, else a line
    ``[label] 120/400 rows (30%) 12 s`` every :func:`line_interval` items and at the end.

    Use as a context manager and call :meth:`update` with the number of items just done.
    """

    def __init__(self, total: int, label: str, unit: str = "rows", stream: IO[str] | None = None,
                 interactive: bool | None = None, every: int | None = None) -> None:
        self.total, self.label, self.unit = int(total), label, unit
        self.stream = sys.stderr if stream is None else stream
        self.interactive = interactive_terminal(self.stream) if interactive is None else interactive
        self.every = every or line_interval(self.total)
        self.done = 0
        self._next_line = self.every
        self._bar: Any = None
        self._started = time.perf_counter()

    def __enter__(self) -> "RowProgress":
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit.rstrip("s") or self.unit,
                             file=self.stream, dynamic_ncols=True)
        return self

    def update(self, count: int) -> None:
        self.done += int(count)
        if self._bar is not None:
            self._bar.update(count)
            return
        if self.done >= self._next_line and self.done < self.total:
            self._write()
            while self._next_line <= self.done:
                self._next_line += self.every

    def __exit__(self, *exc_info: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif exc_info[0] is None:
            self._write()

    def _write(self) -> None:
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        elapsed = time.perf_counter() - self._started
        print(f"[{self.label}] {self.done}/{self.total} {self.unit}{share} {seconds(elapsed)}", file=self.stream, flush=True)
