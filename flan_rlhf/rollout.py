"""Rollout helpers: tokenise prompts, sample responses, and evaluate them under policy and reference.

All functions are model-agnostic over Hugging Face encoder-decoders and hold no Lightning state.

Speed (see ``benchmarks/RESULTS.md``): :func:`sample_with_statistics` samples with a
hand-written loop over the decoder and a preallocated KV cache, and returns the log-probs,
values and entropies of the sampled tokens from the same pass, so a rollout needs no second
teacher-forced forward of the policy (the first PPO ratio is still 1 up to float rounding,
checked in ``tests/test_rollout_fast.py``). T5-family models take a fast path
(:class:`_FusedT5Stepper`) that folds LoRA into the weights once per rollout and runs each
decoder step as a few fused tensor ops; other encoder-decoders step through the model's
``forward`` with its KV cache. :func:`encode_prompts` runs T5's encoder on the real prompt
tokens only (no padding), for sampling, the reference forward and (with grad) training.
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


def _is_t5(model) -> bool:
    """A T5-family stack the code below reproduces: one relative position bias (block 0) shared
    by all layers, then self-attention, (decoder: cross-attention,) feed-forward; no active dropout."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("t5", "mt5") or _has_active_dropout(model):
        return False
    for stack, n_sublayers in ((getattr(model, "encoder", None), 2), (getattr(model, "decoder", None), 3)):
        blocks = getattr(stack, "block", None)
        if not blocks:
            return False
        for i, block in enumerate(blocks):
            if len(block.layer) != n_sublayers or not hasattr(block.layer[0], "SelfAttention"):
                return False
            if block.layer[0].SelfAttention.has_relative_attention_bias != (i == 0):
                return False
    return True


def _effective_weight(linear: torch.nn.Module) -> torch.Tensor | None:
    """The weight ``W`` with ``linear(x) == x @ W.T`` for a bias-free ``nn.Linear`` or a peft
    LoRA ``Linear`` over one (active adapters folded in: ``W + scaling * B @ A``, as peft's
    ``merge`` computes it); ``None`` for anything else (biases, DoRA, quantised layers)."""
    if type(linear) is torch.nn.Linear:
        return linear.weight if linear.bias is None else None
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(linear, LoraLinear):
        return None
    base = linear.get_base_layer()
    if type(base) is not torch.nn.Linear or base.bias is not None:
        return None
    if linear.merged:
        return None if linear.disable_adapters else base.weight
    weight = base.weight
    if linear.disable_adapters:
        return weight
    for adapter in linear.active_adapters:
        if adapter not in linear.lora_A.keys():
            continue
        if adapter in getattr(linear, "lora_variant", {}) or getattr(linear, "lora_bias", {}).get(adapter, False):
            return None
        weight = weight + linear.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _scales_decoder_output(config) -> bool:
    """Whether T5 multiplies the decoder output by ``d_model**-0.5`` before ``lm_head``.

    transformers >= 5 stores it as ``scale_decoder_outputs``; before, it was tied embeddings.
    """
    scale = getattr(config, "scale_decoder_outputs", None)
    return bool(config.tie_word_embeddings) if scale is None else bool(scale)


def _rms_norm(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """T5LayerNorm (RMS norm, no mean, no bias) as one ``F.rms_norm`` call (torch >= 2.4)."""
    weight, eps = norm.weight, norm.variance_epsilon
    if not hasattr(F, "rms_norm"):  # pragma: no cover - older torch
        return lambda x: weight * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(weight.dtype)
    return lambda x: F.rms_norm(x, (x.shape[-1],), weight, eps)


def _activation(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feed-forward activation; HF's Python ``gelu_new`` becomes the equal fused tanh GELU."""
    from transformers.activations import NewGELUActivation

    if isinstance(module, NewGELUActivation):
        return lambda x: F.gelu(x, approximate="tanh")
    return module


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5 attention: ``softmax(q k^T + bias) v`` (no ``1/sqrt(d)``).

    Shapes: query ``(batch, heads, q_len, head_dim)``, keys/values ``(batch, heads, len, head_dim)``,
    bias broadcastable to ``(batch, heads, q_len, len)``. Plain matmuls: for one query the fused
    CPU attention kernel costs several times more (measured in ``benchmarks/RESULTS.md``).
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)) + bias
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)


def encode_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Encoder output without computing padding, ``(batch, prompt_len, d_model)``; autograd-safe.

    For T5-family models the position-wise layers (norms, projections, feed-forward; LoRA
    adapters included) run on the packed real tokens only, and only attention sees the
    padded layout, as in BERT "unpadding". Rows at padded positions are zero (HF fills them with
    values no real position attends to). Other models run their own encoder.
    """
    if not _is_t5(model):
        return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    encoder = model.get_encoder()
    batch, length = input_ids.shape
    real = attention_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
    hidden = encoder.embed_tokens(input_ids.reshape(-1).index_select(0, real))  # (tokens, d_model)
    first = encoder.block[0].layer[0].SelfAttention
    heads, head_dim = first.n_heads, first.key_value_proj_dim
    bias = first.compute_bias(length, length, device=input_ids.device).to(hidden.dtype)
    bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(hidden.dtype).min)

    def padded_heads(x: torch.Tensor) -> torch.Tensor:  # (tokens, h*d) -> (batch, heads, length, head_dim)
        full = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, real, x)
        return full.view(batch, length, heads, head_dim).transpose(1, 2)

    for block in encoder.block:
        attention_layer, ff_layer = block.layer
        attention = attention_layer.SelfAttention
        normed = attention_layer.layer_norm(hidden)
        out = _attend(padded_heads(attention.q(normed)), padded_heads(attention.k(normed)),
                      padded_heads(attention.v(normed)), bias)
        out = out.transpose(1, 2).reshape(batch * length, heads * head_dim).index_select(0, real)
        hidden = hidden + attention.o(out)
        hidden = ff_layer(hidden)
    hidden = encoder.final_layer_norm(hidden)
    return hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, real, hidden).view(batch, length, -1)


class _FusedT5Stepper:
    """One decoder step of a T5 model with a preallocated KV cache and fused weights.

    At the start of a rollout each projection's effective weight is read once (LoRA folded
    in, as peft's ``merge`` would), q/k/v of self-attention and the two gated feed-forward
    inputs are concatenated, and cross-attention keys/values are computed; each step is then
    about 20 tensor ops per layer. The arithmetic is T5's: RMS norms, no query scaling, one
    relative position bias from block 0 shared by all layers, pre-norm residual blocks.
    Build with :meth:`create`, which returns ``None`` for layers it cannot fold.

    Args:
        model: a ``T5ForConditionalGeneration`` (LoRA layers allowed).
        encoder_hidden: encoder output, ``(batch, prompt_len, d_model)``.
        attention_mask: prompt mask, ``(batch, prompt_len)``.
        max_len: decoder positions to allocate.
    """

    @classmethod
    def create(cls, model, encoder_hidden, attention_mask, max_len):
        if not _is_t5(model):
            return None
        try:
            return cls(model, encoder_hidden, attention_mask, max_len)
        except _Unsupported:
            return None

    def __init__(self, model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor, max_len: int):
        decoder = model.decoder
        first = decoder.block[0].layer[0].SelfAttention
        self.heads, self.head_dim = first.n_heads, first.key_value_proj_dim
        self.inner = self.heads * self.head_dim
        batch, dtype, device = encoder_hidden.shape[0], encoder_hidden.dtype, encoder_hidden.device
        self.layers = []
        self.cross = []
        for block in decoder.block:
            self_layer, cross_layer, ff_layer = block.layer
            sa, ca, dense = self_layer.SelfAttention, cross_layer.EncDecAttention, ff_layer.DenseReluDense
            gated = hasattr(dense, "wi_0")
            w_in = torch.cat([_weight(dense.wi_0), _weight(dense.wi_1)]) if gated else _weight(dense.wi)
            self.layers.append({
                "norm1": _rms_norm(self_layer.layer_norm),
                "qkv": torch.cat([_weight(sa.q), _weight(sa.k), _weight(sa.v)]),
                "o": _weight(sa.o),
                "norm2": _rms_norm(cross_layer.layer_norm),
                "cross_q": _weight(ca.q),
                "cross_o": _weight(ca.o),
                "norm3": _rms_norm(ff_layer.layer_norm),
                "w_in": w_in, "gated": gated, "act": _activation(dense.act), "w_out": _weight(dense.wo),
            })
            # (batch, heads, prompt_len, head_dim), contiguous so no step copies them
            self.cross.append((self._heads(F.linear(encoder_hidden, _weight(ca.k))).contiguous(),
                               self._heads(F.linear(encoder_hidden, _weight(ca.v))).contiguous()))
        self.embedding = decoder.embed_tokens.weight
        self.final_norm = _rms_norm(decoder.final_layer_norm)
        self.lm_head = _weight(model.lm_head)
        self.output_scale = model.config.d_model ** -0.5 if _scales_decoder_output(model.config) else None
        # (1, heads, max_len, max_len): row t is the bias of query position t over keys 0..max_len-1
        self.position_bias = first.compute_bias(max_len, max_len, device=device).to(dtype)
        shape = (len(self.layers), batch, self.heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # additive mask over prompt positions, (batch, 1, 1, prompt_len)
        self.cross_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
            attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, len, heads*head_dim)`` -> ``(batch, heads, len, head_dim)``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def step(self, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` ``(batch,)`` at decoder ``position``.

        Returns:
            hidden: decoder output after the final layer norm, ``(batch, d_model)``.
            logits: ``(batch, vocab)``.
        """
        batch = tokens.shape[0]
        end = position + 1
        bias = self.position_bias[:, :, position:end, :end]
        hidden = F.embedding(tokens, self.embedding)  # (batch, d_model)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(layer["norm1"](hidden), layer["qkv"]).view(batch, 3, self.heads, 1, self.head_dim)
            self.keys[i, :, :, position] = qkv[:, 1, :, 0]
            self.values[i, :, :, position] = qkv[:, 2, :, 0]
            out = _attend(qkv[:, 0], self.keys[i, :, :, :end], self.values[i, :, :, :end], bias)
            hidden = hidden + F.linear(out.reshape(batch, self.inner), layer["o"])
            query = F.linear(layer["norm2"](hidden), layer["cross_q"]).view(batch, self.heads, 1, self.head_dim)
            out = _attend(query, *self.cross[i], self.cross_mask)
            hidden = hidden + F.linear(out.reshape(batch, self.inner), layer["cross_o"])
            inner = F.linear(layer["norm3"](hidden), layer["w_in"])
            if layer["gated"]:
                gate, linear = inner.chunk(2, dim=-1)
                inner = layer["act"](gate) * linear
            else:
                inner = layer["act"](inner)
            hidden = hidden + F.linear(inner, layer["w_out"])
        hidden = self.final_norm(hidden)
        head_input = hidden * self.output_scale if self.output_scale is not None else hidden
        return hidden, F.linear(head_input, self.lm_head)


class _Unsupported(Exception):
    """A layer :class:`_FusedT5Stepper` cannot fold into one weight."""


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    weight = _effective_weight(linear)
    if weight is None:
        raise _Unsupported(type(linear).__name__)
    return weight


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
    encoder_hidden = encode_prompts(model, input_ids, attention_mask)
    stepper = _FusedT5Stepper.create(model, encoder_hidden, attention_mask, max_new)
    if stepper is None:
        from transformers.modeling_outputs import BaseModelOutput

        stepper = _CachedForwardStepper(model, BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask)
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


def _reference_logits(actor: ActorCritic, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """``ActorCritic.reference_logits`` with the padding-free encoder, ``(batch, len, vocab)`` float32."""
    model = actor.frozen_reference if actor.frozen_reference is not None else actor.base_model
    with actor.reference_context():
        encoder_hidden = encode_prompts(model, input_ids, attention_mask)
        out = model(encoder_outputs=(encoder_hidden,), attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True)
    return out.logits.float()


@torch.no_grad()
def reference_logprobs(
    actor: ActorCritic,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    responses: torch.Tensor,
    decoder_start_token_id: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probs of ``responses`` under the frozen reference, from ``logits / temperature``,
    shape ``(batch, response_len)``."""
    logits = _reference_logits(actor, input_ids, attention_mask, shift_right(responses, decoder_start_token_id))
    return logprobs_from_logits(logits / temperature, responses)


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
    distribution the sampler drew from when those are disabled. (A rollout gets the policy's
    numbers from :func:`collect_experience` without this second forward.)

    Returns:
        logprobs, values, ref_logprobs (or ``None``), entropy: each ``(batch, response_len)``.
    """
    decoder_input_ids = shift_right(responses, decoder_start_token_id)
    encoder_hidden = encode_prompts(actor.base_model, input_ids, attention_mask)
    logits, values = actor(input_ids, attention_mask, decoder_input_ids, encoder_outputs=(encoder_hidden,))
    logits = logits / temperature
    ref = None
    if with_reference:
        ref = reference_logprobs(actor, input_ids, attention_mask, responses, decoder_start_token_id, temperature)
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
