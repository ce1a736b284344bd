"""Turning an exception into the one line a user sees."""
from __future__ import annotations


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
