"""The closing lines of ``fit``/``validate``/``test``/``predict``: what ran, and where each output is.

Only what exists on disk is named, so a line never points at a folder the run did not write.
"""
from __future__ import annotations

import os

import lightning as L

from flan_rlhf.prediction_writer import JsonlPredictionWriter
from flan_rlhf.progress import seconds
from flan_rlhf.progress_callbacks import evaluation_batches


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 'es' if word.endswith('ch') else 's'}"


def what_ran(trainer: L.Trainer, stage: str, elapsed: float) -> str:
    """``"fit: 4/4 steps in 6.2 s"`` (steps done / ``max_steps``), ``"validate: 2 batches from CKPT in 1.0 s"``."""
    took = f"in {seconds(elapsed)}"
    if stage == "fit":
        step, total = trainer.global_step, trainer.max_steps
        return f"fit: {step}/{total} steps {took}" if total > 0 else f"fit: {_plural(step, 'step')} {took}"
    source = f" from {trainer.ckpt_path}" if trainer.ckpt_path else ""
    return f"{stage}: {_plural(evaluation_batches(trainer, stage), 'batch')}{source} {took}"


def output_lines(trainer: L.Trainer, model: L.LightningModule, stage: str) -> list[str]:
    """``"  checkpoints: DIR (last: FILE)"``, ``"  export: DIR"``, ``"  logs: DIR"``, ``"  rows: N in FILE"``: those that exist."""
    lines = []
    callback = trainer.checkpoint_callback
    folder = getattr(callback, "dirpath", None)
    if stage == "fit" and folder and os.path.isdir(folder):
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        lines.append(f"  checkpoints: {folder}" + (f" (newest: {last})" if last and os.path.exists(last) else ""))
    export = model.export_target()[0] if stage == "fit" and hasattr(model, "export_target") else None
    if export and os.path.isdir(export):
        lines.append(f"  export: {export}")
    # The logger's own folder, not ``trainer.log_dir``: that broadcasts, and only process 0 gets here.
    logs = getattr(trainer.logger, "log_dir", None) or getattr(trainer.logger, "save_dir", None)
    if logs and os.path.isdir(logs):
        lines.append(f"  logs: {logs}")
    for writer in trainer.callbacks:
        if stage == "predict" and isinstance(writer, JsonlPredictionWriter) and writer.path and os.path.isfile(writer.path):
            suffix = " (this process; one file per process)" if trainer.world_size > 1 else ""
            lines.append(f"  rows: {writer.rows_written} in {writer.path}{suffix}")
    return lines


def run_summary(trainer: L.Trainer, model: L.LightningModule, stage: str, elapsed: float) -> list[str]:
    """The closing lines of a Lightning command: :func:`what_ran`, then :func:`output_lines`."""
    return [what_ran(trainer, stage, elapsed), *output_lines(trainer, model, stage)]
