"""A signal during ``fit``'s training loop stops the run after the iteration under way, checkpointed.

:class:`StopAtIterationEnd` (added to every ``flan-rlhf fit`` by the CLI; usable in a plain
``Trainer``) holds SIGTERM and SIGINT from ``on_train_start`` to ``on_train_end``:

1. the signal only notes itself (no Lightning ``SIGTERMException``, which exits 0 mid-validation);
2. at the end of the iteration (``on_train_batch_end`` of a batch that made an optimiser step -
   every batch of PPO, the last of an accumulation group otherwise - where ``ModelCheckpoint``
   saves, so a resume from the file is a resume from a regular checkpoint) the ranks agree to stop when any
   rank was signalled (``Strategy.reduce_boolean_decision(any)``: every rank stops at the same
   iteration; one boolean all-reduce per PPO iteration under DDP, nothing on one device);
3. every rank writes the checkpoint together (``Trainer.save_checkpoint``, atomic through the
   CLI's checkpoint IO) under the ``ModelCheckpoint``'s own name for that step, in the run's
   checkpoint folder, so ``--ckpt_path last`` finds it (none when checkpointing is off);
4. :class:`flan_rlhf.interrupts.RunInterrupted` carries the line (the signal, the iteration, the
   file, the command that continues) out of ``fit``: ``flan-rlhf`` prints it and exits 143
   (SIGTERM) or 130 (SIGINT). No end-of-fit export is written for a stopped run.

A second signal while the first waits stops at once (``RunInterrupted`` where the program is),
leaving the newest complete checkpoint as it was.
"""
from __future__ import annotations

import signal
import threading
from typing import Any

import lightning as L

from flan_rlhf.interrupts import (
    STOP_SIGNALS,
    RunInterrupted,
    command_line,
    immediate_stop_message,
    resume_command,
    set_activity,
    signal_name,
)


def stop_checkpoint_path(trainer: L.Trainer) -> str | None:
    """Where the stop's checkpoint goes: the ``ModelCheckpoint``'s folder and file name for this step
    (``epoch=0-step=7.ckpt`` by default); None when the run writes no checkpoints
    (``enable_checkpointing: false``)."""
    import torch

    callback = trainer.checkpoint_callback
    if callback is None or not getattr(callback, "dirpath", None):
        return None
    return callback.format_checkpoint_name({"epoch": torch.tensor(trainer.current_epoch),
                                            "step": torch.tensor(trainer.global_step)})


def stopped_message(signum: int, step: int, max_steps: int, path: str | None, command: str) -> str:
    """The one line of a run stopped at an iteration's end (``path``: its checkpoint, None without checkpoints).

    Example: ``stopped by SIGTERM after iteration 7 of 30, checkpointed in ck/epoch=0-step=7.ckpt -
    continue with: flan-rlhf fit --config c.yaml --ckpt_path last``.
    """
    of = f" of {max_steps}" if max_steps and max_steps > 0 else ""
    if path is None:
        return (f"stopped by {signal_name(signum)} after iteration {step}{of}; this run writes no checkpoints "
                "(enable_checkpointing: false), so running it again starts over")
    return (f"stopped by {signal_name(signum)} after iteration {step}{of}, checkpointed in {path} - continue with: "
            f"{resume_command(command)}")


class StopAtIterationEnd(L.Callback):
    """Turns SIGTERM/SIGINT during training into a checkpoint of the finished iteration and a stop.

    Attributes:
        received: the signal noted on this rank, or ``None``.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._checked_step = -1

    def _note(self, signum: int, frame: object = None) -> None:
        if self.received is not None:  # a second signal: the user will not wait for the iteration
            raise RunInterrupted(signum, f"stopped by a second {signal_name(signum)} in the middle of an iteration; "
                                         "the newest complete checkpoint is as it was - continue from it with "
                                         "--ckpt_path last")
        self.received = signum

    def _hold(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {signum: signal.signal(signum, self._note) for signum in STOP_SIGNALS}

    def _release(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = None
        self._checked_step = trainer.global_step
        self._hold()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._checked_step:
            return  # no optimiser step in this batch (gradient accumulation): not a point a resume can start from
        self._checked_step = trainer.global_step  # the same on every rank, so every rank reduces here or none
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = stop_checkpoint_path(trainer)
        if path is not None:
            trainer.save_checkpoint(path, weights_only=False)  # collective: every rank is here at the same iteration
        signum = self.received if self.received is not None else signal.SIGTERM  # another rank's signal
        self._release()
        raise RunInterrupted(signum, stopped_message(signum, trainer.global_step, trainer.max_steps, path,
                                                     command_line()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()
        set_activity("finishing the run after its last iteration",
                     f"continue with: {resume_command(command_line())} (it writes the end-of-fit files)")
        if self.received is not None:  # noted after the last iteration's check (its validation): stop before the export
            signum, self.received = self.received, None
            raise RunInterrupted(signum, immediate_stop_message(signum))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._release()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()
