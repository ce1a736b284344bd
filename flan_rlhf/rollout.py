"""Rollout helpers: tokenise prompts, sample responses, and evaluate them under policy and reference.

All functions are model-agnostic over Hugging Face encoder-decoders and hold no Lightning state.

Speed (see ``benchmarks/RESULTS.md``): :func:`sample_with_statistics` samples with a
hand-written loop over the decoder and a preallocated KV cache, and returns the log-probs,
values and entropies of the sampled tokens from the same pass, so a rollout needs no second
teacher-forced forward of the policy (the first PPO ratio is still 1 up to float rounding,
checked in ``tests/test_rollout_fast.py``). T5-family models take a fast path that calls the
model's own submodules (LoRA layers included) step by step; other encoder-decoders step
through the model's ``forward`` with its KV cache. No-grad forwards over a batch
(:func:`evaluate_responses`, :func:`reference_logprobs`) run in prompt-length buckets so the
encoder does not compute padding.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from flan_rlhf.policy import ActorCritic
from flan_rlhf.ppo import entropy_from_logits, logprobs_from_logits
from flan_rlhf.settings import GenerationSettings

#: Rows per no-grad forward in :func:`evaluate_responses` / :func:`reference_logprobs`; rows are
#: sorted by prompt length first, so each chunk is padded only to its own longest prompt.
EVAL_CHUNK_SIZE = 8


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


@dataclass
class SampledResponses:
    """Responses and what the sampling pass measured on them.

    Attributes:
        responses: sampled tokens without the decoder start token, pad after EOS,
            shape ``(batch, response_len)``; ``response_len <= max_new_tokens`` (shorter when
            every row emitted EOS early).
        logprobs: ``log_softmax(logits / temperature)`` of each sampled token, with no
            top-k/top-p/min-length warping (the distribution PPO optimises), ``(batch, response_len)``.
        values: value-head output on the decoder's last hidden state, ``(batch, response_len)``.
        entropy: entropy of ``softmax(logits / temperature)``, ``(batch, response_len)``.
    """

    responses: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor


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


# ------------------------------------------------------------------------------------ sampling


def _decoder_start_token_id(model, tokenizer) -> int:
    start = getattr(model.config, "decoder_start_token_id", None)
    return tokenizer.pad_token_id if start is None else int(start)


def _token_chooser(settings: GenerationSettings, eos_token_id: int | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``choose(logits, step) -> tokens``: Hugging Face ``generate``'s token selection.

    Same order and semantics as ``GenerationMixin._sample``: the min-new-tokens processor
    (EOS logit to ``-inf`` before ``min_new_tokens``), then the temperature, top-k and top-p
    warpers (only those that change anything), then ``multinomial(softmax(scores))`` or
    ``argmax``. With the same RNG state and the same logits it draws the same tokens.

    ``logits``: float32, shape ``(batch, vocab)``; returns ``(batch,)`` int64.
    """
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    warpers: list = []
    if settings.do_sample:
        if settings.top_k is not None and settings.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=int(settings.top_k)))
        if settings.top_p is not None and settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=float(settings.top_p)))
    temperature = float(settings.temperature)
    min_new = int(settings.min_new_tokens or 0)

    def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
        scores = logits
        if step < min_new and eos_token_id is not None:
            scores = scores.clone()
            scores[:, eos_token_id] = -math.inf
        if not settings.do_sample:
            return scores.argmax(dim=-1)
        if temperature != 1.0:
            scores = scores / temperature
        for warper in warpers:
            scores = warper(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return choose


def _has_active_dropout(module: torch.nn.Module) -> bool:
    return module.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def _t5_fast_path_ok(model) -> bool:
    """True for T5-family models whose decoder the hand-written step below reproduces exactly:
    one shared relative position bias (block 0), self-attention, cross-attention, feed-forward."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("t5", "mt5") or not hasattr(model, "lm_head"):
        return False
    decoder = getattr(model, "decoder", None)
    blocks = getattr(decoder, "block", None)
    if blocks is None or len(blocks) == 0 or _has_active_dropout(model):
        return False
    for i, block in enumerate(blocks):
        if len(block.layer) != 3 or not hasattr(block.layer[0], "SelfAttention") or not hasattr(block.layer[1], "EncDecAttention"):
            return False
        if block.layer[0].SelfAttention.has_relative_attention_bias != (i == 0):
            return False
    return True


def _scales_decoder_output(config) -> bool:
    """Whether T5 multiplies the decoder output by ``d_model**-0.5`` before ``lm_head``.

    transformers >= 5 stores it as ``scale_decoder_outputs``; before, it was tied embeddings.
    """
    scale = getattr(config, "scale_decoder_outputs", None)
    return bool(config.tie_word_embeddings) if scale is None else bool(scale)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5 attention of one query position: ``softmax(q k^T + bias) v`` (no ``1/sqrt(d)``).

    Shapes: query ``(batch, heads, 1, head_dim)``, keys/values ``(batch, heads, len, head_dim)``,
    bias broadcastable to ``(batch, heads, 1, len)``. Plain matmuls: for a single query the
    fused CPU attention kernel costs several times more (measured in ``benchmarks/RESULTS.md``).
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)) + bias
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)


class _T5Stepper:
    """One decoder step of a T5 model with a preallocated KV cache.

    Calls the model's own modules (layer norms, ``q/k/v/o`` projections with any LoRA
    adapters, feed-forward blocks, ``lm_head``) and only re-implements the attention glue,
    as ``T5Attention`` does it: no query scaling, one relative position bias computed by
    block 0 and shared by every layer, softmax over keys. Cross-attention keys and values are
    computed once per rollout.

    Args:
        model: a ``T5ForConditionalGeneration`` (LoRA layers allowed).
        encoder_hidden: encoder output, ``(batch, prompt_len, d_model)``.
        attention_mask: prompt mask, ``(batch, prompt_len)``.
        max_len: decoder positions to allocate.
    """

    def __init__(self, model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor, max_len: int):
        decoder = model.decoder
        self.model = model
        self.blocks = list(decoder.block)
        self.embed = decoder.embed_tokens
        self.final_norm = decoder.final_layer_norm
        first = self.blocks[0].layer[0].SelfAttention
        self.heads, self.head_dim = first.n_heads, first.key_value_proj_dim
        batch = encoder_hidden.shape[0]
        dtype, device = encoder_hidden.dtype, encoder_hidden.device
        # (1, heads, max_len, max_len): row t is the bias of query position t over keys 0..max_len-1
        self.position_bias = first.compute_bias(max_len, max_len, device=device).to(dtype)
        shape = (len(self.blocks), batch, self.heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.cross = []
        for block in self.blocks:
            attention = block.layer[1].EncDecAttention
            self.cross.append((self._heads(attention.k(encoder_hidden)), self._heads(attention.v(encoder_hidden))))
        # additive mask over prompt positions, (batch, 1, 1, prompt_len)
        self.cross_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
            attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        self.scale_output = _scales_decoder_output(model.config)
        self.d_model = model.config.d_model

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, len, heads*head_dim)`` -> ``(batch, heads, len, head_dim)``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, heads, len, head_dim)`` -> ``(batch, len, heads*head_dim)``."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.heads * self.head_dim)

    def step(self, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` ``(batch,)`` at decoder ``position``.

        Returns:
            hidden: decoder output after the final layer norm, ``(batch, d_model)``.
            logits: ``(batch, vocab)``.
        """
        hidden = self.embed(tokens[:, None])
        end = position + 1
        bias = self.position_bias[:, :, position:end, :end]
        for i, block in enumerate(self.blocks):
            self_layer, cross_layer, ff_layer = block.layer
            attention = self_layer.SelfAttention
            normed = self_layer.layer_norm(hidden)
            self.keys[i, :, :, position] = self._heads(attention.k(normed))[:, :, 0]
            self.values[i, :, :, position] = self._heads(attention.v(normed))[:, :, 0]
            out = _attend(self._heads(attention.q(normed)), self.keys[i, :, :, :end], self.values[i, :, :, :end], bias)
            hidden = hidden + attention.o(self._merge(out))
            attention = cross_layer.EncDecAttention
            normed = cross_layer.layer_norm(hidden)
            keys, values = self.cross[i]
            out = _attend(self._heads(attention.q(normed)), keys, values, self.cross_mask)
            hidden = hidden + attention.o(self._merge(out))
            hidden = ff_layer(hidden)
        hidden = self.final_norm(hidden)[:, 0]
        head_input = hidden * (self.d_model ** -0.5) if self.scale_output else hidden
        return hidden, self.model.lm_head(head_input)


class _CachedForwardStepper:
    """One decoder step through the model's own ``forward`` and its KV cache (any encoder-decoder)."""

    def __init__(self, model, encoder_outputs, attention_mask: torch.Tensor):
        self.model = model
        self.encoder_outputs = encoder_outputs
        self.attention_mask = attention_mask
        self.cache = None
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.history: list[torch.Tensor] = []

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
    model = actor.base_model
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    start = _decoder_start_token_id(model, tokenizer)
    batch, max_new = input_ids.shape[0], int(settings.max_new_tokens)
    if max_new < 1:
        raise ValueError(f"generation.max_new_tokens must be >= 1, got {max_new}")
    encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    if _t5_fast_path_ok(model):
        stepper = _T5Stepper(model, encoder_outputs.last_hidden_state, attention_mask, max_new)
    else:
        stepper = _CachedForwardStepper(model, encoder_outputs, attention_mask)
    choose = _token_chooser(settings, eos)
    temperature = float(settings.temperature)
    device = input_ids.device
    tokens = torch.full((batch,), start, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    out_tokens, out_logprobs, out_values, out_entropy = [], [], [], []
    for step in range(max_new):
        hidden, logits = stepper.step(tokens, step)
        logits = logits.float()
        tokens = choose(logits, step)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
        scaled = logits / temperature
        # the formula of ppo.logprobs_from_logits: label logit - logsumexp
        out_tokens.append(tokens)
        out_logprobs.append(scaled.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1))
        out_entropy.append(entropy_from_logits(scaled))
        out_values.append(actor.value_head(hidden.to(actor.value_head.weight.dtype)).squeeze(-1).float())
        if eos is not None:
            unfinished &= tokens != eos
            if not bool(unfinished.any()):
                break
    return SampledResponses(
        responses=torch.stack(out_tokens, dim=1),
        logprobs=torch.stack(out_logprobs, dim=1),
        values=torch.stack(out_values, dim=1),
        entropy=torch.stack(out_entropy, dim=1),
    )


def sample_responses(
    actor: ActorCritic, input_ids: torch.Tensor, attention_mask: torch.Tensor, settings: GenerationSettings, tokenizer
) -> torch.Tensor:
    """Sample responses with the KV cache (see :func:`sample_with_statistics`).

    Returns:
        responses: shape ``(batch, response_len)`` without the decoder start token; tokens after
        EOS are the pad token.
    """
    return sample_with_statistics(actor, input_ids, attention_mask, settings, tokenizer).responses


# ------------------------------------------------------------------------- teacher-forced passes


def _length_buckets(attention_mask: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Row indices sorted by prompt length, in chunks of ``chunk_size`` (shortest first)."""
    order = torch.argsort(attention_mask.sum(dim=1), stable=True)
    return list(order.split(max(1, int(chunk_size))))


def _bucketed(
    forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], list[torch.Tensor]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    n_outputs: int,
    chunk_size: int,
) -> list[torch.Tensor]:
    """Run ``forward(input_ids, attention_mask, decoder_input_ids, responses) -> [(rows, len)...]``
    on prompt-length buckets, each trimmed to its own longest prompt, and reassemble the
    ``n_outputs`` per-token results in the original row order, each ``(batch, response_len)``."""
    decoder_input_ids = shift_right(responses, decoder_start_token_id)
    outputs = [torch.zeros(responses.shape, dtype=torch.float32, device=responses.device) for _ in range(n_outputs)]
    for rows in _length_buckets(attention_mask, chunk_size):
        rows = rows.to(input_ids.device)
        prompt_len = max(1, int(attention_mask[rows].sum(dim=1).max()))
        results = forward(input_ids[rows, :prompt_len], attention_mask[rows, :prompt_len],
                          decoder_input_ids[rows], responses[rows])
        for out, result in zip(outputs, results):
            out[rows] = result.float()
    return outputs


@torch.no_grad()
def reference_logprobs(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
    chunk_size: int = EVAL_CHUNK_SIZE,
) -> torch.Tensor:
    """Log-probs of ``responses`` under the frozen reference, ``(batch, response_len)``.

    Computed from ``logits / temperature`` in prompt-length buckets of ``chunk_size`` rows.
    """
    def forward(ids, mask, decoder_ids, labels):
        logits = actor.reference_logits(ids, mask, decoder_ids) / temperature
        return [logprobs_from_logits(logits, labels)]

    return _bucketed(forward, input_ids, attention_mask, responses, decoder_start_token_id, 1, chunk_size)[0]


@torch.no_grad()
def evaluate_responses(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
    with_reference: bool = True,
    chunk_size: int = EVAL_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-probs, values, reference log-probs and entropy of given responses (no gradients).

    Log-probs come from ``logits / temperature`` with no top-k/top-p warping, the same
    distribution the sampler drew from when those are disabled. Rows run in prompt-length
    buckets of ``chunk_size``.

    Returns:
        logprobs, values, ref_logprobs (or ``None``), entropy: each ``(batch, response_len)``.
    """
    def forward(ids, mask, decoder_ids, labels):
        logits, values = actor(ids, mask, decoder_ids)
        logits = logits / temperature
        return [logprobs_from_logits(logits, labels), values, entropy_from_logits(logits)]

    logprobs, values, entropy = _bucketed(forward, input_ids, attention_mask, responses, decoder_start_token_id, 3, chunk_size)
    ref = None
    if with_reference:
        ref = reference_logprobs(actor, input_ids, attention_mask, responses, decoder_start_token_id, temperature, chunk_size)
    return logprobs, values, ref, entropy


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
    """Sample responses and get everything PPO needs about them with one reference forward.

    Log-probs, values and entropy come from the sampling pass itself
    (:func:`sample_with_statistics`); only the reference needs a teacher-forced forward.

    Returns:
        responses, logprobs, values, ref_logprobs (or ``None``), entropy: each
        ``(batch, response_len)``.
    """
    sampled = sample_with_statistics(actor, input_ids, attention_mask, settings, tokenizer)
    ref = None
    if with_reference:
        ref = reference_logprobs(actor, input_ids, attention_mask, sampled.responses, decoder_start_token_id,
                                 settings.temperature)
    return sampled.responses, sampled.logprobs, sampled.values, ref, sampled.entropy
