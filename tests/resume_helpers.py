"""Callbacks that end a training run at a chosen point, for ``tests/test_resume.py``.

Where "right after the checkpoint of iteration k" is: ``ModelCheckpoint`` saves in
``on_train_batch_end``, and Lightning moves every ``ModelCheckpoint`` to the end of
``trainer.callbacks`` whatever order they were given in (``_CallbackConnector._reorder_callbacks``),
so any other callback's ``on_train_batch_end`` at ``global_step == k`` runs *before* step k's
file exists. The first hook after the save is ``on_train_batch_start`` of the next batch, with
``global_step`` still ``k`` (a validation due at step k has run by then).
"""
from __future__ import annotations

import os
import signal

import lightning as L


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAt`: the run "dies" here."""


class CrashAt(L.Callback):
    """Raise :class:`SimulatedCrash` in ``hook`` once ``trainer.global_step == step``.

    Args:
        step: ``trainer.global_step`` (PPO iterations done) at which to crash.
        hook: ``"on_train_batch_start"``: iteration ``step + 1`` is about to start and step
            ``step``'s checkpoint is on disk; ``"on_train_batch_end"``: iteration ``step`` has
            trained (weights, optimiser, KL controller moved) but its checkpoint is not written.
    """

    HOOKS = ("on_train_batch_start", "on_train_batch_end")

    def __init__(self, step: int, hook: str = "on_train_batch_start"):
        if hook not in self.HOOKS:
            raise ValueError(f"hook must be one of {self.HOOKS}, got {hook!r}")
        self.step, self.hook = step, hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "on_train_batch_start" and trainer.global_step == self.step:
            self.die(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "on_train_batch_end" and trainer.global_step == self.step:
            self.die(trainer)

    def die(self, trainer) -> None:
        raise SimulatedCrash(f"crashed in {self.hook} at global_step {trainer.global_step}")


class KillAfterStep(CrashAt):
    """SIGKILL this process right after iteration ``step``'s checkpoint is saved.

    For a ``flan-rlhf fit`` subprocess: list it in the YAML's ``trainer.callbacks``
    (``class_path: tests.resume_helpers.KillAfterStep``, ``init_args: {step: k}``) with the repo
    root on ``PYTHONPATH``. If that checkpoint is not on disk it raises instead (the run then
    fails naming it), so a kill can never land before the save.
    """

    def __init__(self, step: int):
        super().__init__(step, hook="on_train_batch_start")

    def die(self, trainer) -> None:
        folder = trainer.checkpoint_callback.dirpath
        expected = os.path.join(folder, f"epoch={trainer.current_epoch}-step={self.step}.ckpt")
        if not os.path.isfile(expected):
            raise RuntimeError(f"KillAfterStep: {expected} is not on disk at step {self.step} "
                               f"(the folder holds {sorted(os.listdir(folder))})")
        os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(L.Callback):
    """Send this process ``signum`` when iteration ``step + 1`` starts (``on_train_batch_start`` at
    ``global_step == step``): the signal lands in the middle of that iteration, as a scheduler's would.

    With ``hook="setup"`` it is sent while the run is still setting up (before any iteration), with
    ``"on_train_end"`` after the last iteration; ``rank``: only the process of that global rank sends it.
    """

    def __init__(self, step: int = 0, signum: int = int(signal.SIGTERM), hook: str = "on_train_batch_start",
                 times: int = 1, rank: int | None = None):
        self.step, self.signum, self.hook, self.times, self.rank = step, signum, hook, times, rank
        self.trainer, self.sent = None, False

    def _send(self) -> None:
        if self.sent or (self.rank is not None and self.trainer is not None and self.trainer.global_rank != self.rank):
            return
        self.sent = True  # once, even when several batches start at the same global_step (accumulation)
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def setup(self, trainer, pl_module, stage):
        self.trainer = trainer
        if self.hook == "setup":
            self._send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "on_train_batch_start" and trainer.global_step == self.step:
            self._send()

    def on_train_end(self, trainer, pl_module):
        if self.hook == "on_train_end":
            self._send()


class CrashBeforeExport(L.Callback):
    """Raise :class:`SimulatedCrash` when training has ended, before the end-of-fit export (a kill
    between the last checkpoint and the export): callbacks' ``on_train_end`` runs before the module's."""

    def on_train_end(self, trainer, pl_module):
        raise SimulatedCrash(f"crashed after the last iteration ({trainer.global_step}), before the export")
