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
from flan_rlhf.rollout import Rollout, sampling_logits, shift_right, tokenize_prompts
from flan_rlhf.settings import GenerationSettings

__all__ = ["PairTokens", "pair_logps", "pairs_from_rollout", "tokenize_preference_pairs"]


@dataclass
class PairTokens:
    """``n`` prompts and their chosen and rejected responses, as token ids.

    Attributes:
        input_ids, attention_mask: ``(n, prompt_len)``, right-padded prompts.
        responses: ``(2n, response_len)``: the chosen responses of prompts ``0..n-1``, then their
            rejected ones; padding holds the pad id.
        mask: ``(2n, response_len)`` float, 1 on response tokens (``</s>`` included).
        weights: ``(n,)`` float, 1 for a pair, 0 for a placeholder (a sampled group whose responses tied).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor

    @property
    def n_pairs(self) -> int:
        return int(self.input_ids.shape[0])

    def lengths(self) -> tuple[list[int], list[int]]:
        """Host lists of each prompt's length ``(n,)`` and each response's ``(2n,)`` (one device read)."""
        return self.attention_mask.sum(1).long().tolist(), self.mask.sum(1).long().tolist()

    def select(self, pairs: list[int], lengths: tuple[list[int], list[int]]) -> "PairTokens":
        """The pairs at indices ``pairs`` (host ints), their padding trimmed to the longest prompt and response
        among them (``lengths``: from :meth:`lengths`, so trimming reads nothing from the device)."""
        prompt_lengths, response_lengths = lengths
        rows = [*pairs, *(self.n_pairs + i for i in pairs)]
        prompt_len = max(prompt_lengths[i] for i in pairs)
        response_len = max(response_lengths[i] for i in rows)
        idx = torch.tensor(pairs, device=self.input_ids.device)
        both = torch.tensor(rows, device=self.input_ids.device)
        return PairTokens(self.input_ids[idx, :prompt_len], self.attention_mask[idx, :prompt_len],
                          self.responses[both, :response_len], self.mask[both, :response_len], self.weights[idx])


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
                      targets["attention_mask"].to(device).float(), torch.ones(len(prompts), device=device))


def pairs_from_rollout(rollout: Rollout, chosen_rows: torch.Tensor, rejected_rows: torch.Tensor,
                       weights: torch.Tensor | None = None) -> PairTokens:
    """The sampled pairs of a rollout: the prompt of ``chosen_rows[i]`` (the same as ``rejected_rows[i]``'s)
    with those two responses; ``chosen_rows``, ``rejected_rows``, ``weights``: ``(n,)`` (weights default to 1)."""
    rows = torch.cat([chosen_rows, rejected_rows])
    if weights is None:
        weights = torch.ones(chosen_rows.shape[0], device=chosen_rows.device)
    return PairTokens(rollout.input_ids[chosen_rows], rollout.attention_mask[chosen_rows],
                      rollout.responses[rows], rollout.mask[rows], weights.float())


def pair_logps(actor: ActorCritic, pairs: PairTokens, decoder_start_token_id: int, average: bool = False,
               reference: bool = False, sampling: GenerationSettings | None = None,
               eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` sequence log-probs, each ``(n,)``: sums of the response tokens' log-probs
    (means with ``average``, IPO's) under the policy (with gradient) or, with ``reference``, the
    reference (adapters off, no gradient).

    ``sampling``: pairs sampled with these settings are scored under the distribution they were drawn
    from, as the rollout scored them (:func:`flan_rlhf.rollout.sampling_logits`: the temperature, EOS
    banned before ``min_new_tokens``); ``None`` (stored pairs): the model's own softmax."""
    decoder_input_ids = shift_right(pairs.responses, decoder_start_token_id)
    logits = actor.shared_prompt_logits(pairs.input_ids, pairs.attention_mask, decoder_input_ids, reference=reference)
    if sampling is not None:
        logits = sampling_logits(logits, sampling.temperature, sampling.min_new_tokens, eos_token_id)
    token_logps = logprobs_from_logits(logits, pairs.responses, check=False)
    totals = sequence_logps(token_logps, pairs.mask, average)
    return totals[:pairs.n_pairs], totals[pairs.n_pairs:]
