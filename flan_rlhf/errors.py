"""Turning an exception into the one line a user sees."""
from __future__ import annotations

import errno
from typing import Callable


def first_line(err: BaseException) -> str:
    """The first line of an error's message, stripped (its type name if the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # set by launchers


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its job, or in none: the launchers' variables
    (:data:`RANK_VARIABLES`; Lightning's DDP children get ``LOCAL_RANK`` >= 1, torchrun ``RANK``,
    other nodes ``NODE_RANK``) say 0 or are unset, and so does Lightning's ``rank_zero_only.rank``
    once Lightning is loaded (the strategy sets it to the global rank)."""
    import os
    import sys

    if any(os.environ.get(name, "0") != "0" for name in RANK_VARIABLES):
        return False
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    return rank_zero is None or getattr(rank_zero.rank_zero_only, "rank", 0) == 0


def first_cause(err: BaseException | None, matches: Callable[[BaseException], bool]) -> BaseException | None:
    """``err`` or the first of its causes (``__cause__``, else ``__context__``) that ``matches``, else None.

    Libraries wrap errors (jsonargparse wraps what a class raises while it is built in a
    ValueError; torch wraps a failed write): the cause is what names the problem.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if matches(err):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # no space left; disk quota exceeded


class DiskFullError(OSError):
    """A write that ran out of space (``errno`` ENOSPC); ``str()`` is one line naming what was written and what survives."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def disk_full_cause(err: BaseException | None) -> OSError | None:
    """``err`` or the first of its causes that is an ``OSError`` for a full disk or quota, else None."""
    return first_cause(err, lambda cause: isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS)


def disk_full_line(err: OSError) -> str:
    """One line for a full disk: the file being written, that nothing on disk was changed, the fix."""
    if isinstance(err, DiskFullError):
        return str(err)
    where = f" while writing {err.filename}" if err.filename else ""
    return (f"no space left on device{where}; no file was left half-written and nothing already on disk changed "
            "(writes are atomic) - free space (or raise the quota) and run the command again")


def say(message: str) -> None:
    """One line for the user on stderr (errors, warnings, notes), flushed at once."""
    import sys

    print(message, file=sys.stderr, flush=True)


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested, multi-line report -> one line that keeps the key path and the reason.

    Example: ``Parser key "model": Problem with given class_path 'flan_rlhf.module.PPOModule':
    Group 'ppo' does not accept option 'learnin_rate'``.
    """
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
             "Expected a <class 'NoneType'>")
    kept = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(noise):
            kept.append(text)
    return " ".join(kept) if kept else message.strip()
