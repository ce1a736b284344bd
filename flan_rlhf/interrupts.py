"""The command that is running: its command line, and how SIGTERM and SIGINT end it (one line and
the shell's exit code, never "success").

:func:`record_command` / :func:`command_line` keep the ``flan-rlhf`` arguments of this process for
model cards and for the "continue with: ..." of a stopped run (:func:`resume_command`).

What a cluster scheduler sends before it preempts a job is SIGTERM; Ctrl-C is SIGINT. Python's
defaults (death with no output for SIGTERM, a ``KeyboardInterrupt`` traceback for SIGINT) and
Lightning's own handling (``SIGTERMException`` is a ``SystemExit`` with code 0, so an interrupted
``fit`` reported success) are replaced by one rule:

* every command runs under :func:`signals_raise`: the signal raises :class:`RunInterrupted`
  where the program is, every atomic write in progress removes its temporary file on the way
  out (:func:`flan_rlhf.io.atomic_file`), and ``flan-rlhf`` prints the interruption's line and
  exits ``128 + signal`` (143 for SIGTERM, 130 for SIGINT; what a shell reports for a process the
  signal killed, so ``fit && next-step`` stops);
* inside ``fit``'s training loop the stop waits for the end of the iteration under way, which is
  checkpointed first (:class:`flan_rlhf.graceful_stop.StopAtIterationEnd`).

:class:`RunInterrupted` derives from ``BaseException``, like ``KeyboardInterrupt``, so that no
``except Exception`` in a library swallows it. This module imports nothing heavy: ``flan-rlhf``
installs the handlers before it knows which command runs.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code_of(signum: int) -> int:
    """The exit code of a command stopped by signal ``signum``: ``128 + signum`` (SIGTERM 143, SIGINT 130)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for ``signal.SIGTERM`` (``"signal N"`` for a number Python has no name for)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunInterrupted(BaseException):
    """A command stopped by a signal; ``str()`` is the one line to print, :attr:`exit_code` the exit code.

    Attributes:
        signum: the signal (``signal.SIGTERM``, ``signal.SIGINT``).
    """

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.signum)


# What the command is doing and how to finish it, for the line of a signal that stops it at once.
_activity: dict[str, str] = {}


def set_activity(activity: str | None, advice: str = "") -> None:
    """From now on a signal's line says the command stopped while ``activity`` and ends with ``advice``
    (``None``: back to the plain line). :func:`signals_raise` clears it when the command ends.

    Example: ``set_activity("writing the end-of-fit export", "write it with: flan-rlhf fit ... --ckpt_path last")``.
    """
    _activity.clear()
    if activity:
        _activity.update(activity=activity, advice=advice)


def immediate_stop_message(signum: int) -> str:
    """The line for a signal that stops a command at once (not inside ``fit``'s training loop)."""
    while_ = f" while {_activity['activity']}" if _activity else ""
    advice = _activity.get("advice") or "run the command again to redo it"
    return f"stopped by {signal_name(signum)}{while_}; no file was left half-written (writes are atomic) - {advice}"


def raise_interrupted(signum: int, frame: object = None) -> None:
    """Signal handler: raise :class:`RunInterrupted` where the program is."""
    raise RunInterrupted(signum, immediate_stop_message(signum))


@contextmanager
def signals_raise(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` raise :class:`RunInterrupted` (:func:`raise_interrupted`); the
    previous handlers come back after it. Outside the main thread (where Python cannot set
    handlers) the block runs with the handlers it has."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in signals}
    try:
        yield
    finally:
        set_activity(None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_running: list[str] | None = None  # the flan-rlhf arguments of this process's command (record_command)


def record_command(arguments: list[str]) -> None:
    """Remember the arguments ``flan-rlhf`` was given (:func:`flan_rlhf.cli.main` calls it), for :func:`command_line`."""
    global _running
    _running = list(arguments)


def command_line() -> str:
    """The command that is running, quoted to paste back: ``flan-rlhf fit --config c.yaml``
    (from :func:`record_command`; from ``sys.argv`` for a script that did not go through ``flan-rlhf``)."""
    if _running is not None:
        return shlex.join(["flan-rlhf", *_running])
    return shlex.join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])


def resume_command(command: str) -> str:
    """``command`` (a quoted command line) with its ``--ckpt_path`` replaced by ``--ckpt_path last``.

    Example: ``flan-rlhf fit --config c.yaml --ckpt_path a.ckpt`` -> ``flan-rlhf fit --config c.yaml --ckpt_path last``.
    """
    words, kept, skip = shlex.split(command), [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--ckpt_path":
            skip = True
        elif not word.startswith("--ckpt_path="):
            kept.append(word)
    return shlex.join([*kept, "--ckpt_path", "last"])
