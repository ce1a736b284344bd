"""Chosen and rejected responses of each prompt, scored by a seq2seq policy and its reference.

DPO needs ``log pi(y|x)`` of two responses per prompt under the policy (with gradient) and under
the reference (LoRA adapters off, no gradient). For an encoder-decoder the prompt goes to the
encoder and only the response is scored, on the decoder side:

* decoder inputs are ``[decoder_start] + response[:-1]`` (:func:`flan_rlhf.rollout.shift_right`), so
  the start token is an input and never scored, and every response token, its ``</s>`` included,
  is scored once;
* padding after a response is masked out of its sum;
* the two responses of a prompt share one encoder pass
  (:meth:`flan_rlhf.policy.ActorCritic.shared_prompt_logits`): rows ``0..n-1`` are the chosen, rows
  ``n..2n-1`` the rejected responses of prompts ``0..n-1``.

This is TRL's old encoder-decoder DPO path (``labels`` = completion ids, shifted by the model) with
the prompt encoded once instead of twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from flan_rlhf.dpo import sequence_logps
from flan_rlhf.policy import ActorCritic
from flan_rlhf.ppo import logprobs_from_logits
from flan_rlhf.rollout import Rollout, shift_right, tokenize_prompts

__all__ = ["PairTokens", "pair_logps", "pairs_from_rollout", "tokenize_preference_pairs"]


@dataclass
class PairTokens:
    """``n`` prompts and their chosen and rejected responses, as token ids.

    Attributes:
        input_ids, attention_mask: ``(n, prompt_len)``, right-padded prompts.
        responses: ``(2n, response_len)``: the chosen responses of prompts ``0..n-1``, then their
            rejected ones; padding holds the pad id.
        mask: ``(2n, response_len)`` float, 1 on response tokens (``</s>`` included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.input_ids.shape[0])


def tokenize_preference_pairs(tokenizer: Any, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                              max_prompt_tokens: int, max_response_tokens: int, device) -> PairTokens:
    """Tokenise ``n`` (prompt, chosen, rejected) triples: prompts as the rollout does
    (:func:`flan_rlhf.rollout.tokenize_prompts`, cut at ``max_prompt_tokens``), responses as targets
    (``text_target``: ``</s>`` appended), cut at ``max_response_tokens``."""
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected responses: "
                         "need one of each per pair")
    input_ids, attention_mask, _ = tokenize_prompts(tokenizer, prompts, max_prompt_tokens, device)
    targets = tokenizer(text_target=[*chosen, *rejected], padding=True, truncation=True,
                        max_length=max_response_tokens, return_tensors="pt")
    return PairTokens(input_ids, attention_mask, targets["input_ids"].to(device),
                      targets["attention_mask"].to(device).float())


def pairs_from_rollout(rollout: Rollout, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor) -> PairTokens:
    """The sampled pairs of a rollout: the prompt of ``chosen_rows[i]`` (the same as ``rejected_rows[i]``'s)
    with those two responses; ``chosen_rows``, ``rejected_rows``: ``(n,)`` row indices."""
    rows = torch.cat([chosen_rows, rejected_rows])
    return PairTokens(rollout.input_ids[chosen_rows], rollout.attention_mask[chosen_rows],
                      rollout.responses[rows], rollout.mask[rows])


def pair_logps(actor: ActorCritic, pairs: PairTokens, decoder_start_token_id: int, average: bool = False,
               reference: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probs, each ``(n,)``: sums of the response tokens' log-probs
    (means with ``average``, IPO's) under the policy (with gradient) or, with ``reference``, the
    reference (adapters off, no gradient)."""
    decoder_input_ids = shift_right(pairs.responses, decoder_start_token_id)
    logits = actor.shared_prompt_logits(pairs.input_ids, pairs.attention_mask, decoder_input_ids, reference=reference)
    token_logps = logprobs_from_logits(logits, pairs.responses, check=False)
    totals = sequence_logps(token_logps, pairs.mask, average)
    return totals[:pairs.n_pairs], totals[pairs.n_pairs:]
