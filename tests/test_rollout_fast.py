"""The hand-written rollout sampler against Hugging Face ``generate`` and teacher-forced forwards."""
from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer

from flan_rlhf.policy import ActorCritic, LoraSettings, build_t5_from_config
from flan_rlhf.ppo import logprobs_from_logits
from flan_rlhf.rollout import (
    collect_experience,
    evaluate_responses,
    reference_logprobs,
    response_mask,
    sample_with_statistics,
    shift_right,
    tokenize_prompts,
)
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.t5_fused import encode_prompts, set_fused_kernels

PROMPTS = ["alpha bravo charlie", "the quick river", "a", "summarize the ancient city of gold and iron towers",
           "red", "modern bridge over the ocean"]


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


def _actor(tokenizer, lora: bool, seed: int = 0) -> ActorCritic:
    torch.manual_seed(seed)
    model = build_t5_from_config(vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=4, seed=seed)
    actor = ActorCritic(model, LoraSettings() if lora else None)
    with torch.no_grad():
        # A fresh adapter is a no-op (B = 0) and a fresh copy equals its original: move the
        # policy so that it differs from the reference.
        for name, param in actor.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
            elif not lora and name.endswith(("q.weight", "v.weight")):
                param.add_(torch.randn_like(param) * 0.2)
    return actor


def _prompts(tokenizer):
    return tokenize_prompts(tokenizer, PROMPTS, 64, "cpu")[:2]


@pytest.mark.parametrize("lora", [True, False])
def test_greedy_tokens_equal_hf_generate(tokenizer, lora):
    actor = _actor(tokenizer, lora)
    ids, mask = _prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    ours = sample_with_statistics(actor, ids, mask, settings, tokenizer).responses
    hf = actor.policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, 1:]
    assert torch.equal(ours, hf)


def test_original_t5_relu_feed_forward_also_matches_hf_generate(tokenizer):
    """The fused stepper's non-gated branch (T5 v1.0: ``wi`` + ReLU), tied embeddings (scaled output)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                      feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0)
    actor = ActorCritic(T5ForConditionalGeneration(config), None)
    ids, mask = _prompts(tokenizer)
    ours = sample_with_statistics(actor, ids, mask, GenerationSettings(max_new_tokens=10, do_sample=False), tokenizer)
    hf = actor.policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)[:, 1:]
    assert torch.equal(ours.responses, hf)
    logprobs, values, _, _ = evaluate_responses(actor, ids, mask, ours.responses, 0, 1.0, with_reference=False)
    keep = response_mask(ours.responses, tokenizer.eos_token_id).bool()
    assert (ours.logprobs - logprobs)[keep].abs().max() < 1e-4


def test_seeded_sampling_draws_the_tokens_hf_generate_draws(tokenizer):
    actor = _actor(tokenizer, lora=True)
    ids, mask = _prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=16, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    torch.manual_seed(123)
    ours = sample_with_statistics(actor, ids, mask, settings, tokenizer).responses
    torch.manual_seed(123)
    hf = actor.policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=0,
                               top_p=1.0, temperature=1.0, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)[:, 1:]
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("lora,temperature", [(True, 1.0), (False, 0.7)])
def test_sampling_statistics_match_a_teacher_forced_forward(tokenizer, lora, temperature):
    actor = _actor(tokenizer, lora)
    ids, mask = _prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=20, temperature=temperature)
    torch.manual_seed(0)
    sampled = sample_with_statistics(actor, ids, mask, settings, tokenizer)
    logprobs, values, ref, entropy = evaluate_responses(actor, ids, mask, sampled.responses, 0, temperature)
    keep = response_mask(sampled.responses, tokenizer.eos_token_id).bool()
    assert (sampled.logprobs - logprobs)[keep].abs().max() < 1e-4
    assert (sampled.values - values)[keep].abs().max() < 1e-4
    assert (sampled.entropy - entropy)[keep].abs().max() < 1e-4
    # the first PPO ratio exp(new - old) is 1 up to float rounding
    assert (torch.exp(logprobs - sampled.logprobs)[keep] - 1).abs().max() < 1e-4
    # and the adapter/copy really changes the distribution (so the reference is a different model)
    if lora:
        assert (ref - logprobs)[keep].abs().max() > 1e-3


def test_generic_cached_forward_path_matches_the_t5_fast_path(tokenizer):
    actor = _actor(tokenizer, lora=True)
    ids, mask = _prompts(tokenizer)
    settings = GenerationSettings(max_new_tokens=10)
    torch.manual_seed(5)
    fast = sample_with_statistics(actor, ids, mask, settings, tokenizer)
    set_fused_kernels(actor.base_model, False)  # HF encoder + stepping the model's own forward
    torch.manual_seed(5)
    generic = sample_with_statistics(actor, ids, mask, settings, tokenizer)
    assert torch.equal(fast.responses, generic.responses)
    assert torch.allclose(fast.logprobs, generic.logprobs, atol=1e-5)
    assert torch.allclose(fast.values, generic.values, atol=1e-5)


def _eos_loving_actor(tokenizer) -> ActorCritic:
    """An actor whose lm_head adds +50 to the EOS logit, so EOS is always the argmax."""
    actor = _actor(tokenizer, lora=False)
    old = actor.policy.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 50.0
    actor.policy.lm_head = head
    return actor


def test_eos_ends_rows_and_generation_stops_when_all_are_done(tokenizer):
    actor = _eos_loving_actor(tokenizer)
    ids, mask = _prompts(tokenizer)
    eos = tokenizer.eos_token_id
    out = sample_with_statistics(actor, ids, mask, GenerationSettings(max_new_tokens=8, do_sample=False), tokenizer)
    assert out.responses.shape == (len(PROMPTS), 1)
    assert torch.all(out.responses == eos)


def test_min_new_tokens_bans_eos_in_the_draws_and_in_every_log_prob(tokenizer):
    actor = _eos_loving_actor(tokenizer)
    ids, mask = _prompts(tokenizer)
    eos = tokenizer.eos_token_id
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=3, do_sample=True)
    torch.manual_seed(0)
    out = sample_with_statistics(actor, ids, mask, settings, tokenizer)
    assert out.responses.shape == (len(PROMPTS), 4)
    assert not torch.any(out.responses[:, :3] == eos)
    assert torch.all(out.responses[:, 3] == eos)
    # The forced tokens are scored by the softmax they were drawn from, EOS banned: without the
    # ban EOS holds nearly all the mass and each forced token has log-prob about -50.
    assert torch.all(out.logprobs[:, :3] > -20)
    assert torch.all(out.logprobs[:, 3] > -1e-3)
    # the teacher-forced passes (the update's and the reference's) take the same ban
    logprobs, _, ref, entropy = evaluate_responses(actor, ids, mask, out.responses, 0, 1.0,
                                                   min_new_tokens=3, eos_token_id=eos)
    torch.testing.assert_close(logprobs, out.logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, out.entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref, reference_logprobs(actor, ids, mask, out.responses, 0, 1.0, 3, eos))
    assert torch.isfinite(entropy).all()
    unbanned, _, _, _ = evaluate_responses(actor, ids, mask, out.responses, 0, 1.0, with_reference=False)
    assert torch.all(unbanned[:, :3] < -40)
    torch.testing.assert_close(unbanned[:, 3:], logprobs[:, 3:])


def test_rows_are_padded_after_their_eos(tokenizer):
    actor = _actor(tokenizer, lora=False)
    ids, mask = _prompts(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # EOS likely but not certain: some rows end early, others run on, so padding is visible
    old = actor.policy.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos] = 4.0
    actor.policy.lm_head = head
    torch.manual_seed(3)
    out = sample_with_statistics(actor, ids, mask, GenerationSettings(max_new_tokens=30), tokenizer)
    is_eos = out.responses == eos
    ended = is_eos.any(dim=1)
    assert ended.any() and out.responses.shape[1] > 1
    for row in range(len(PROMPTS)):
        if ended[row]:
            first = int(is_eos[row].nonzero()[0])
            assert torch.all(out.responses[row, first + 1:] == pad)


def test_sampling_follows_softmax_without_warping(tokenizer):
    """top_k=0, top_p=1: the empirical token distribution is softmax(logits / T)."""
    actor = _actor(tokenizer, lora=False)
    ids, mask = tokenize_prompts(tokenizer, ["alpha"] * 4000, 16, "cpu")[:2]
    settings = GenerationSettings(max_new_tokens=1, temperature=0.5)
    torch.manual_seed(0)
    out = sample_with_statistics(actor, ids, mask, settings, tokenizer)
    probs = out.logprobs.exp()[:, 0]  # p(sampled token) under softmax(logits / T)
    counts = torch.bincount(out.responses[:, 0], minlength=len(tokenizer)).float() / 4000
    top = counts.argmax()
    expected = probs[out.responses[:, 0] == top][0]
    assert abs(counts[top] - expected) < 4 * (expected * (1 - expected) / 4000) ** 0.5 + 1e-3


@pytest.mark.parametrize("lora", [True, False])
def test_reference_logprobs_equal_the_actors_reference_forward(tokenizer, lora):
    actor = _actor(tokenizer, lora)
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(1)
    responses = torch.randint(3, 259, (len(PROMPTS), 9))
    ours = reference_logprobs(actor, ids, mask, responses, 0, 0.5)
    whole = logprobs_from_logits(actor.reference_logits(ids, mask, shift_right(responses, 0)) / 0.5, responses)
    assert torch.allclose(ours, whole, atol=1e-5)
    policy = logprobs_from_logits(actor(ids, mask, shift_right(responses, 0))[0] / 0.5, responses)
    assert (ours - policy).abs().max() > 1e-3  # the reference really is another model


def test_padding_free_encoder_matches_hf_values_and_gradients(tokenizer):
    actor = _actor(tokenizer, lora=True)
    ids, mask = _prompts(tokenizer)
    model = actor.base_model
    hf = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = encode_prompts(model, ids, mask)
    real = mask.bool()
    assert torch.allclose(ours[real], hf[real], atol=1e-5)
    assert torch.all(ours[~real] == 0)  # padded rows are zeros, never attended to
    weights = torch.randn_like(hf)
    lora_params = [p for n, p in actor.named_parameters() if "lora_" in n and "encoder" in n]
    grads_hf = torch.autograd.grad((hf[real] * weights[real]).sum(), lora_params)
    grads_ours = torch.autograd.grad((ours[real] * weights[real]).sum(), lora_params)
    for a, b in zip(grads_hf, grads_ours):
        assert (a - b).norm() <= 1e-4 * a.norm()


def test_collect_experience_returns_aligned_tensors(tokenizer):
    actor = _actor(tokenizer, lora=True)
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(2)
    responses, logprobs, values, ref, entropy = collect_experience(
        actor, ids, mask, GenerationSettings(max_new_tokens=6), tokenizer, 0)
    for t in (logprobs, values, ref, entropy):
        assert t.shape == responses.shape and torch.isfinite(t).all() and not t.is_inference()
    assert torch.all(entropy > 0) and torch.all(logprobs <= 0)
