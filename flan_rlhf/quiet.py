"""Third-party messages the project knows to be harmless, silenced by precise filters.

:func:`silence_harmless` is called at the entry points (:func:`flan_rlhf.cli.main` and
:func:`flan_rlhf.lightning_cli.run_lightning_cli`). Each filter matches one message by its
text, so every other warning, from these libraries too, still shows. ``benchmarks/count_warnings.py``
counts what the commands print outside the project's own lines.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

# (message regex, category, why it is harmless) for the ``warnings`` module.
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    ("Using ModelCheckpoint with manual optimization", UserWarning,
     "Lightning 2.6 warns on every checkpoint of a manual-optimisation module that the saved state is the one "
     "after optimisation; a PPO checkpoint is taken after a whole iteration, exactly the state to resume from"),
    ("LightningCLI's args parameter is intended", UserWarning,
     "flan_rlhf.cli passes each command its own part of sys.argv explicitly (and demo its stages' arguments), "
     "which LightningCLI warns about, printing the internal argv"),
    (r"Checkpoint directory .* exists and is not empty", UserWarning,
     "Lightning says so on every resume into the run's own folder; a run that starts from scratch over "
     "checkpoints gets the project's own warning (FlanRLHFCLI) naming --ckpt_path last"),
    ("`is_gradient_checkpointing` is deprecated", FutureWarning,
     "peft 0.21's PeftModel.__init__ reads transformers 5's deprecated property; nothing the user wrote"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning,
     "Lightning 2.6's CombinedLoader builds torch 2.13's deprecated LeafSpec on every fit"),
    (r"FSDP2-wrapped module \(FSDPLinear\) returned a view tensor", UserWarning,
     "under FSDP2Strategy the value head is a unit of its own (flan_rlhf.sharding) and nn.Linear over "
     "(batch, length, hidden) returns a view; flan-rlhf only reads it out of place (squeeze, float, masked "
     "means), and its gradient equals DDP's (tests/test_fsdp2.py)"),
)

# (logger name, message regex, why it is harmless) for ``logging`` records.
HARMLESS_LOG_RECORDS: tuple[tuple[str, str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging",
     "an advert for a hosted logger"),
    ("lightning.pytorch.utilities.rank_zero", r"Trainer already configured with model summary callbacks",
     "the project's ParameterSummary replaces Lightning's table on purpose"),
    ("transformers.modeling_utils", r"specifies to tie shared\.weight to lm_head\.weight, but both are present",
     "transformers 5 forces T5Config.tie_word_embeddings=True, yet FLAN-T5 (T5 v1.1) has its own lm_head: every "
     "FLAN-T5 checkpoint, the hub's included, holds both and transformers rightly keeps them apart"),
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than the specified maximum",
     "the project measures prompt lengths untruncated on purpose (to count and report truncation) and "
     "truncates before the model sees them"),
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "bitsandbytes' CPU backend (0.50: bitsandbytes/backends/cpu/ops.py) on a CPU with AVX512-BF16 tries to fetch an optional 4-bit matmul kernel from the Hub "
     "when it is imported; offline (or without the `kernels` package) its `except` falls back to its own torch "
     "code, the same arithmetic (QLoRA, PolicySpec.quantization)"),
    ("kernels._internals.hf_hub", r"^Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
     "the same optional kernel of bitsandbytes' CPU backend, looked up offline (see the line above)"),
    ("bitsandbytes.autograd._functions", r"^MatMul8bitLt: inputs will be cast from torch\.(float32|bfloat16) to float16",
     "LLM.int8() (PolicySpec.quantization 8bit) quantises each input row through float16 by design and says so "
     "at every layer call; in T5 the 8-bit layers' inputs are layer-normed (q, k, v, wi) or attention outputs (o), "
     "well inside float16's range, and the feed-forward output `wo`, whose inputs are large, stays float32 "
     "(transformers' T5 `_keep_in_fp32_modules`)"),
)


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """transformers' (and the Hub's) and ``datasets``' own progress bars off inside the block, restored after.

    For steps of a fraction of a second inside a command that shows its own progress: loading a saved
    model ("Loading weights"), writing one small file, filtering a small table ("Filter"); their bars
    would be the only foreign lines around the project's. ``datasets``' bars are switched only where
    ``datasets`` is already imported (the data modules import it first), so loading a model for
    ``generate`` or ``label`` does not import it (~0.4 s).
    """
    from transformers.utils import logging as hf_logging

    datasets_logging = sys.modules.get("datasets.utils.logging")
    switched = [(hf_logging, hf_logging.is_progress_bar_enabled())]
    if datasets_logging is not None:
        switched.append((datasets_logging, datasets_logging.is_progress_bar_enabled()))
    for library, _ in switched:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, was_on in switched:
            if was_on:
                library.enable_progress_bar()


class _DropMatching(logging.Filter):
    """A ``logging`` filter that drops the records whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_harmless() -> None:
    """Install the filters of :data:`HARMLESS_WARNINGS` and :data:`HARMLESS_LOG_RECORDS`; calling again adds none twice."""
    for pattern, category, _why in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)  # replaces an identical filter
    for logger_name, pattern, _why in HARMLESS_LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
