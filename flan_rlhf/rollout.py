"""Rollout helpers: tokenise prompts, sample responses, and evaluate them under policy and reference.

All functions are model-agnostic over Hugging Face encoder-decoders and hold no Lightning state.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from flan_rlhf.policy import ActorCritic
from flan_rlhf.ppo import entropy_from_logits, logprobs_from_logits
from flan_rlhf.settings import GenerationSettings


@dataclass
class Rollout:
    """One batch of experience. Token tensors are right-padded.

    Attributes:
        input_ids: prompt tokens, shape ``(batch, prompt_len)``.
        attention_mask: shape ``(batch, prompt_len)``.
        responses: sampled tokens (no decoder start token), shape ``(batch, response_len)``.
        mask: 1 on response tokens up to and including the first EOS, shape ``(batch, response_len)``.
        logprobs / ref_logprobs / values / entropy: per response token under the rollout policy,
            the frozen reference and the value head, shape ``(batch, response_len)``.
        scores: scalar reward per response, shape ``(batch,)``.
        components: each reward component, shape ``(batch,)``.
        prompts / texts: the prompt strings and decoded responses.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    prompts: list[str]
    texts: list[str]
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Right-padded prompt tokens (T5's native padding; TRL PR #262).

    Returns:
        input_ids, attention_mask: shape ``(batch, prompt_len)`` with ``prompt_len`` the longest
        prompt in this batch (dynamic padding), capped at ``max_prompt_tokens``.
        n_truncated: how many prompts were cut to ``max_prompt_tokens``.
    """
    full = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    n_truncated = sum(len(ids) > max_prompt_tokens for ids in full)
    enc = tokenizer(
        list(prompts), padding=True, truncation=True, max_length=max_prompt_tokens, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), n_truncated


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on tokens up to and including the first EOS, 0 after it.

    Args:
        responses: shape ``(batch, response_len)``.
    Returns:
        float mask, shape ``(batch, response_len)``. A response without EOS is all ones.
    """
    is_eos = (responses == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS strictly before this position
    return (eos_before == 0).float()


def shift_right(responses: torch.Tensor, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs ``[start] + responses[:, :-1]``, shape ``(batch, response_len)``."""
    start = torch.full_like(responses[:, :1], decoder_start_token_id)
    return torch.cat([start, responses[:, :-1]], dim=1)


@torch.inference_mode()
def sample_responses(
    actor: ActorCritic, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings, tokenizer
) -> torch.Tensor:
    """Sample responses with the KV cache.

    Returns:
        responses: shape ``(batch, response_len)`` without the decoder start token; tokens after
        EOS are the pad token. A normal (not inference-mode) tensor, safe to use in autograd.
    """
    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        do_sample=settings.do_sample,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    sequences = actor.policy.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return sequences[:, 1:].clone()


@torch.no_grad()
def evaluate_responses(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
    with_reference: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs, values, reference log-probs and entropy of given responses (no gradients).

    Log-probs come from ``logits / temperature`` with no top-k/top-p warping, the same
    distribution the sampler drew from when those are disabled.

    Returns:
        logprobs, values, ref_logprobs (or ``None``), entropy: each ``(batch, response_len)``.
    """
    decoder_input_ids = shift_right(responses, decoder_start_token_id)
    logits, values = actor(input_ids, attention_mask, decoder_input_ids)
    logits = logits / temperature
    logprobs = logprobs_from_logits(logits, responses)
    entropy = entropy_from_logits(logits)
    ref_logprobs = None
    if with_reference:
        ref_logits = actor.reference_logits(input_ids, attention_mask, decoder_input_ids) / temperature
        ref_logprobs = logprobs_from_logits(ref_logits, responses)
    return logprobs, values, ref_logprobs, entropy
