"""The hand-fused T5 passes against Hugging Face's own forward: values and gradients."""
from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from flan_rlhf import t5_fused
from flan_rlhf.policy import ActorCritic, LoraSettings, build_t5_from_config
from flan_rlhf.rollout import shift_right, tokenize_prompts

PROMPTS = ["alpha bravo charlie", "the quick river", "a", "summarize the ancient city of gold and iron towers"]


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


def _actor(tokenizer, lora: bool, gated: bool = True) -> ActorCritic:
    torch.manual_seed(0)
    if gated:
        model = build_t5_from_config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=4, seed=0)
    else:  # T5 v1.0: ReLU feed-forward, tied embeddings (decoder output scaled by d_model**-0.5)
        model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16,
                                                    num_layers=2, num_heads=4, feed_forward_proj="relu",
                                                    dropout_rate=0.0, decoder_start_token_id=0))
    actor = ActorCritic(model, LoraSettings(target_modules=["q", "k", "v", "o", "wi_0", "wo"]) if lora else None)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0): give it a real effect
        for name, param in actor.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return actor


def _batch(tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS, 64, "cpu")[:2]
    torch.manual_seed(1)
    responses = torch.randint(3, 259, (len(PROMPTS), 7))
    return ids, mask, shift_right(responses, 0), responses


def _hf_forward(actor, ids, mask, decoder_input_ids):
    out = actor.policy(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                       output_hidden_states=True, use_cache=False, return_dict=True)
    return out.decoder_hidden_states[-1], out.logits


@pytest.mark.parametrize("lora,gated", [(True, True), (False, True), (True, False)])
def test_fused_forward_equals_hf_forward_in_values_and_gradients(tokenizer, lora, gated):
    actor = _actor(tokenizer, lora, gated)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    hidden, logits = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
    hf_hidden, hf_logits = _hf_forward(actor, ids, mask, decoder_input_ids)
    # float rounding only: the fused ops sum in another order
    assert (hidden - hf_hidden).abs().max() < 1e-4
    assert (logits - hf_logits).abs().max() < 1e-4
    params = [p for p in actor.policy.parameters() if p.requires_grad]
    weights = torch.randn_like(logits)
    grads = torch.autograd.grad((logits * weights).sum(), params)
    hf_grads = torch.autograd.grad((hf_logits * weights).sum(), params)
    for name_param, a, b in zip([n for n, p in actor.policy.named_parameters() if p.requires_grad], grads, hf_grads):
        assert (a - b).norm() <= 1e-4 * max(b.norm(), 1e-6), name_param


def test_actor_critic_forward_takes_the_fused_path_and_matches_hf(tokenizer, monkeypatch):
    actor = _actor(tokenizer, lora=True)
    ids, mask, decoder_input_ids, responses = _batch(tokenizer)
    calls = []
    real = t5_fused._decode  # the fused decoder computation
    monkeypatch.setattr(t5_fused, "_decode", lambda *a: calls.append(1) or real(*a))
    logits, values = actor(ids, mask, decoder_input_ids)
    assert len(calls) == 1
    hf_hidden, hf_logits = _hf_forward(actor, ids, mask, decoder_input_ids)
    assert torch.allclose(logits, hf_logits, atol=1e-4)
    assert torch.allclose(values, actor.value_head(hf_hidden).squeeze(-1), atol=1e-5)
    ref = actor.reference_logits(ids, mask, decoder_input_ids)
    assert len(calls) == 2
    with actor.policy.disable_adapter():
        hf_ref = actor.policy(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    assert torch.allclose(ref, hf_ref, atol=1e-4)
    assert (ref - logits).abs().max() > 1e-3  # adapters really were off for the reference


def test_switch_and_unsupported_models_fall_back_to_hf(tokenizer):
    actor = _actor(tokenizer, lora=True)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    model = actor.base_model
    assert t5_fused.fused_forward(model, ids, mask, decoder_input_ids) is not None
    t5_fused.set_fused_kernels(model, False)  # what the module does under FSDP / DeepSpeed
    assert t5_fused.fused_forward(model, ids, mask, decoder_input_ids) is None
    t5_fused.set_fused_kernels(model, True)
    # active dropout in training mode: HF's forward (with its dropout) must run instead
    dropout_model = T5ForConditionalGeneration(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8,
                                                        num_layers=1, num_heads=4, dropout_rate=0.1))
    dropout_model.train()
    assert t5_fused.fused_forward(dropout_model, ids, mask, decoder_input_ids) is None
    # a sharded (empty) parameter, as FSDP / ZeRO-3 leave outside forward
    first = model.decoder.block[0].layer[2].DenseReluDense.wi_1  # a plain Linear (no adapter)
    saved = first.weight
    first.weight = torch.nn.Parameter(torch.empty(0))
    try:
        assert not t5_fused.is_fused_t5(model)
    finally:
        first.weight = saved


@pytest.mark.parametrize("lora", [True, False])
def test_no_grad_path_merges_lora_and_still_equals_hf(tokenizer, lora):
    """Without gradients each projection folds LoRA into one weight (the sampling/reference path)."""
    actor = _actor(tokenizer, lora)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    with torch.no_grad():
        hidden, logits = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
        hf_hidden, hf_logits = _hf_forward(actor, ids, mask, decoder_input_ids)
        projection = t5_fused._Projection([actor.base_model.decoder.block[0].layer[0].SelfAttention.q])
    # merging W + s*B@A rounds differently from adding x@A.T@B.T: float32 rounding only
    assert (logits - hf_logits).abs().max() < 5e-4 and (hidden - hf_hidden).abs().max() < 5e-4
    assert projection.low_rank is None  # merged: one matmul


def test_cached_stacked_weights_follow_in_place_updates(tokenizer):
    """Stacked q/k/v weights are kept between calls; an optimiser-style in-place update must
    invalidate them (full fine-tuning: sampling after a step sees the new weights)."""
    actor = _actor(tokenizer, lora=False)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    with torch.no_grad():
        first = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1]
        for name, param in actor.policy.named_parameters():
            if name.endswith(("SelfAttention.k.weight", "DenseReluDense.wi_1.weight")):
                param.add_(torch.randn_like(param) * 0.3)  # as AdamW does: in place
        second = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1]
        hf = _hf_forward(actor, ids, mask, decoder_input_ids)[1]
    assert (first - second).abs().max() > 1e-2
    assert (second - hf).abs().max() < 1e-4


def test_weights_first_stacked_under_inference_mode_still_train(tokenizer):
    """`validate` before `fit` runs the first fused pass under ``inference_mode``: the frozen weights it
    stacks and keeps must be normal tensors, or the first training pass fails to save them for backward."""
    model = build_t5_from_config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=4, seed=0)
    actor = ActorCritic(model, LoraSettings(target_modules=["q", "v"]))  # frozen feed-forward pairs get stacked
    ids, mask, decoder_input_ids, responses = _batch(tokenizer)
    with torch.inference_mode():
        t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
    logits = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), responses.flatten()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in actor.policy.named_parameters() if "lora" in n)


def test_sampling_after_a_fused_adamw_step_sees_the_new_weights(tokenizer):
    """Full fine-tuning with the optimiser flan-rlhf builds (fused AdamW, whose kernel does not bump
    ``Tensor._version``): the no-grad pass after a step must use the stepped weights."""
    from flan_rlhf.optim import adamw

    actor = _actor(tokenizer, lora=False)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    optimizer = adamw([p for p in actor.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0)
    assert optimizer.defaults["fused"]
    with torch.no_grad():
        first = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1]  # as a rollout does
    t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1].logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        second = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1]
        hf = _hf_forward(actor, ids, mask, decoder_input_ids)[1]
    assert (first - hf).abs().max() > 1e-2  # the step moved the model
    assert (second - hf).abs().max() < 1e-4


def test_float16_models_keep_hf_forward_for_its_overflow_clamps(tokenizer):
    actor = _actor(tokenizer, lora=False)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    assert t5_fused.is_fused_t5(actor.base_model)
    actor.base_model.half()
    assert not t5_fused.is_fused_t5(actor.base_model)
    assert t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids) is None


def _storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct storage behind ``module``'s parameters and its stacked-weight caches."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    for part in module.modules():
        stacked = getattr(part, t5_fused._CAT_CACHE, None)
        if stacked is not None:
            storages[stacked.untyped_storage().data_ptr()] = stacked.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("targets", [["q", "v"], ["o"]])
def test_stacked_frozen_weights_are_the_parameters_only_copy(tokenizer, targets):
    """The reference is the policy with its adapters off, so the base weights must exist once: the
    stacks the fused path multiplies with are the frozen parameters' storage, not a second copy."""
    model = build_t5_from_config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=4, seed=0)
    actor = ActorCritic(model, LoraSettings(target_modules=targets))
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    one_copy = sum(p.numel() * p.element_size() for p in actor.parameters())
    assert _storage_bytes(actor) == one_copy
    t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)[1].logsumexp(-1).mean().backward()
    with torch.no_grad():
        t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
        with actor.policy.disable_adapter():
            t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
    stacks = [m for m in actor.modules() if getattr(m, t5_fused._CAT_CACHE, None) is not None]
    assert len(stacks) >= 8  # each block's wi_0|wi_1 at least
    assert _storage_bytes(actor) == one_copy


def test_stacked_frozen_weights_follow_in_place_updates_and_new_storage(tokenizer):
    """A frozen weight updated in place (``load_state_dict``) is seen through the stack it views; one given
    new storage (``.data = ...``) is stacked again."""
    actor = _actor(tokenizer, lora=True)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    base = actor.base_model
    ffn = base.decoder.block[1].layer[2].DenseReluDense
    with torch.no_grad(), actor.policy.disable_adapter():
        first = t5_fused.fused_forward(base, ids, mask, decoder_input_ids)[1]
        assert ffn.wi_1.weight.untyped_storage().data_ptr() == getattr(ffn.wi_0, t5_fused._CAT_CACHE).untyped_storage().data_ptr()
        ffn.wi_1.load_state_dict({"weight": torch.randn_like(ffn.wi_1.weight)})
        second = t5_fused.fused_forward(base, ids, mask, decoder_input_ids)[1]
        torch.testing.assert_close(second, _hf_forward(actor, ids, mask, decoder_input_ids)[1], atol=1e-4, rtol=1e-4)
        ffn.wi_1.weight.data = torch.randn_like(ffn.wi_1.weight)  # new storage: no longer a view
        third = t5_fused.fused_forward(base, ids, mask, decoder_input_ids)[1]
        torch.testing.assert_close(third, _hf_forward(actor, ids, mask, decoder_input_ids)[1], atol=1e-4, rtol=1e-4)
    assert (first - second).abs().max() > 1e-2 and (second - third).abs().max() > 1e-2


def test_cached_stacked_weights_follow_a_dtype_move(tokenizer):
    """``model.to(dtype)`` replaces parameter storage without a version bump: the cache must notice."""
    actor = _actor(tokenizer, lora=True)
    ids, mask, decoder_input_ids, _ = _batch(tokenizer)
    with torch.no_grad(), actor.policy.disable_adapter():
        t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)  # fills the cache (fp32)
        actor.base_model.to(torch.bfloat16)
        hidden, logits = t5_fused.fused_forward(actor.base_model, ids, mask, decoder_input_ids)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
