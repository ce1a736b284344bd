"""The filters of flan_rlhf.quiet drop exactly the messages they name; everything else still shows."""
from __future__ import annotations

import logging
import warnings

import pytest

from flan_rlhf.quiet import HARMLESS_LOG_RECORDS, HARMLESS_WARNINGS, silence_harmless


@pytest.mark.parametrize("logger_name, message, dropped", [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging and experiment tracking, try litlogger", True),
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary callbacks: [ParameterSummary].", True),
    ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False", False),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped: `max_steps=4` reached.", False),
    ("transformers.modeling_utils", "The tied weights mapping and config for this model specifies to tie shared.weight to "
     "lm_head.weight, but both are present in the checkpoints with different values, so we will NOT tie them.", True),
    ("transformers.modeling_utils", "The tied weights mapping and config for this model specifies to tie embed.weight to "
     "head.weight, but both are present in the checkpoints with different values, so we will NOT tie them.", False),
    ("transformers.modeling_utils", "Some weights of T5ForConditionalGeneration were not initialized from the model checkpoint", False),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum sequence "
     "length for this model (700 > 512). Running this sequence through the model will result in indexing errors", True),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: Version 1 of "
     "'kernels-community/quantization-bitsandbytes' is not available in the local cache and Hugging Face Hub is in "
     "offline mode.. Please make sure you already `pip install kernels` and the kernels >= 0.11.1", True),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
     "because Hugging Face Hub is in offline mode.", True),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in "
     "offline mode.", False),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during "
     "quantization", True),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from torch.float64 to float16 during "
     "quantization", False),
])
def test_log_records(logger_name, message, dropped, caplog):
    silence_harmless()
    silence_harmless()  # twice: no filter is added twice
    logger = logging.getLogger(logger_name)
    ours = [f for f in logger.filters if type(f).__name__ == "_DropMatching"]
    assert len(ours) == sum(1 for name, _, _ in HARMLESS_LOG_RECORDS if name == logger_name)
    with caplog.at_level(logging.INFO, logger=logger_name):
        logger.warning(message)
    assert (message not in caplog.text) == dropped


@pytest.mark.parametrize("message, category, dropped", [
    ("Using ModelCheckpoint with manual optimization. The saved state is the one after", UserWarning, True),
    ("Checkpoint directory /runs/ckpt exists and is not empty.", UserWarning, True),
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, True),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", DeprecationWarning, True),
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", UserWarning, False),  # another category
    ("The dataloader does not have many workers which may be a bottleneck.", UserWarning, False),
])
def test_warnings(message, category, dropped):
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        silence_harmless()
        warnings.warn(message, category)
    assert (not caught) == dropped, [str(w.message) for w in caught]
    assert len(HARMLESS_WARNINGS) == len({pattern for pattern, _, _ in HARMLESS_WARNINGS})


def test_loading_a_saved_model_and_filtering_pairs_print_no_library_bar(tiny_model_dir, tmp_path, capfd):
    """transformers' "Loading weights" and datasets' "Generating ... split" and "Filter" bars stay off inside
    the block, and are on after."""
    import json

    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    from flan_rlhf.policy import load_seq2seq_model
    from flan_rlhf.reward_model import PreferenceDataModule

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                             for i in range(40)))
    was_on = hf_logging.is_progress_bar_enabled(), datasets_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # a tool run earlier in this process may have turned them off for good
    datasets_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_seq2seq_model(tiny_model_dir, False)
        PreferenceDataModule(dataset=str(pairs), prompt_column="prompt").setup("fit")
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Filter" not in err and "Generating train split" not in err, err
        assert hf_logging.is_progress_bar_enabled() and datasets_logging.is_progress_bar_enabled()
    finally:
        if not was_on[0]:
            hf_logging.disable_progress_bar()
        if not was_on[1]:
            datasets_logging.disable_progress_bar()
