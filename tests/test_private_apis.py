"""Every private or undocumented API flan-rlhf relies on, pinned: an upgrade that changes one fails
here with a message naming the API and the module that uses it (each module lists its own in a
comment block). Public replacements were taken where they exist (quantize: ``Linear.weight()``,
``torch.quantize_per_*``, ``setattr``; lightning_cli: ``config_init.get`` over ``LightningCLI._get``).

| API | used by | why there is no public route |
|---|---|---|
| ``LightningOptimizer._on_before_step`` / ``_on_after_step`` | step_counting.py | counting one PPO iteration as one ``global_step`` |
| ``LightningCLI._parse_ckpt_path`` | lightning_cli.py | stopping checkpoint hparams from overriding the config |
| fused AdamW ``found_inf`` / ``_step_supports_amp_scaling`` | optim.py | skipping a step on the device |
| transformers' T5 module layout | t5_fused.py | the fused kernels read T5's weights directly |
| peft LoRA ``Linear`` internals (``lora_A``, ``lora_B``, ``scaling``, ...) | t5_fused.py | folding LoRA into fused projections |
| FSDP2 ``FSDPModule._get_fsdp_state()._lazy_init()`` | sharding.py | making the base model the root before a rollout calls its encoder directly |
| ``numpy._core.multiarray._reconstruct`` | checkpointing.py | numpy arrays in ``weights_only`` loads |
| bitsandbytes ``Linear4bit.support_avx512bf16_for_cpu`` | policy.py | turning off the CPU inference repacking that leaves training forwards without gradients |
| torchmetrics ``_rouge_score_update``, ``_rouge_lsum_score``, ``_normalize_and_tokenize_text``, ``_SacreBLEUTokenizer`` | eval/metrics.py | per-sample scores and BLEU statistics |
"""
from __future__ import annotations

import inspect
import io

import lightning as L
import pytest
import torch


def pinned(ok: bool, api: str, user: str, change: str) -> None:
    """Fail with one message naming the private ``api``, the flan-rlhf module ``user`` and what changed."""
    assert ok, (f"private API {api} changed ({change}); flan_rlhf/{user} relies on it - "
                f"see the comment block there and port it to what the new version offers")


# ----------------------------------------------------------------------------- lightning
class _ThreeStepsPerBatch(L.LightningModule):
    """Manual optimisation with three optimiser steps per batch, optionally counted as one."""

    def __init__(self, count_as_one: bool):
        super().__init__()
        self.automatic_optimization = False
        self.count_as_one = count_as_one
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        from flan_rlhf.step_counting import count_as_one_step

        optimizer = self.optimizers()

        def three_steps():
            for _ in range(3):
                self.manual_backward(self.layer(batch).pow(2).mean())
                optimizer.step()
                optimizer.zero_grad()

        if self.count_as_one:
            with count_as_one_step(optimizer):
                three_steps()
        else:
            three_steps()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("count_as_one", [False, True])
def test_lightning_optimizer_step_hooks_are_what_advances_global_step(count_as_one):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    for hook in ("_on_before_step", "_on_after_step"):
        pinned(hook in vars(LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0))),
               f"LightningOptimizer.{hook}", "step_counting.py", "no longer an instance attribute")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_ThreeStepsPerBatch(count_as_one), torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=2))
    expected = 2 if count_as_one else 6
    pinned(trainer.global_step == expected, "LightningOptimizer._on_before_step/_on_after_step", "step_counting.py",
           f"2 batches of 3 steps gave global_step {trainer.global_step}, expected {expected}")


def test_lightning_cli_still_reads_checkpoint_hparams_in_parse_ckpt_path():
    from lightning.pytorch.cli import LightningCLI

    from flan_rlhf.lightning_cli import FlanRLHFCLI

    pinned("_parse_ckpt_path" in vars(LightningCLI), "LightningCLI._parse_ckpt_path", "lightning_cli.py", "method gone")
    pinned("self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), "LightningCLI._parse_ckpt_path",
           "lightning_cli.py", "no longer called from LightningCLI.__init__: the no-op override would do nothing")
    pinned("hyper_parameters" in inspect.getsource(LightningCLI._parse_ckpt_path), "LightningCLI._parse_ckpt_path",
           "lightning_cli.py", "it no longer reads the checkpoint's hyper_parameters; the override may be unneeded")
    assert FlanRLHFCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


# ----------------------------------------------------------------------------- torch
def test_fused_adamw_skips_its_step_when_found_inf_is_set():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, fused=True)
    pinned(getattr(optimizer, "_step_supports_amp_scaling", False), "AdamW(fused=True)._step_supports_amp_scaling",
           "optim.py", "missing or False")
    parameter.grad = torch.ones(3)
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    del optimizer.found_inf
    state = optimizer.state[parameter]
    pinned(torch.equal(parameter.detach(), torch.ones(3)) and float(state.get("step", 0)) == 0.0,
           "AdamW(fused=True).found_inf", "optim.py", "a step with found_inf=1 changed the weights or the step count")
    optimizer.step()
    pinned(not torch.equal(parameter.detach(), torch.ones(3)), "AdamW(fused=True).found_inf", "optim.py",
           "a step without found_inf did not move the weights")


def test_transformers_t5_layout_is_the_one_the_fused_kernels_read():
    from transformers import T5Config, T5ForConditionalGeneration

    from flan_rlhf.t5_fused import is_fused_t5
    from tests.conftest import TINY_T5

    model = T5ForConditionalGeneration(T5Config(**TINY_T5)).eval()
    api = "transformers T5 module layout"
    pinned(is_fused_t5(model), api, "t5_fused.py", "is_fused_t5 refuses a plain T5: every call falls back to forward")
    attention = model.encoder.block[0].layer[0].SelfAttention
    for name in ("q", "k", "v", "o", "n_heads", "key_value_proj_dim", "has_relative_attention_bias"):
        pinned(hasattr(attention, name), f"T5Attention.{name}", "t5_fused.py", "attribute gone")
    pinned(hasattr(model.decoder.block[0].layer[1], "EncDecAttention"), "T5LayerCrossAttention.EncDecAttention",
           "t5_fused.py", "attribute gone")
    dense = model.encoder.block[0].layer[-1].DenseReluDense
    pinned(hasattr(dense, "wo") and hasattr(dense, "act") and (hasattr(dense, "wi") or hasattr(dense, "wi_0")),
           "T5DenseActDense/T5DenseGatedActDense wi/wi_0/wi_1/wo/act", "t5_fused.py", "attribute gone")
    pinned(hasattr(model.encoder.final_layer_norm, "variance_epsilon"), "T5LayerNorm.variance_epsilon",
           "t5_fused.py", "attribute gone")
    bias = attention.compute_bias(3, 5, device=torch.device("cpu"))
    pinned(tuple(bias.shape) == (1, attention.n_heads, 3, 5), "T5Attention.compute_bias(query_length, key_length, device=)",
           "t5_fused.py", f"returned shape {tuple(bias.shape)}, expected (1, heads, 3, 5)")


def test_peft_lora_linear_exposes_the_factors_the_fused_kernels_fold():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from flan_rlhf.t5_fused import _linear_parts

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    pinned(isinstance(layer, LoraLinear), "peft.tuners.lora.layer.Linear", "t5_fused.py", f"got {type(layer)}")
    for name in ("merged", "disable_adapters", "fan_in_fan_out", "active_adapters", "lora_A", "lora_B", "scaling"):
        pinned(hasattr(layer, name), f"peft LoRA Linear.{name}", "t5_fused.py", "attribute gone")
    parts = _linear_parts(layer)
    pinned(parts is not None and len(parts[1]) == 1, "peft LoRA Linear", "t5_fused.py", "_linear_parts no longer folds it")
    weight, [(a, scaled_b)] = parts
    x = torch.randn(5, 4)
    with torch.no_grad():
        folded, expected = x @ weight.T + x @ a.T @ scaled_b.T, layer(x)
    pinned(torch.allclose(folded, expected, atol=1e-6), "peft LoRA Linear lora_A/lora_B/scaling", "t5_fused.py",
           f"x W^T + x A^T (sB)^T differs from the layer's output by {(folded - expected).abs().max():.2e}")


# ----------------------------------------------------------------------------- numpy
def test_numpy_arrays_unpickle_through_the_allowed_globals():
    import numpy as np

    from flan_rlhf.checkpointing import numpy_array_globals

    core = getattr(np, "_core", None) or np.core
    pinned(hasattr(core.multiarray, "_reconstruct"), "numpy._core.multiarray._reconstruct", "checkpointing.py", "gone")
    buffer = io.BytesIO()
    torch.save({"array": np.arange(4, dtype=np.float32)}, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(numpy_array_globals()):
        loaded = torch.load(buffer, weights_only=True)
    pinned(loaded["array"].tolist() == [0.0, 1.0, 2.0, 3.0], "numpy._core.multiarray._reconstruct", "checkpointing.py",
           "a float32 array did not round-trip through a weights_only load")


# ----------------------------------------------------------------------------- torchmetrics
def test_torchmetrics_rouge_helpers_keep_their_signatures_and_results():
    from torchmetrics.functional.text import rouge

    for name, parameters in (("_rouge_score_update", ("preds", "target", "rouge_keys_values", "accumulate", "stemmer")),
                             ("_rouge_lsum_score", ("pred", "target")),
                             ("_normalize_and_tokenize_text", ("text", "stemmer"))):
        function = getattr(rouge, name, None)
        pinned(function is not None, f"torchmetrics rouge.{name}", "eval/metrics.py", "gone")
        found = tuple(inspect.signature(function).parameters)
        pinned(found[:len(parameters)] == parameters, f"torchmetrics rouge.{name}", "eval/metrics.py",
               f"parameters {found}, expected {parameters} first")
    scores = rouge._rouge_score_update(["the cat sat"], [["the cat sat down"]], [1, "L"], accumulate="best")
    pinned(round(float(scores["L"][0]["fmeasure"]), 4) == 0.8571, "torchmetrics rouge._rouge_score_update",
           "eval/metrics.py", f"ROUGE-L F of 'the cat sat' vs 'the cat sat down' is {scores['L']}, expected 6/7")
    pinned(rouge._normalize_and_tokenize_text("The Cat, sat.") == ["the", "cat", "sat"],
           "torchmetrics rouge._normalize_and_tokenize_text", "eval/metrics.py", "tokens changed")
    lsum = rouge._rouge_lsum_score([["the", "cat"], ["sat"]], [["the", "cat", "sat"]])
    pinned(set(lsum) >= {"precision", "recall", "fmeasure"} and float(lsum["fmeasure"]) == 1.0,
           "torchmetrics rouge._rouge_lsum_score", "eval/metrics.py", f"returned {lsum}")


def test_torchmetrics_sacrebleu_tokenizer_is_constructible_and_splits_punctuation():
    from torchmetrics.functional.text import sacre_bleu

    tokenizer_class = getattr(sacre_bleu, "_SacreBLEUTokenizer", None)
    pinned(tokenizer_class is not None, "torchmetrics sacre_bleu._SacreBLEUTokenizer", "eval/metrics.py", "gone")
    tokens = list(tokenizer_class("13a", False)("Hello, world."))
    pinned(tokens == ["Hello", ",", "world", "."], "torchmetrics sacre_bleu._SacreBLEUTokenizer", "eval/metrics.py",
           f"'Hello, world.' gave {tokens}")


def test_bitsandbytes_linear4bit_cpu_repacking_is_switched_by_the_attribute_policy_turns_off():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(8, 8)
    pinned(hasattr(layer, "support_avx512bf16_for_cpu")
           and "self.support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward),
           "bitsandbytes.nn.Linear4bit.support_avx512bf16_for_cpu", "policy.py (prepare_quantized_base)",
           "Linear4bit.forward no longer reads it")


# ----------------------------------------------------------------------------- torch FSDP2
def test_fsdp2_lazy_init_makes_a_unit_the_root_before_a_child_runs_first():
    """A child unit's forward first makes it a root; the parent's forward then fails. Lazily
    initialising the parent's state first (what ``gathered_weights`` does) keeps the parent the root."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for lazy_init_first in (False, True):
            model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            if lazy_init_first:
                model._get_fsdp_state()._lazy_init()
            model[0](torch.ones(1, 2))
            if lazy_init_first:
                model(torch.ones(1, 2))
            else:
                with pytest.raises(RuntimeError, match="requires running forward through the root module first"):
                    model(torch.ones(1, 2))
    finally:
        if started:
            dist.destroy_process_group()
