"""DPO's wiring (:mod:`flan_rlhf.pair_logps`): each chosen and rejected log-prob the loss receives equals a
teacher-forced forward of that response alone, on T5's fused path and on BART's own forward."""
from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer

from flan_rlhf.pair_logps import pair_logps, pairs_from_rollout, tokenize_preference_pairs
from flan_rlhf.policy import ActorCritic, LoraSettings, load_policy_model
from flan_rlhf.ppo import logprobs_from_logits
from flan_rlhf.rollout import collect_experience, response_mask, shift_right, tokenize_prompts
from flan_rlhf.settings import GenerationSettings
from tests.conftest import tiny_policy_spec
from tests.test_other_architectures import BART_LORA

PROMPTS = ["Summarize: the cat sat on the mat all day.", "Reply kindly.", "Summarize: rain, then sun."]
CHOSEN = ["A cat sat.", "Thank you so much, that is lovely!", "Rain then sun."]
REJECTED = ["The stupid cat sat on the mat all day long.", "No.", "It rained."]


def perturbed_actor(model, lora: LoraSettings) -> ActorCritic:
    """An actor whose adapters are not zero, so policy and reference differ; the same whatever ran before
    (peft draws lora_A from the global generator)."""
    torch.manual_seed(0)
    actor = ActorCritic(model, lora, with_value_head=False)
    with torch.no_grad():
        for name, param in actor.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=1.0, generator=torch.Generator().manual_seed(1))
    return actor


def alone(actor: ActorCritic, tokenizer, prompt: str, response: str, reference: bool) -> float:
    """``log pi(response | prompt)`` from one unpadded teacher-forced forward of this response only."""
    ids, mask, _ = tokenize_prompts(tokenizer, [prompt], 512, "cpu")
    target = tokenizer(text_target=[response], return_tensors="pt")["input_ids"]  # ends with </s>, no padding
    decoder_input_ids = shift_right(target, actor.base_model.config.decoder_start_token_id)
    with torch.no_grad():
        logits = (actor.reference_logits(ids, mask, decoder_input_ids) if reference
                  else actor(ids, mask, decoder_input_ids)[0])
    return logprobs_from_logits(logits, target).sum().item()


def assert_each_pair_equals_its_responses_alone(actor: ActorCritic, tokenizer) -> None:
    pairs = tokenize_preference_pairs(tokenizer, PROMPTS, CHOSEN, REJECTED, 512, 128, "cpu")
    assert pairs.responses.shape[0] == 2 * len(PROMPTS)
    assert (pairs.mask.sum(1) < pairs.mask.shape[1]).any()  # some rows are padded: the mask matters
    start = actor.base_model.config.decoder_start_token_id
    for reference in (False, True):
        chosen, rejected = pair_logps(actor, pairs, start, reference=reference)
        for i, prompt in enumerate(PROMPTS):
            # float32 sums of ~200 nats in another order (padding): 1e-4 absolute or 2e-6 relative
            assert chosen[i].item() == pytest.approx(alone(actor, tokenizer, prompt, CHOSEN[i], reference),
                                                     abs=1e-4, rel=2e-6)
            assert rejected[i].item() == pytest.approx(alone(actor, tokenizer, prompt, REJECTED[i], reference),
                                                       abs=1e-4, rel=2e-6)
    # the policy and the reference are different models here, so the equality above is not vacuous
    assert (pair_logps(actor, pairs, start)[0] - pair_logps(actor, pairs, start, reference=True)[0]).abs().max() > 1e-3  # 10x the tolerance


def test_t5_pair_logps_equal_a_forward_of_each_response_alone():
    model, tokenizer = load_policy_model(tiny_policy_spec())
    assert_each_pair_equals_its_responses_alone(perturbed_actor(model, LoraSettings(r=4, alpha=8)), tokenizer)


def test_bart_pair_logps_equal_a_forward_of_each_response_alone(bart_dir):
    from transformers import BartForConditionalGeneration

    model = BartForConditionalGeneration.from_pretrained(bart_dir)
    assert_each_pair_equals_its_responses_alone(perturbed_actor(model, BART_LORA), ByT5Tokenizer())


def test_both_responses_share_one_encoder_pass_whose_gradient_collects_both():
    """One encoder call per batch of pairs, and the encoder adapters' gradient from it equals the sum of
    the gradients of every response's own forward (its own encoder pass)."""
    model, tokenizer = load_policy_model(tiny_policy_spec())
    actor = perturbed_actor(model, LoraSettings(r=4, alpha=8))
    pairs = tokenize_preference_pairs(tokenizer, PROMPTS, CHOSEN, REJECTED, 512, 128, "cpu")
    start = actor.base_model.config.decoder_start_token_id
    calls = []
    handle = actor.base_model.get_encoder().block[0].register_forward_pre_hook(lambda *args: calls.append(1))
    actor.gradient_checkpointing = True  # HF's own encoder, whose blocks the hook sees (the fused one skips them)
    with torch.no_grad():
        pair_logps(actor, pairs, start)
    handle.remove()
    assert len(calls) == 1
    actor.gradient_checkpointing = False

    encoder_lora = [p for n, p in actor.policy.named_parameters() if "encoder" in n and "lora_A" in n]
    chosen, rejected = pair_logps(actor, pairs, start)
    (chosen.sum() + rejected.sum()).backward()
    shared = [p.grad.clone() for p in encoder_lora]
    actor.zero_grad()
    for prompt, *responses in zip(PROMPTS, CHOSEN, REJECTED):
        ids, mask, _ = tokenize_prompts(tokenizer, [prompt], 512, "cpu")
        for response in responses:
            target = tokenizer(text_target=[response], return_tensors="pt")["input_ids"]
            logits, _ = actor(ids, mask, shift_right(target, start))
            logprobs_from_logits(logits, target).sum().backward()
    for a, b in zip(shared, [p.grad for p in encoder_lora]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # float32 sums in another order
    assert max(g.abs().max().item() for g in shared) > 1e-2


@pytest.mark.parametrize("sampling", [GenerationSettings(max_new_tokens=12),
                                      GenerationSettings(max_new_tokens=12, temperature=0.7, min_new_tokens=4)])
def test_sampled_pairs_are_scored_as_the_rollout_scored_them(sampling):
    """Pairs cut from a rollout (online DPO) get, token for token, the log-probs the sampler recorded
    (under its temperature and EOS ban), summed over each response up to its first </s>."""
    model, tokenizer = load_policy_model(tiny_policy_spec())
    actor = perturbed_actor(model, LoraSettings(r=4, alpha=8))
    ids, mask, _ = tokenize_prompts(tokenizer, PROMPTS * 2, 512, "cpu")
    start = actor.base_model.config.decoder_start_token_id
    torch.manual_seed(0)
    with torch.no_grad():
        responses, logprobs, _, ref_logprobs, entropy = collect_experience(
            actor, ids, mask, sampling, tokenizer, start)
    response_tokens = response_mask(responses, tokenizer.eos_token_id)

    class Sampled:  # the Rollout fields pairs_from_rollout reads
        input_ids, attention_mask = ids, mask
    Sampled.responses, Sampled.mask = responses, response_tokens
    chosen_rows, rejected_rows = torch.tensor([0, 4]), torch.tensor([3, 1])  # prompt 0 twice, prompt 1 twice
    pairs = pairs_from_rollout(Sampled, chosen_rows, rejected_rows)
    with torch.no_grad():
        chosen, rejected = pair_logps(actor, pairs, start, sampling=sampling, eos_token_id=tokenizer.eos_token_id)
        ref_chosen, _ = pair_logps(actor, pairs, start, reference=True, sampling=sampling,
                                   eos_token_id=tokenizer.eos_token_id)
    recorded = (logprobs * response_tokens).sum(1)
    torch.testing.assert_close(chosen, recorded[chosen_rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rejected, recorded[rejected_rows], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref_chosen, (ref_logprobs * response_tokens).sum(1)[chosen_rows], atol=1e-4, rtol=1e-4)
