"""Turning an exception into the one line a user sees."""
from __future__ import annotations


def first_line(err: BaseException) -> str:
    """The first line of an error's message, stripped (its type name if the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
