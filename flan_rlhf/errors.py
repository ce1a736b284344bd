"""Turning an exception into the one line a user sees."""
from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an error's message, stripped (its type name if the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def say(message: str) -> None:
    """One line for the user on stderr (errors, warnings, notes), flushed at once."""
    import sys

    print(message, file=sys.stderr, flush=True)
