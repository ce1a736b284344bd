"""Hand-fused T5 compute: the same arithmetic as Hugging Face's ``T5ForConditionalGeneration``
in far fewer tensor ops, for the two hot paths of PPO on small and medium models.

* :func:`encode_prompts` - the encoder on the real prompt tokens only (no padding);
* :class:`FusedT5Stepper` - one decoder step with a preallocated KV cache (sampling);
* :func:`fused_forward` - a whole teacher-forced decoder pass (old/new log-probs,
  values, reference), autograd-safe, used by every PPO minibatch; :func:`fused_decode` the
  decoder part alone, on an encoder output several responses share (DPO's pairs).

Why (measured with ``benchmarks/profile_ppo.py`` on the benchmark's 4+4-layer d_model-256 T5):
a decoding step through Hugging Face's ``forward`` is dominated by Python and small-op dispatch
(a 32-prompt, 32-token rollout: 0.56 s in TRL's ``generate``, 0.33 s here with statistics); a teacher-forced
minibatch forward+backward gains less (~7%), mostly from keeping LoRA factored under gradient.
Projections are :class:`_Projection` calls: q/k/v (and the gated feed-forward inputs, and the
cross-attention keys/values) as one matmul; LoRA merged into the weight as peft's ``merge``
computes it when there is no gradient, factored when there is; RMS norm and GELU as fused kernels.

Scope: T5-family stacks (T5 v1.0/v1.1, FLAN-T5, mT5) without active dropout, with plain or
LoRA ``Linear`` layers and ordinary (not sharded) float32/bfloat16 parameters. Anything else
(dropout in training, DoRA, quantised layers, float16, FSDP/DeepSpeed-ZeRO-3 sharded weights, or
:func:`set_fused_kernels` off) fails :func:`is_fused_t5`, and the callers run the model's own
``forward``.
The equality with Hugging Face (values and gradients) is tested in ``tests/test_t5_fused.py``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


# Private or undocumented APIs (pinned by tests/test_private_apis.py; values by tests/test_t5_fused.py):
# - transformers' T5 module layout: ``T5Block.layer[i]`` with ``SelfAttention`` / ``EncDecAttention``
#   (``q k v o``, ``n_heads``, ``key_value_proj_dim``, ``has_relative_attention_bias``,
#   ``compute_bias(query_length, key_length, device=)``), ``DenseReluDense`` (``wi``/``wi_0``/``wi_1``,
#   ``wo``, ``act``), ``T5LayerNorm.variance_epsilon``. :func:`is_fused_t5` checks the layout and
#   falls back to the model's own ``forward`` when it differs.
# - peft's LoRA ``Linear`` (``peft.tuners.lora.layer``): ``get_base_layer()``, ``merged``,
#   ``disable_adapters``, ``fan_in_fan_out``, ``active_adapters``, ``lora_A``/``lora_B`` (ModuleDicts
#   by adapter), ``scaling``, ``lora_variant``, ``lora_bias`` - read by :func:`_linear_parts`.

_SWITCH = "_flan_rlhf_fused_kernels"


def set_fused_kernels(model: torch.nn.Module, enabled: bool) -> None:
    """Allow (default) or forbid the fused paths for ``model``; forbidden, callers use its ``forward``.

    The PPO module forbids them under strategies that shard weights (FSDP, DeepSpeed), where a
    weight read outside the wrapped ``forward`` is a shard, not the weight.
    """
    setattr(model, _SWITCH, bool(enabled))


def _has_active_dropout(module: torch.nn.Module) -> bool:
    return module.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def _plain_parameters(model: torch.nn.Module) -> bool:
    """Whether every weight is an ordinary local float32/bfloat16 tensor that can be read outside
    ``forward``.

    False under FSDP (wrapper modules, flattened or empty shards, DTensors), DeepSpeed ZeRO-3
    (partitioned parameters carry ``ds_id`` and are empty outside the engine's hooks), for
    float16, where HF's T5 clamps activations against overflow and the fused ops do not, and for
    bitsandbytes' quantised weights (QLoRA, ``PolicySpec.quantization``): ``Params4bit`` (packed
    ``uint8``, or the float ``bnb_4bit_quant_storage`` dtype) and ``Int8Params`` (``int8``) hold
    codes that only their layer's ``forward`` dequantises.
    """
    for module in model.modules():
        if "FullyShardedDataParallel" in type(module).__name__ or "FSDP" in type(module).__name__:
            return False
    for param in model.parameters():
        if (param.numel() == 0 or hasattr(param, "ds_id") or hasattr(param, "_local_tensor")
                or param.dtype == torch.float16 or not param.is_floating_point()
                or type(param).__module__.startswith("bitsandbytes")):
            return False
    return True


def is_fused_t5(model) -> bool:
    """A T5-family stack the code below reproduces: one relative position bias (block 0) shared
    by all layers, then self-attention, (decoder: cross-attention,) feed-forward; no active dropout."""
    config = getattr(model, "config", None)
    if not getattr(model, _SWITCH, True):
        return False
    if getattr(config, "model_type", None) not in ("t5", "mt5") or _has_active_dropout(model):
        return False
    if not _plain_parameters(model):
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


def _linear_parts(linear: torch.nn.Module) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """``(W, [(A, s*B), ...])`` with ``linear(x) == x @ W.T + sum(x @ A.T @ (s*B).T)``.

    For a bias-free ``nn.Linear`` the list is empty; for a peft LoRA ``Linear`` over one it holds
    each active adapter's ``lora_A`` ``(r, in)`` and scaled ``lora_B`` ``(out, r)``. ``None`` for
    anything else (biases, DoRA and other variants, fan-in-fan-out, quantised or sharded layers).
    """
    if type(linear) is torch.nn.Linear:
        return (linear.weight, []) if linear.bias is None and isinstance(linear.weight, torch.nn.Parameter) else None
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(linear, LoraLinear):
        return None
    base = linear.get_base_layer()
    if type(base) is not torch.nn.Linear or base.bias is not None or not isinstance(base.weight, torch.nn.Parameter):
        return None
    if linear.merged:
        return None if linear.disable_adapters else (base.weight, [])
    if linear.disable_adapters:
        return base.weight, []
    if getattr(linear, "fan_in_fan_out", False):
        return None
    low_rank = []
    for adapter in linear.active_adapters:
        if adapter not in linear.lora_A.keys():
            continue
        if adapter in getattr(linear, "lora_variant", {}) or getattr(linear, "lora_bias", {}).get(adapter, False):
            return None
        a, b = linear.lora_A[adapter].weight, linear.lora_B[adapter].weight
        low_rank.append((a.to(base.weight.dtype), (b * linear.scaling[adapter]).to(base.weight.dtype)))
    return base.weight, low_rank


class _Unsupported(Exception):
    """A layer the fused code cannot fold."""


class _Projection:
    """Several bias-free linears (plain or LoRA) side by side as one ``x -> x @ W.T`` call.

    Outputs are concatenated in the order given: ``_Projection([q, k, v])(x)`` equals
    ``cat([q(x), k(x), v(x)], -1)``. Without gradients (sampling, reference) LoRA is merged
    into one weight, ``W + s * B @ A`` as peft's ``merge`` computes it: one matmul. With
    gradients it stays factored, ``x @ W.T + (x @ A.T) @ (s*B).T`` with the adapters stacked
    (B block-diagonal), so backward never forms a full-size weight gradient for a frozen ``W``.
    Frozen side-by-side weights are stacked once and the parameters kept as views of the stack (see :func:`_frozen_cat`).
    """

    def __init__(self, linears: list[torch.nn.Module]):
        parts = [_linear_parts(linear) for linear in linears]
        if any(part is None for part in parts):
            raise _Unsupported(", ".join(type(linear).__name__ for linear in linears))
        self.low_rank = None
        if not torch.is_grad_enabled() or not any(low for _, low in parts):
            merged = [w + sum(b @ a for a, b in low) if low else w for w, low in parts]
            self.weight = merged[0] if len(merged) == 1 else _frozen_cat(linears[0], merged)
            return
        self.weight = parts[0][0] if len(parts) == 1 else _frozen_cat(linears[0], [w for w, _ in parts])
        a_rows, b_blocks, offset = [], [], 0
        out_sizes = [w.shape[0] for w, _ in parts]
        total_out = sum(out_sizes)
        for (w, low), out_size in zip(parts, out_sizes):
            for a, b in low:
                a_rows.append(a)
                # (total_out, r): this adapter's B in its output rows, zeros elsewhere
                b_blocks.append(F.pad(b, (0, 0, offset, total_out - offset - out_size)))
            offset += out_size
        # (R, in) and (total_out, R): every adapter of the group in one low-rank product
        self.low_rank = (torch.cat(a_rows), torch.cat(b_blocks, dim=1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.low_rank is not None:
            a, b = self.low_rank
            out = out + F.linear(F.linear(x, a), b)
        return out


_CAT_CACHE = "_flan_rlhf_cat_cache"


def _rows_of(stacked: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether ``weights`` are, in order, contiguous views of consecutive rows of ``stacked`` (metadata only)."""
    offset, storage = stacked.storage_offset(), stacked.untyped_storage().data_ptr()
    for weight in weights:
        if (weight.untyped_storage().data_ptr() != storage or weight.storage_offset() != offset
                or weight.dtype != stacked.dtype or not weight.is_contiguous() or weight.shape[1:] != stacked.shape[1:]):
            return False
        offset += weight.numel()
    return offset == stacked.storage_offset() + stacked.numel()


def _frozen_cat(owner: torch.nn.Module, weights: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(weights)`` without a second copy of frozen parameters.

    Frozen base weights (LoRA training, the frozen reference) are stacked once and each parameter is
    then made a view of its rows of the stack (``param.data = stacked[rows]``), so the stack is the
    weights' only copy and later calls return it as it is. In-place updates of a parameter
    (``load_state_dict``, ``add_`` under ``no_grad``) write into the stack; anything that gives a
    parameter new storage (``module.to(device/dtype)``, assigning ``.data``) makes it no longer a view,
    and the next call stacks again. A trainable weight is never stacked this way: the optimiser owns
    it, and torch's fused AdamW kernel updates it in place without any sign a cache could read.
    """
    cacheable = all(isinstance(w, torch.nn.Parameter) and not w.requires_grad for w in weights)
    if not cacheable:
        return torch.cat(weights)
    cached = getattr(owner, _CAT_CACHE, None)
    if cached is not None and _rows_of(cached, weights):
        return cached
    # normal tensors even when the first call is under inference_mode (a `validate` before `fit`): an
    # inference tensor here would fail the first training pass ("cannot be saved for backward")
    with torch.inference_mode(False), torch.no_grad():
        stacked = torch.cat(weights).detach()
        row = 0
        for weight in weights:
            weight.data = stacked[row:row + weight.shape[0]]
            row += weight.shape[0]
    object.__setattr__(owner, _CAT_CACHE, stacked)  # a plain attribute: not a buffer, not saved
    return stacked


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
    CPU attention kernel costs several times more (measured with ``benchmarks/profile_ppo.py``).
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
    if is_fused_t5(model):
        try:
            return _encode(model, input_ids, attention_mask)
        except _Unsupported:
            pass
    return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


def _encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """:func:`encode_prompts`' fused path for a model that passed :func:`is_fused_t5`; raises
    :class:`_Unsupported`, before computing anything, for a layer it cannot fold."""
    encoder = model.get_encoder()
    layers = [_block_weights(block.layer[0], block.layer[-1]) for block in encoder.block]
    batch, length = input_ids.shape
    real = attention_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
    hidden = encoder.embed_tokens(input_ids.reshape(-1).index_select(0, real))  # (tokens, d_model)
    first = encoder.block[0].layer[0].SelfAttention
    heads, head_dim = first.n_heads, first.key_value_proj_dim
    bias = first.compute_bias(length, length, device=input_ids.device).to(hidden.dtype)
    bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(hidden.dtype).min)

    def padded_heads(x: torch.Tensor) -> torch.Tensor:  # (tokens, 3*h*d) -> (3, batch, heads, length, head_dim)
        full = x.new_zeros(batch * length, x.shape[-1]).index_copy(0, real, x)
        return full.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)

    for layer in layers:
        q, k, v = padded_heads(layer["qkv"](layer["norm1"](hidden)))
        out = _attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(batch * length, heads * head_dim).index_select(0, real)
        hidden = hidden + layer["o"](out)
        hidden = _feed_forward(layer, hidden)
    hidden = _rms_norm(encoder.final_layer_norm)(hidden)
    return hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, real, hidden).view(batch, length, -1)


def _block_weights(self_layer, ff_layer, cross_layer=None) -> dict:
    """One T5 block's norms and :class:`_Projection` calls (cross-attention for decoder blocks).

    Keys: ``norm1``, ``qkv`` (q, k, v side by side), ``o``; with ``cross_layer``: ``norm2``,
    ``cross_q``, ``cross_kv`` (keys, values), ``cross_o``; ``norm3``, ``w_in`` (gated: ``wi_0``
    and ``wi_1`` side by side), ``gated``, ``act``, ``w_out``. Raises :class:`_Unsupported`.
    """
    sa, dense = self_layer.SelfAttention, ff_layer.DenseReluDense
    gated = hasattr(dense, "wi_0")
    layer = {
        "norm1": _rms_norm(self_layer.layer_norm),
        "qkv": _Projection([sa.q, sa.k, sa.v]),
        "o": _Projection([sa.o]),
        "norm3": _rms_norm(ff_layer.layer_norm),
        "w_in": _Projection([dense.wi_0, dense.wi_1] if gated else [dense.wi]),
        "gated": gated, "act": _activation(dense.act), "w_out": _Projection([dense.wo]),
    }
    if cross_layer is not None:
        ca = cross_layer.EncDecAttention
        layer.update({"norm2": _rms_norm(cross_layer.layer_norm), "cross_q": _Projection([ca.q]),
                      "cross_kv": _Projection([ca.k, ca.v]), "cross_o": _Projection([ca.o])})
    return layer


def _feed_forward(layer: dict, hidden: torch.Tensor) -> torch.Tensor:
    """Pre-norm (gated) feed-forward with its residual, any leading shape."""
    inner = layer["w_in"](layer["norm3"](hidden))
    if layer["gated"]:
        gate, linear = inner.chunk(2, dim=-1)
        inner = layer["act"](gate) * linear
    else:
        inner = layer["act"](inner)
    return hidden + layer["w_out"](inner)


class _DecoderWeights:
    """A T5 decoder's blocks (:func:`_block_weights`), embedding, final norm and LM head,
    read once per pass. Raises :class:`_Unsupported` for a layer it cannot fold."""

    def __init__(self, model):
        decoder = model.decoder
        first = decoder.block[0].layer[0].SelfAttention
        self.first_attention = first
        self.heads, self.head_dim = first.n_heads, first.key_value_proj_dim
        self.inner = self.heads * self.head_dim
        self.layers = [_block_weights(block.layer[0], block.layer[2], block.layer[1]) for block in decoder.block]
        self.embedding = decoder.embed_tokens.weight
        self.final_norm = _rms_norm(decoder.final_layer_norm)
        self.lm_head = _Projection([model.lm_head])
        self.output_scale = model.config.d_model ** -0.5 if _scales_decoder_output(model.config) else None

    def heads_view(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, len, heads*head_dim)`` -> ``(batch, heads, len, head_dim)``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def cross_keys_values(self, encoder_hidden: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, cross-attention keys and values ``(batch, heads, prompt_len, head_dim)``."""
        pairs = []
        for layer in self.layers:
            keys, values = layer["cross_kv"](encoder_hidden).chunk(2, dim=-1)
            pairs.append((self.heads_view(keys).contiguous(), self.heads_view(values).contiguous()))
        return pairs

    def output(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm and LM head: ``(hidden after the norm, logits)``."""
        hidden = self.final_norm(hidden)
        head_input = hidden * self.output_scale if self.output_scale is not None else hidden
        return hidden, self.lm_head(head_input)


def _cross_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask over prompt positions, ``(batch, 1, 1, prompt_len)``."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


def _decode(weights: "_DecoderWeights", encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
            decoder_input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced decoder pass of :func:`fused_forward`, on a model's decoder weights."""
    batch, length = decoder_input_ids.shape
    dtype, device = encoder_hidden.dtype, encoder_hidden.device
    bias = weights.first_attention.compute_bias(length, length, device=device).to(dtype)  # (1, heads, L, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    bias = bias.masked_fill(causal, torch.finfo(dtype).min)
    cross_mask = _cross_mask(attention_mask, dtype)
    cross = weights.cross_keys_values(encoder_hidden)
    hidden = F.embedding(decoder_input_ids, weights.embedding)  # (batch, L, d_model)
    for layer, (cross_keys, cross_values) in zip(weights.layers, cross):
        qkv = layer["qkv"](layer["norm1"](hidden)).view(batch, length, 3, weights.heads, weights.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, L, head_dim)
        out = _attend(qkv[0], qkv[1], qkv[2], bias)
        hidden = hidden + layer["o"](out.transpose(1, 2).reshape(batch, length, weights.inner))
        query = weights.heads_view(layer["cross_q"](layer["norm2"](hidden)))
        out = _attend(query, cross_keys, cross_values, cross_mask)
        hidden = hidden + layer["cross_o"](out.transpose(1, 2).reshape(batch, length, weights.inner))
        hidden = _feed_forward(layer, hidden)
    return weights.output(hidden)


class FusedT5Stepper:
    """One decoder step of a T5 model with a preallocated KV cache and fused weights.

    At the start of a rollout each projection's effective weight is read once
    (:class:`_DecoderWeights`) and cross-attention keys/values are computed; each step is
    then about 20 tensor ops per layer. The arithmetic is T5's: RMS norms, no query scaling,
    one relative position bias from block 0 shared by all layers, pre-norm residual blocks.
    Built by :func:`prepare_sampling` (only for models that pass :func:`is_fused_t5`).

    Args:
        weights: the decoder of a ``T5ForConditionalGeneration`` (LoRA layers allowed).
        encoder_hidden: encoder output, ``(batch, prompt_len, d_model)``.
        attention_mask: prompt mask, ``(batch, prompt_len)``.
        max_len: decoder positions to allocate.
    """

    def __init__(self, weights: "_DecoderWeights", encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                 max_len: int):
        self.weights = weights
        batch, dtype, device = encoder_hidden.shape[0], encoder_hidden.dtype, encoder_hidden.device
        self.cross = weights.cross_keys_values(encoder_hidden)
        # (1, heads, max_len, max_len): row t is the bias of query position t over keys 0..max_len-1
        self.position_bias = weights.first_attention.compute_bias(max_len, max_len, device=device).to(dtype)
        shape = (len(weights.layers), batch, weights.heads, max_len, weights.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.cross_mask = _cross_mask(attention_mask, dtype)

    def step(self, tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``tokens`` ``(batch,)`` at decoder ``position``.

        Returns:
            hidden: decoder output after the final layer norm, ``(batch, d_model)``.
            logits: ``(batch, vocab)``.
        """
        w = self.weights
        batch = tokens.shape[0]
        end = position + 1
        bias = self.position_bias[:, :, position:end, :end]
        hidden = F.embedding(tokens, w.embedding)  # (batch, d_model)
        for i, layer in enumerate(w.layers):
            qkv = layer["qkv"](layer["norm1"](hidden)).view(batch, 3, w.heads, 1, w.head_dim)
            self.keys[i, :, :, position] = qkv[:, 1, :, 0]
            self.values[i, :, :, position] = qkv[:, 2, :, 0]
            out = _attend(qkv[:, 0], self.keys[i, :, :, :end], self.values[i, :, :, :end], bias)
            hidden = hidden + layer["o"](out.reshape(batch, w.inner))
            query = layer["cross_q"](layer["norm2"](hidden)).view(batch, w.heads, 1, w.head_dim)
            out = _attend(query, *self.cross[i], self.cross_mask)
            hidden = hidden + layer["cross_o"](out.reshape(batch, w.inner))
            hidden = _feed_forward(layer, hidden)
        return w.output(hidden)


def fused_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    decoder_input_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Teacher-forced encoder + decoder pass in fused ops, or ``None`` if ``model`` is not supported.

    Args:
        input_ids, attention_mask: right-padded prompts, ``(batch, prompt_len)``.
        decoder_input_ids: ``(batch, response_len)``.

    Returns:
        ``(hidden, logits)``: the decoder output after the final norm ``(batch, response_len, d_model)`` and
        the logits ``(batch, response_len, vocab)``.
    """
    if not is_fused_t5(model):
        return None
    try:
        weights = _DecoderWeights(model)  # raises before any compute, so nothing is done twice
        encoder_hidden = _encode(model, input_ids, attention_mask)  # raises before computing too
    except _Unsupported:
        return None
    return _decode(weights, encoder_hidden, attention_mask, decoder_input_ids)


def fused_decode(model, encoder_hidden: torch.Tensor, attention_mask: torch.Tensor,
                 decoder_input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The teacher-forced decoder pass of :func:`fused_forward` on a given encoder output, or ``None`` if
    ``model`` is not supported (several responses per prompt then share one encoder pass).

    Args:
        encoder_hidden: ``(batch, prompt_len, d_model)``, e.g. from :func:`encode_prompts`.
        attention_mask: ``(batch, prompt_len)``.
        decoder_input_ids: ``(batch, response_len)``.
    Returns:
        ``(hidden, logits)`` as :func:`fused_forward`'s.
    """
    if not is_fused_t5(model):
        return None
    try:
        weights = _DecoderWeights(model)
    except _Unsupported:
        return None
    return _decode(weights, encoder_hidden, attention_mask, decoder_input_ids)


def prepare_sampling(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     max_len: int) -> tuple[torch.Tensor, "FusedT5Stepper | None"]:
    """The encoder output and a :class:`FusedT5Stepper` for a rollout; ``(HF encoder output,
    None)`` when ``model`` cannot take the fused path (the caller then steps its ``forward``).

    Args:
        input_ids, attention_mask: right-padded prompts, ``(batch, prompt_len)``.
        max_len: decoder positions to allocate.
    """
    if is_fused_t5(model):
        try:
            weights = _DecoderWeights(model)  # raises before any compute, as _encode does
            encoder_hidden = _encode(model, input_ids, attention_mask)
            return encoder_hidden, FusedT5Stepper(weights, encoder_hidden, attention_mask, max_len)
        except _Unsupported:
            pass
    encoder = model.get_encoder()
    return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state, None
