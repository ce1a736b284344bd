"""Writes ``predict`` outputs as JSON lines: prompt, response, reward and each reward component."""
from __future__ import annotations

import os
from typing import Any, Sequence

from lightning.pytorch.callbacks import BasePredictionWriter

from flan_rlhf.io import append_jsonl


class JsonlPredictionWriter(BasePredictionWriter):
    """Append each predicted row to ``output_path`` (one file per process under DDP).

    Args:
        output_path: JSONL file. With several processes, rank ``r`` writes
            ``<stem>.rank<r>.jsonl`` beside it.
        overwrite: replace an existing file; otherwise refuse to run so no results are lost.
    """

    def __init__(self, output_path: str = "predictions.jsonl", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.overwrite = overwrite
        self._path: str | None = None
        self.rows_written = 0

    def _resolve(self, trainer) -> str:
        if trainer.world_size == 1:
            return self.output_path
        stem, ext = os.path.splitext(self.output_path)
        return f"{stem}.rank{trainer.global_rank}{ext or '.jsonl'}"

    def on_predict_start(self, trainer, pl_module) -> None:
        path = self._resolve(trainer)
        if os.path.exists(path) and not self.overwrite:
            raise FileExistsError(
                f"prediction file {path} already exists - pass a new output_path or set overwrite: true"
            )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "w", encoding="utf-8").close()
        self._path, self.rows_written = path, 0

    def write_on_batch_end(self, trainer, pl_module, prediction: Sequence[dict[str, Any]], batch_indices, batch, batch_idx, dataloader_idx) -> None:
        append_jsonl(self._path, prediction)
        self.rows_written += len(prediction)

    @property
    def path(self) -> str | None:
        """The file this process wrote in its last ``predict`` (None before one)."""
        return self._path
