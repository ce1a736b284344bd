"""Prompt data for RLHF-PPO: loading (``datasets``), templates, the resumable training stream,
the DataModule."""
from flan_rlhf.data.builtin import BUILTIN_DATASETS, load_builtin
from flan_rlhf.data.datamodule import (
    EvalPromptDataset,
    PromptDataModule,
    PromptTable,
    SplitReport,
    prepare_prompts,
)
from flan_rlhf.data.loading import DataConfigError, fractional_split_indices, load_source
from flan_rlhf.data.stream import PromptBatchStream, epoch_permutation, stream_rows
from flan_rlhf.data.templates import (
    TEMPLATE_PRESETS,
    apply_template,
    resolve_template,
    truncate_to_token_limit,
)

__all__ = [
    "BUILTIN_DATASETS",
    "DataConfigError",
    "EvalPromptDataset",
    "PromptBatchStream",
    "PromptDataModule",
    "PromptTable",
    "SplitReport",
    "TEMPLATE_PRESETS",
    "apply_template",
    "epoch_permutation",
    "fractional_split_indices",
    "load_builtin",
    "load_source",
    "prepare_prompts",
    "resolve_template",
    "stream_rows",
    "truncate_to_token_limit",
]
