"""The one line ``fit`` prints about the model before training: parameters, trainable share, size.

Lightning's default summary is a table whose only row is the actor and whose FLOPs column reads
0: Lightning counts FLOPs only from a module's ``example_input_array``, which a PPO module (prompts
in, sampled responses out) has none of.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.rank_zero import rank_zero_info


def _count(number: int) -> str:
    """``get_human_readable_count`` without the padding it gives counts under 1,000 (``"0  "``)."""
    return get_human_readable_count(number).strip()


def parameter_line(total: int, trainable: int, size_mb: float) -> str:
    """``"model: 259 K parameters, 12.4 K trainable (4.8%), 1.0 MB"`` for ``(259_000, 12_400, 1.037)``."""
    share = f" ({trainable / total:.1%})" if total else ""
    return (f"model: {_count(total)} parameters, {_count(trainable)} trainable"
            f"{share}, {size_mb:.1f} MB")


class ParameterSummary(ModelSummary):
    """Lightning's :class:`ModelSummary` (same counts, DeepSpeed ZeRO-3 included) printed as :func:`parameter_line`.

    Being a ``ModelSummary``, it replaces Lightning's default one when given in ``Trainer(callbacks=...)``.
    """

    @staticmethod
    def summarize(summary_data: Any, total_parameters: int, trainable_parameters: int, model_size: float,
                  total_training_modes: Any, total_flops: int = 0, **summarize_kwargs: Any) -> None:
        rank_zero_info(parameter_line(total_parameters, trainable_parameters, model_size))
