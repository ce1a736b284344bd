"""What the tool commands share: an argparse that raises one line, and the run-and-report body."""
from __future__ import annotations

import argparse
import sys

from flan_rlhf.errors import first_line
from flan_rlhf.policy import ModelLoadError


class UsageError(ValueError):
    """Bad command-line input; the message names the fix."""


class CommandParser(argparse.ArgumentParser):
    """argparse that raises one clear line instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{message} - see `flan-rlhf {self.prog.split()[-1]} --help`")


def quiet_progress_bars() -> None:
    """Batch tools: no per-file progress bars on stderr, so an error is the only line there."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_tool(argv: list[str] | None, parser_factory, action) -> int:
    """Shared body of the tool commands: parse ``argv``, run ``action(args)``, print its summary.

    Returns 0 on success, 2 on bad input after one ``error: ...`` line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_progress_bars()
    try:
        args = parser_factory().parse_args(argv)
        print(action(args), flush=True)
    except (UsageError, ModelLoadError, ValueError, OSError) as err:
        print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0
