"""Progress of the Lightning commands (fit, validate, test, predict): a bar in a terminal, lines elsewhere.

The PPO train stream is infinite (an ``IterableDataset``; one batch = one PPO iteration = one
``global_step``, bounded by ``trainer.max_steps``), so Lightning's bars cannot know the total:
:class:`StepProgressBar` counts optimiser steps out of ``trainer.estimated_stepping_batches``
instead, which is ``max_steps`` for PPO and epochs x batches for SFT and the reward model.
:func:`choose_progress` picks the bar or :class:`ProgressLines` with :func:`flan_rlhf.progress.interactive_terminal`;
:class:`flan_rlhf.lightning_cli.FlanRLHFCLI` passes its choice to the Trainer.

Neither reads a tensor: the lines use only step counters and the wall clock.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Any, NamedTuple, Sequence

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from flan_rlhf.progress import RowProgress, line_interval, seconds


def total_steps(trainer: L.Trainer) -> int | None:
    """Optimiser steps ``fit`` will take (``max_steps`` for the infinite PPO stream), or None if unbounded."""
    total = trainer.estimated_stepping_batches
    return int(total) if total not in (float("inf"), -1) and total > 0 else None


def evaluation_batches(trainer: L.Trainer, stage: str) -> int:
    """Batches the ``validate``/``test``/``predict`` loop of ``trainer`` runs over all its dataloaders (finite ones)."""
    counts = {"validate": trainer.num_val_batches, "test": trainer.num_test_batches,
              "predict": trainer.num_predict_batches}.get(stage, [])
    return int(sum(count for count in counts if count != float("inf")))


def step_line(step: int, total: int | None, elapsed: float, steps_timed: int) -> str:
    """``"[fit] step 21/70 (30%) 18 s, ~42 s left"``; the estimate from the ``steps_timed`` steps of ``elapsed`` s.

    Example: ``step_line(21, 70, 18.0, 21) == "[fit] step 21/70 (30%) 18 s, ~42 s left"``.
    """
    if not total:
        return f"[fit] step {step} {seconds(elapsed)}"
    left = f", ~{seconds(elapsed / steps_timed * (total - step))} left" if steps_timed > 0 and step < total else ""
    return f"[fit] step {step}/{total} ({step / total:.0%}) {seconds(elapsed)}{left}"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar whose training bar reads ``fit 21/70`` optimiser steps (a resumed run starts at its step).

    Validation, test and predict bars are Lightning's. Trainer wiring: ``Trainer(callbacks=[StepProgressBar()])``.
    """

    def init_train_tqdm(self) -> Tqdm:
        """Lightning's training bar (same arguments as ``TQDMProgressBar.init_train_tqdm``), drawn from
        the first frame with its total and the step a resumed run starts at."""
        return Tqdm(desc="fit", unit="step", total=total_steps(self.trainer), initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class ProgressLines(L.Callback):
    """One line on ``stream`` (stderr) every ``every`` training steps, and about ten per evaluation loop.

    Lines: ``[fit] step 21/70 (30%) 18 s, ~42 s left`` and, through :class:`flan_rlhf.progress.RowProgress`,
    ``[validate] n/N batches (p%) t s`` (validation inside ``fit`` included; the sanity check
    is not reported). ``every``: :func:`flan_rlhf.progress.line_interval` of the total steps.
    Trainer wiring: ``Trainer(callbacks=[ProgressLines()], enable_progress_bar=False)``.
    """

    def __init__(self, every: int | None = None, stream: IO[str] | None = None) -> None:
        self.every = every
        self.stream = stream
        self._train_started = 0.0
        self._first_step = 0
        self._interval = 1
        self._loop: RowProgress | None = None

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started, self._first_step = time.perf_counter(), trainer.global_step
        self._interval = self.every or line_interval(total_steps(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, total_steps(trainer)
        if trainer.is_global_zero and (step % self._interval == 0 or step == total):
            self._write(step_line(step, total, time.perf_counter() - self._train_started, step - self._first_step))

    def _loop_start(self, stage: str, trainer: L.Trainer) -> None:
        self._loop = None
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._loop = RowProgress(evaluation_batches(trainer, stage), stage, unit="batches",
                                     stream=self.stream or sys.stderr, interactive=False)
            self._loop.__enter__()

    def _loop_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if self._loop is not None:
            self._loop.update(1)

    def _loop_end(self, trainer: L.Trainer, *_: Any) -> None:
        if self._loop is not None:
            self._loop.__exit__(None, None, None)
            self._loop = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_start("validate", trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_start("test", trainer)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loop_start("predict", trainer)

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _loop_batch_end
    on_validation_end = on_test_end = on_predict_end = _loop_end


class ProgressChoice(NamedTuple):
    """What :func:`choose_progress` decided: callbacks to add and ``Trainer(enable_progress_bar=...)``."""

    callbacks: list[L.Callback]
    enable_progress_bar: bool | None


def choose_progress(enable_progress_bar: bool | None, interactive: bool, given: Sequence[L.Callback]) -> ProgressChoice:
    """Progress for one command from the config's ``trainer.enable_progress_bar`` and ``trainer.callbacks``.

    * the config gives a ProgressBar callback: theirs, unchanged;
    * ``enable_progress_bar: false``: quiet (no bar, no lines);
    * ``true``: :class:`StepProgressBar`, wherever the output goes;
    * unset (``null``): :class:`StepProgressBar` in a terminal; elsewhere (CI, a pipe, a log file)
      :class:`ProgressLines` with ``enable_progress_bar=False`` (Lightning refuses a ProgressBar
      callback beside ``enable_progress_bar=False``; ProgressLines is a plain callback).
    """
    if any(isinstance(callback, ProgressBar) for callback in given):
        return ProgressChoice([], enable_progress_bar)
    if enable_progress_bar is False:
        return ProgressChoice([], False)
    if enable_progress_bar or interactive:
        return ProgressChoice([StepProgressBar()], True)
    return ProgressChoice([ProgressLines()], False)
