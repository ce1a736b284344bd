"""Rollout helpers: tokenise prompts, sample responses, and evaluate them under policy and reference.

All functions are model-agnostic over Hugging Face encoder-decoders and hold no Lightning state.

Speed (profile in the README): :func:`sample_with_statistics` samples with a
hand-written loop over the decoder and a preallocated KV cache, and returns the log-probs,
values and entropies of the sampled tokens from the same pass, so a rollout needs no second
teacher-forced forward of the policy (the first PPO ratio is still 1 up to float rounding,
checked in ``tests/test_rollout_fast.py``). T5-family models take the fused path of
:mod:`flan_rlhf.t5_fused` (a padding-free encoder, LoRA folded into the weights once per
rollout, each decoder step a few fused tensor ops); other encoder-decoders step through the
model's ``forward`` with its KV cache.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from flan_rlhf.policy import ActorCritic
from flan_rlhf.ppo import entropy_from_logits, logprobs_from_logits
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.t5_fused import is_fused_t5, prepare_sampling


@dataclass(frozen=True)
class Rollout:
    """One batch of experience, built once by ``OnPolicyModule.rollout``. Token tensors are right-padded.

    Attributes:
        input_ids: prompt tokens, shape ``(batch, prompt_len)``.
        attention_mask: shape ``(batch, prompt_len)``.
        responses: sampled tokens (no decoder start token), shape ``(batch, response_len)``.
        mask: 1 on response tokens up to and including the first EOS, shape ``(batch, response_len)``.
        logprobs / ref_logprobs / values / entropy: per response token under the rollout policy,
            the frozen reference and the value head, shape ``(batch, response_len)``
            (``ref_logprobs`` is zeros when the reference was not evaluated).
        prompts / texts: the prompt strings as the model saw them (a prompt over the model's
            token cap is shown cut, as it was encoded) and the decoded responses.
        prompt_cut: per prompt, whether the model's token cap cut its end (the data module
            normally cuts the inserted text first, so this stays all False).
        scores: scalar reward per response, shape ``(batch,)``; ``None`` when the rollout was
            sampled unscored (the before/after comparison scores with its own scorers).
        components: each reward component, shape ``(batch,)`` (empty when unscored).
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
    prompt_cut: list[bool]
    scores: torch.Tensor | None
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_truncated(self) -> int:
        """How many prompts the model's token cap cut."""
        return sum(self.prompt_cut)


def response_rows(rollout: Rollout, batch: Mapping[str, Any], columns: Mapping[str, Sequence[float] | torch.Tensor]) -> list[dict[str, Any]]:
    """One dict per response of ``rollout``, for prediction files and before/after reports.

    Keys, in order: ``prompt_id``, ``sample`` and ``id`` (when ``batch`` carries them, as
    :meth:`flan_rlhf.data.datamodule.PromptTable.batch` does), ``prompt`` (as the model saw it),
    ``prompt_truncated`` (the data module or the model's cap cut the prompt), ``response``,
    ``references`` (``[]`` when the batch has none), then each of ``columns`` (shape ``(batch,)``;
    a tensor is read with one ``tolist`` per column, so integer columns stay ``int``).
    """
    values_of = {name: values.tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]
                 for name, values in columns.items()}
    truncated_by_data = batch["truncated"].tolist() if "truncated" in batch else [False] * len(rollout.prompts)
    rows = []
    for i, (prompt, text) in enumerate(zip(rollout.prompts, rollout.texts)):
        row: dict[str, Any] = {key: int(batch[key][i]) for key in ("prompt_id", "sample") if key in batch}
        if "id" in batch:
            row["id"] = batch["id"][i]
        row["prompt"] = prompt
        row["prompt_truncated"] = bool(truncated_by_data[i] or rollout.prompt_cut[i])
        row["response"] = text
        row["references"] = list(batch["references"][i]) if batch.get("references") else []
        row.update({name: values[i] for name, values in values_of.items()})
        rows.append(row)
    return rows


@dataclass
class SampledResponses:
    """Responses and what the sampling pass measured on them.

    Attributes:
        responses: sampled tokens without the decoder start token, pad after EOS,
            shape ``(batch, response_len)``; ``response_len <= max_new_tokens`` (shorter when
            every row emitted EOS early).
        logprobs: log-prob of each sampled token under :func:`sampling_logits` (``logits / temperature``,
            EOS banned before ``min_new_tokens``; training takes no other processor), ``(batch, response_len)``.
        values: value-head output on the decoder's last hidden state, ``(batch, response_len)``;
            zeros when the actor has no value head.
        entropy: entropy of the softmax of :func:`sampling_logits`, ``(batch, response_len)``.
    """

    responses: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Right-padded prompt tokens (T5's native padding; TRL PR #262).

    Returns:
        input_ids, attention_mask: shape ``(batch, prompt_len)`` with ``prompt_len`` the longest
        prompt in this batch (dynamic padding), capped at ``max_prompt_tokens``.
        cut: per prompt, whether it was longer than ``max_prompt_tokens`` and lost its end.
    """
    full = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    cut = [len(ids) > max_prompt_tokens for ids in full]
    enc = tokenizer(
        list(prompts), padding=True, truncation=True, max_length=max_prompt_tokens, return_tensors="pt"
    )
    return enc["input_ids"].to(device), enc["attention_mask"].to(device), cut


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


def sampling_logits(logits: torch.Tensor, temperature: float, min_new_tokens: int = 0,
                    eos_token_id: int | None = None, first_position: int = 0) -> torch.Tensor:
    """The logits of the distribution training samples from: ``logits / temperature`` with EOS banned
    at response positions before ``min_new_tokens`` (transformers' ``MinNewTokensLengthLogitsProcessor``).

    Log-probs and entropies taken from these describe the draws (with the ban left out they would not,
    and the KL estimate would be biased: TRL's "negative KL" notes). The ban is the dtype's lowest
    finite value, not ``-inf``, so ``softmax * logits`` in the entropy stays finite.

    Args:
        logits: ``(batch, positions, vocab)``: response positions ``first_position ...``.
        first_position: the response position of ``logits[:, 0]`` (a sampling step passes its step).
    Returns:
        ``(batch, positions, vocab)``; a new tensor unless nothing changes (temperature 1, no ban).
    """
    scaled = logits / temperature if temperature != 1.0 else logits
    banned = min(int(min_new_tokens or 0) - first_position, logits.shape[1])
    if banned <= 0 or eos_token_id is None:
        return scaled
    ban = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
    ban[:banned, eos_token_id] = True
    return scaled.masked_fill(ban, torch.finfo(scaled.dtype).min)


def shift_right(responses: torch.Tensor, decoder_start_token_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs ``[start] + responses[:, :-1]``, shape ``(batch, response_len)``."""
    start = torch.full_like(responses[:, :1], decoder_start_token_id)
    return torch.cat([start, responses[:, :-1]], dim=1)


# ------------------------------------------------------------------------------------ sampling


def _decoder_start_token_id(model, tokenizer) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    return tokenizer.pad_token_id if start is None else int(start)


def _token_chooser(settings: GenerationSettings) -> Callable[[torch.Tensor], torch.Tensor]:
    """``choose(scores) -> tokens``: Hugging Face ``generate``'s token selection from the step's
    :func:`sampling_logits` (temperature applied, EOS banned before ``min_new_tokens``, as
    ``generate``'s min-new-tokens processor and temperature warper leave them: a banned logit is
    ``-inf`` there and the dtype's lowest value here, both probability 0), then the top-k and top-p
    warpers (only those that change anything) and ``multinomial(softmax(scores))`` or ``argmax``.
    With the same RNG state and the same logits it draws the same tokens.

    ``scores``: float32, shape ``(batch, vocab)``; returns ``(batch,)`` int64.
    """
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    warpers: list = []
    if settings.do_sample:
        if settings.top_k is not None and settings.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=int(settings.top_k)))
        if settings.top_p is not None and settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=float(settings.top_p)))

    def choose(scores: torch.Tensor) -> torch.Tensor:
        if not settings.do_sample:
            return scores.argmax(dim=-1)
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return choose


class _CachedForwardStepper:
    """One decoder step through the model's own ``forward`` and its KV cache (any encoder-decoder).

    ``step(tokens, position)`` has :meth:`flan_rlhf.t5_fused.FusedT5Stepper.step`'s contract (``position`` is
    implied by the cache here).
    """

    def __init__(self, model, encoder_outputs, attention_mask: torch.Tensor):
        self.model = model
        self.encoder_outputs = encoder_outputs
        self.attention_mask = attention_mask
        self.cache = None
        # transformers 5 renamed ``past_key_values`` to ``cache``
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def step(self, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.attention_mask,
            decoder_input_ids=tokens[:, None],
            use_cache=True,
            output_hidden_states=True,
            return_dict=True,
            **{self.cache_kwarg: self.cache},
        )
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        return out.decoder_hidden_states[-1][:, -1], out.logits[:, -1]


@torch.no_grad()
def sample_with_statistics(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    tokenizer,
) -> SampledResponses:
    """Sample responses with the KV cache, measuring log-probs, values and entropy on the way.

    The tokens are drawn exactly as Hugging Face ``generate`` draws them (same processors,
    same ``torch.multinomial`` call per step, pad after EOS, stop when every row has emitted
    EOS), so for the same RNG state the responses agree with ``actor.policy.generate`` up to
    float rounding of the logits.

    Args:
        actor: the actor-critic; sampling uses the policy (LoRA adapters on).
        input_ids, attention_mask: prompts, ``(batch, prompt_len)``, right-padded.
        settings: sampling settings.
        tokenizer: gives ``pad_token_id`` / ``eos_token_id``.

    Returns:
        :class:`SampledResponses`; every tensor ``(batch, response_len)``, normal (not
        inference-mode) tensors.
    """
    sampled = _sample(actor.base_model, input_ids, attention_mask, settings, tokenizer, statistics=True,
                      value_head=actor.value_head)
    assert sampled is not None
    return sampled


def fused_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings,
                   tokenizer) -> torch.Tensor | None:
    """Tokens only, through the fused T5 decoder; ``None`` when ``model`` cannot take that path
    (then use ``model.generate``). Draws what ``model.generate`` draws for the same RNG state.

    Returns:
        responses ``(batch, response_len)`` without the decoder start token, pad after EOS.
    """
    sampled = _sample(model, input_ids, attention_mask, settings, tokenizer, statistics=False, fused_only=True)
    return None if sampled is None else sampled.responses


@torch.no_grad()
def _sample(model, input_ids, attention_mask, settings: GenerationSettings, tokenizer, statistics: bool,
            value_head=None, fused_only: bool = False) -> SampledResponses | None:
    """The sampling loop behind :func:`sample_with_statistics` and :func:`fused_generate`.

    With ``statistics`` the log-probs and entropies are measured on the way, and the values
    too when there is a ``value_head`` (zeros without one); without ``statistics`` only tokens
    are drawn (the other fields hold empty tensors). ``fused_only``: return ``None`` instead of
    stepping through the model's own ``forward``.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = _decoder_start_token_id(model, tokenizer)
    batch, max_new = input_ids.shape[0], int(settings.max_new_tokens)
    if max_new < 1:
        raise ValueError(f"generation.max_new_tokens must be >= 1, got {max_new}")
    if settings.needs_hf_generate:  # beam search, penalties: not draws this loop makes
        if fused_only:
            return None
        raise ValueError("beam search, repetition_penalty and no_repeat_ngram_size decode through transformers' "
                         "generate, not the sampler (flan_rlhf.settings.GenerationSettings.needs_hf_generate)")
    if fused_only and not is_fused_t5(model):
        return None
    encoder_hidden, stepper = prepare_sampling(model, input_ids, attention_mask, max_new)
    if stepper is None:
        if fused_only:
            return None
        from transformers.modeling_outputs import BaseModelOutput

        stepper = _CachedForwardStepper(model, BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask)
    choose = _token_chooser(settings)
    temperature, min_new = float(settings.temperature), int(settings.min_new_tokens or 0)
    device = input_ids.device
    tokens = torch.full((batch,), start, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    out_tokens, out_logprobs, out_values, out_entropy = [], [], [], []
    for step in range(max_new):
        hidden, logits = stepper.step(tokens, step)
        # one distribution for the draw and for its statistics
        scaled = sampling_logits(logits.float()[:, None], temperature, min_new, eos, first_position=step)[:, 0]
        tokens = choose(scaled)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        out_tokens.append(tokens)
        if statistics:
            # the formula of ppo.logprobs_from_logits: label logit - logsumexp
            out_logprobs.append(scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1))
            out_entropy.append(entropy_from_logits(scaled))
            if value_head is not None:
                out_values.append(value_head(hidden.to(value_head.weight.dtype)).squeeze(-1).float())
        if eos is not None:
            unfinished &= tokens != eos
            if not bool(unfinished.any()):
                break
    responses = torch.stack(out_tokens, dim=1)
    if not statistics:
        empty = responses.new_zeros((batch, 0), dtype=torch.float32)
        return SampledResponses(responses=responses, logprobs=empty, values=empty, entropy=empty)
    logprobs = torch.stack(out_logprobs, dim=1)
    return SampledResponses(
        responses=responses,
        logprobs=logprobs,
        values=torch.stack(out_values, dim=1) if out_values else torch.zeros_like(logprobs),
        entropy=torch.stack(out_entropy, dim=1),
    )


# ------------------------------------------------------------------------- teacher-forced passes


@torch.no_grad()
def reference_logprobs(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Log-probs of ``responses`` under the frozen reference, from :func:`sampling_logits`,
    shape ``(batch, response_len)``."""
    logits = actor.reference_logits(input_ids, attention_mask, shift_right(responses, decoder_start_token_id))
    return logprobs_from_logits(sampling_logits(logits, temperature, min_new_tokens, eos_token_id), responses)


@torch.no_grad()
def evaluate_responses(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
    with_reference: bool = True,
    min_new_tokens: int = 0,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs, values, reference log-probs and entropy of given responses (no gradients).

    Log-probs come from :func:`sampling_logits`, the distribution the sampler draws from when no
    evaluation-only processor (top-k/top-p, beams, penalties) is on. (A sampled rollout gets the
    policy's numbers from :func:`collect_experience` without this second forward.)

    Returns:
        logprobs, values (zeros without a value head), ref_logprobs (or ``None``), entropy: each
        ``(batch, response_len)``.
    """
    decoder_input_ids = shift_right(responses, decoder_start_token_id)
    logits, values = actor(input_ids, attention_mask, decoder_input_ids)
    logits = sampling_logits(logits, temperature, min_new_tokens, eos_token_id)
    if values is None:
        values = logits.new_zeros(responses.shape)
    ref = None
    if with_reference:
        ref = reference_logprobs(actor, input_ids, attention_mask, responses, decoder_start_token_id, temperature,
                                 min_new_tokens, eos_token_id)
    return logprobs_from_logits(logits, responses), values, ref, entropy_from_logits(logits)


@torch.no_grad()
def collect_experience(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    tokenizer,
    decoder_start_token_id: int,
    with_reference: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Decode responses and get everything PPO (and the evaluation metrics) need about them.

    Sampling settings: log-probs, values and entropy come from the sampling pass itself
    (:func:`sample_with_statistics`); only the reference needs a teacher-forced forward.
    Settings only transformers' ``generate`` decodes (beam search, repetition penalty, n-gram
    blocking: evaluation only, :attr:`GenerationSettings.needs_hf_generate`): the policy
    ``generate``\ s, then :func:`evaluate_responses` scores the responses teacher-forced. The
    log-probs are then those of the model's softmax, not of the decoding (which is not a
    distribution one draws from), so the KL of such responses is their log-ratio to the reference.

    Returns:
        responses, logprobs, values, ref_logprobs (or ``None``), entropy: each
        ``(batch, response_len)``.
    """
    eos = tokenizer.eos_token_id
    if settings.needs_hf_generate:
        model = actor.base_model
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=eos, decoder_start_token_id=decoder_start_token_id,
                             **settings.generate_kwargs())
        responses = out[:, 1:]  # without the decoder start token; pad after EOS
        logprobs, values, ref, entropy = evaluate_responses(
            actor, input_ids, attention_mask, responses, decoder_start_token_id, settings.temperature, with_reference,
            settings.min_new_tokens, eos)
        return responses, logprobs, values, ref, entropy
    sampled = sample_with_statistics(actor, input_ids, attention_mask, settings, tokenizer)
    ref = None
    if with_reference:
        ref = reference_logprobs(actor, input_ids, attention_mask, sampled.responses, decoder_start_token_id,
                                 settings.temperature, settings.min_new_tokens, eos)
    return sampled.responses, sampled.logprobs, sampled.values, ref, sampled.entropy
