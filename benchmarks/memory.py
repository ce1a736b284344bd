#!/usr/bin/env python
"""Training memory of PPO on FLAN-T5, on paper and measured: this project against TRL 0.11 and RL4LMs.

On paper (pure functions below, ``--markdown`` prints docs/memory.md's tables): parameters of
flan-t5 small/base/large/xl (their T5 v1.1 configs), LoRA r=32 on q,v and on q,k,v,o, bytes per
weight at fp32 / bf16 / int8 / nf4, AdamW state, the activations of one PPO minibatch
forward/backward (batch 8 x 512 prompt tokens x 64 response tokens) with and without gradient
checkpointing, and the KV cache of sampling; for three systems:

* ``flan-rlhf``: one copy of the base weights (the reference is the policy with its adapters off;
  the fused T5 path's stacked frozen weights are that copy, ``t5_fused._frozen_cat``), LoRA + value
  head trained with AdamW;
* ``TRL 0.11``: PPOTrainer full fine-tuning: ``AutoModelForSeq2SeqLMWithValueHead`` trained in full
  with Adam, plus ``create_reference_model``'s frozen deep copy (trl/models/modeling_base.py);
* ``RL4LMs``: ``Seq2SeqLMActorCriticPolicy`` (rl4lms/envs/text_generation/policy/seq2seq_policy.py):
  a policy T5, a separate value T5 (+ a linear head) both trained with AdamW, and a deep-copied
  reference T5: three full models.

Measured (``--measure``): peak RSS of ONE PPO iteration of the package's own ``PPOModule`` at
flan-t5-small and flan-t5-base size (random weights, vocabulary 32,128), each configuration in a
fresh subprocess, beside the formula's figure for the same configuration and its error.

Prints ONE JSON line on stdout; everything else goes to stderr (``--markdown``: the tables on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

GIB = 1024 ** 3
MIB = 1024 ** 2
VOCAB = 32128  # every flan-t5 config's vocab_size (32,100 sentencepiece pieces + padding to a multiple of 128)
NUM_BUCKETS = 32  # T5 relative_attention_num_buckets: one (buckets x heads) table in block 0 of each stack


@dataclass(frozen=True)
class T5Dims:
    """The dimensions of a T5 v1.1 / FLAN-T5 model (gated-GELU, untied lm_head, no biases)."""

    d_model: int
    d_ff: int
    num_layers: int  # encoder blocks
    num_decoder_layers: int
    num_heads: int
    d_kv: int
    vocab: int = VOCAB

    @property
    def inner(self) -> int:
        """Attention width ``num_heads * d_kv`` (384, not d_model 512, for flan-t5-small)."""
        return self.num_heads * self.d_kv


#: config.json of google/flan-t5-{small,base,large,xl} on the Hugging Face Hub.
FLAN_T5 = {
    "small": T5Dims(d_model=512, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6, d_kv=64),
    "base": T5Dims(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12, d_kv=64),
    "large": T5Dims(d_model=1024, d_ff=2816, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64),
    "xl": T5Dims(d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=64),
}


@dataclass(frozen=True)
class Workload:
    """One PPO minibatch: ``batch`` prompts of ``prompt_tokens`` tokens, ``response_tokens`` sampled tokens each."""

    batch: int = 8
    prompt_tokens: int = 512
    response_tokens: int = 64


# ---------------------------------------------------------------- parameters

def t5_parameter_count(dims: T5Dims) -> int:
    """Parameters of a T5 v1.1 model, counted from its dimensions.

    embedding V*d + untied lm_head V*d; per encoder block: q,k,v,o 4*d*i, wi_0, wi_1, wo 3*d*f,
    2 RMS-norm weights d; per decoder block: self- and cross-attention 8*d*i, feed-forward 3*d*f,
    3 norms; a final norm per stack; one relative-position table (32 buckets x heads) per stack.
    """
    d, f, i = dims.d_model, dims.d_ff, dims.inner
    encoder_block = 4 * d * i + 3 * d * f + 2 * d
    decoder_block = 8 * d * i + 3 * d * f + 3 * d
    return (2 * dims.vocab * d + dims.num_layers * encoder_block + dims.num_decoder_layers * decoder_block
            + 2 * d + 2 * NUM_BUCKETS * dims.num_heads)


def attention_modules(dims: T5Dims) -> int:
    """Attention blocks holding a q/k/v/o each: encoder self, decoder self and decoder cross."""
    return dims.num_layers + 2 * dims.num_decoder_layers


def lora_parameter_count(dims: T5Dims, r: int, targets: tuple[str, ...]) -> int:
    """LoRA parameters: ``r * (in + out)`` per adapted linear (A is r x in, B is out x r; Hu et al. 2021).

    q, k, v map d_model -> inner and o maps inner -> d_model, so every target costs ``r*(d + i)``
    in each attention block (peft's ``target_modules=["q", "v"]`` matches cross-attention too).
    """
    unknown = set(targets) - {"q", "k", "v", "o"}
    if unknown:
        raise ValueError(f"only attention projections q, k, v, o are counted, got {sorted(unknown)}")
    return len(targets) * attention_modules(dims) * r * (dims.d_model + dims.inner)


def value_head_parameter_count(dims: T5Dims) -> int:
    """``nn.Linear(d_model, 1)``: this project's and TRL's value head (RL4LMs' has no bias, 1 fewer)."""
    return dims.d_model + 1


def quantised_weight_count(dims: T5Dims) -> int:
    """Weights bitsandbytes quantises under ``PolicySpec.quantization``: every block linear but the
    feed-forward output ``wo``, which transformers keeps unquantised in float32 (T5's
    ``_keep_in_fp32_modules``); the embedding, lm_head, norms and position tables are not linears
    of the blocks (tests/test_memory_formula.py counts them on a quantised model)."""
    d, f, i = dims.d_model, dims.d_ff, dims.inner
    return dims.num_layers * (4 * d * i + 2 * d * f) + dims.num_decoder_layers * (8 * d * i + 2 * d * f)


def quantised_output_rows(dims: T5Dims) -> int:
    """Output rows of the quantised linears (one fp32 scale each under LLM.int8's row-wise absmax)."""
    d, f, i = dims.d_model, dims.d_ff, dims.inner
    encoder = 3 * i + d + 2 * f
    decoder = 2 * (3 * i + d) + 2 * f
    return dims.num_layers * encoder + dims.num_decoder_layers * decoder


# ---------------------------------------------------------------- bytes

#: bytes per element of a dense tensor
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
#: NF4 (QLoRA, Dettmers et al. 2023, Sec. 2 "Double Quantization"): 4-bit codes, one absmax per block of
#: 64 weights, the absmaxes themselves quantised to 8 bits in blocks of 256 with one fp32 constant each:
#: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight (bitsandbytes Linear4bit, blocksize 64,
#: bnb_4bit_use_double_quant=True).
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)
#: LLM.int8() (Dettmers et al. 2022; bitsandbytes Linear8bitLt): int8 weights, one fp32 absmax scale per output row.
INT8_SCALE_BYTES = 4
PRECISIONS = ("fp32", "bf16", "int8", "nf4")


def weight_bytes(dims: T5Dims, precision: str) -> float:
    """Bytes of one copy of the base weights.

    fp32 / bf16: every parameter at 4 / 2 bytes. int8 / nf4: :func:`quantised_weight_count` weights
    quantised (int8: 1 byte + an fp32 scale per output row; nf4: NF4_BITS_PER_WEIGHT / 8 bytes), the
    rest (``wo``, embedding, lm_head, norms, position tables) in float32, as ``flan_rlhf.policy``
    loads them (transformers keeps ``wo`` in fp32; ``prepare_quantized_base`` casts the others to fp32).
    """
    total = t5_parameter_count(dims)
    if precision in DTYPE_BYTES:
        return total * DTYPE_BYTES[precision]
    quantised = quantised_weight_count(dims)
    rest = (total - quantised) * DTYPE_BYTES["fp32"]
    if precision == "int8":
        return rest + quantised + INT8_SCALE_BYTES * quantised_output_rows(dims)
    if precision == "nf4":
        return rest + quantised * NF4_BITS_PER_WEIGHT / 8
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def compute_bytes(precision: str) -> int:
    """Bytes per activation element: the weights' dtype, bf16 for quantised bases (their compute dtype)."""
    return DTYPE_BYTES.get(precision, DTYPE_BYTES["bf16"])


def trainable_state_bytes(trainable: int, param_bytes: int) -> int:
    """Weight + gradient + Adam(W)'s two moments, all in the parameter's dtype (torch's Adam/AdamW
    allocate ``exp_avg``/``exp_avg_sq`` with ``zeros_like(param)``): 16 bytes per fp32 parameter."""
    return trainable * 4 * param_bytes


# ---------------------------------------------------------------- activations

def encoder_layer_elements(dims: T5Dims, w: Workload, frozen: bool, lora_targets: tuple[str, ...], r: int) -> dict:
    """Activation elements one encoder block saves for backward, per the method of Korthikanti et al. 2022
    ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1: count every tensor an op
    keeps for its backward), adapted to T5 v1.1: RMS norms, gated-GELU, attention width ``i = heads*d_kv``,
    no dropout (this project, TRL and RL4LMs train with dropout 0 or PPO's dropout-off convention, so no
    masks), softmax in fp32 (T5 computes it in float).

    Returns ``{"act": elements at the compute dtype, "softmax": score elements}``.

    Trainable weights (``frozen=False``) save every linear's input: norm inputs 2d, the q/k/v input d,
    q and k 2i, v i, o's input i, the feed-forward input d, GELU's input f, its output and the linear
    branch 2f, wo's input f: ``4d + 4i + 4f`` per token (Korthikanti's 34sbh at d=i, f=4d, without
    dropout masks and in elements). Frozen weights (LoRA) keep no input for their own gradient: the norm
    inputs 2d, q/k/v 3i, GELU's f and the product's 2f, and for each adapted group its input and
    the ``x A^T`` intermediate (r per adapter).
    """
    d, f, i = dims.d_model, dims.d_ff, dims.inner
    tokens = w.batch * w.prompt_tokens
    if not frozen:
        per_token = 2 * d + 4 * i + 4 * f
    else:
        per_token = 3 * i + 3 * f
        qkv = [t for t in lora_targets if t in ("q", "k", "v")]
        if qkv:
            per_token += d + r * len(qkv)
        if "o" in lora_targets:
            per_token += i + r
    per_token += 3 * i  # q, k, v kept twice: the projection's output and matmul's copies of the head views
    return {"act": tokens * per_token, "norm": tokens * 2 * d, "softmax": w.batch * dims.num_heads * w.prompt_tokens ** 2}


def decoder_layer_elements(dims: T5Dims, w: Workload, frozen: bool, lora_targets: tuple[str, ...], r: int) -> dict:
    """As :func:`encoder_layer_elements` for a decoder block: causal self-attention over the response,
    cross-attention to the prompt (the decoder keeps K and V of every prompt token, ``2i`` each, and
    the prompt-length scores), feed-forward. Elements at the compute dtype and softmax score elements."""
    d, f, i = dims.d_model, dims.d_ff, dims.inner
    tokens, prompt_tokens = w.batch * w.response_tokens, w.batch * w.prompt_tokens
    if not frozen:
        per_token = 3 * d + 6 * i + 4 * f  # self: d + 4i; cross: q in d, q, out 2i; ff d + 4f (+ 3 norm inputs)
        per_prompt_token = 2 * i  # cross K, V (their input, the encoder output, is counted once)
    else:
        # self q, k, v 3i; cross q i (its output feeds a frozen o); GELU in, out, linear 3f (+ 3 norm inputs)
        per_token = 4 * i + 3 * f
        per_prompt_token = 2 * i
        self_qkv = [t for t in lora_targets if t in ("q", "k", "v")]
        if self_qkv:
            per_token += d + r * len(self_qkv)
        if "q" in lora_targets:
            per_token += d + r  # cross q's input and x A^T
        if "o" in lora_targets:
            per_token += 2 * (i + r)  # self and cross o
        per_prompt_token += r * len([t for t in lora_targets if t in ("k", "v")])
    per_token += 3 * i  # self-attention q, k, v kept twice, as in the encoder
    per_prompt_token += 2 * i  # cross K, V kept twice: the k|v projection's output and the per-head copies
    scores = w.batch * dims.num_heads * (w.response_tokens ** 2 + w.response_tokens * w.prompt_tokens)
    return {"act": tokens * per_token + prompt_tokens * per_prompt_token, "norm": tokens * 3 * d, "softmax": scores}


def activation_bytes(dims: T5Dims, w: Workload, precision: str, frozen: bool, lora_targets: tuple[str, ...] = (),
                     r: int = 32, checkpointing: bool = False) -> dict:
    """Bytes held during one minibatch forward/backward of the policy (its peak, at the start of backward).

    ``layers``: every block's saved tensors (checkpointing: each block's input, ``d`` per token,
    plus one block recomputed during backward); ``softmax``: fp32 probabilities (+ their cast to the
    compute dtype under bf16, kept by the AV matmul); ``bias``: the encoder's (batch, heads, S, S)
    position bias with the padding mask, made once per pass; ``logits``: the (batch, T, vocab) logits
    in fp32 and their EOS-banned copy (both kept by the loss), plus two fp32 gradients of that size in
    backward; ``outputs``: the encoder output (d per prompt token) and the final norms' inputs.
    """
    p = compute_bytes(precision)
    softmax_bytes = 4 + (p if p != 4 else 0)
    enc = encoder_layer_elements(dims, w, frozen, lora_targets, r)
    dec = decoder_layer_elements(dims, w, frozen, lora_targets, r)
    n_enc, n_dec = w.batch * w.prompt_tokens, w.batch * w.response_tokens
    if checkpointing:
        one_block = max(blk["act"] * p + blk["norm"] * 4 + blk["softmax"] * softmax_bytes for blk in (enc, dec))
        layers = (dims.num_layers * n_enc + dims.num_decoder_layers * n_dec) * dims.d_model * p + one_block
        softmax = 0
    else:
        layers = ((dims.num_layers * enc["act"] + dims.num_decoder_layers * dec["act"]) * p
                  + (dims.num_layers * enc["norm"] + dims.num_decoder_layers * dec["norm"]) * 4)
        softmax = (dims.num_layers * enc["softmax"] + dims.num_decoder_layers * dec["softmax"]) * softmax_bytes
    bias = w.batch * dims.num_heads * w.prompt_tokens ** 2 * p
    logits = 4 * n_dec * dims.vocab * 4
    outputs = (2 * n_enc + 2 * n_dec) * dims.d_model * p
    parts = {"layers": layers, "softmax": softmax, "bias": bias, "logits": logits, "outputs": outputs}
    return {**parts, "total": sum(parts.values())}


def sampling_bytes(dims: T5Dims, w: Workload, precision: str) -> int:
    """KV cache of sampling ``response_tokens`` tokens: per decoder layer, self-attention K and V
    (batch x heads x T x d_kv each) and cross-attention K and V over the prompt (batch x heads x S x d_kv),
    plus the encoder output (batch x S x d_model), at the compute dtype."""
    p = compute_bytes(precision)
    kv = 2 * dims.num_decoder_layers * w.batch * dims.num_heads * dims.d_kv * (w.response_tokens + w.prompt_tokens)
    return (kv + w.batch * w.prompt_tokens * dims.d_model) * p


def merged_weight_bytes(dims: T5Dims, precision: str, lora_targets: tuple[str, ...]) -> int:
    """Temporaries of this project's no-gradient passes (sampling, reference): every layer's adapted
    projections merged (``W + s B A``, a new tensor each) and their stacked q|k|v (or cross k|v) copy,
    built for all layers of a stack at once (``_DecoderWeights``; the encoder's block list)."""
    d, i, p = dims.d_model, dims.inner, compute_bytes(precision)
    adapted = len(lora_targets)
    qkv_stacked = 3 if any(t in ("q", "k", "v") for t in lora_targets) else 0
    cross_kv = 2 if any(t in ("k", "v") for t in lora_targets) else 0
    decoder_layer = (2 * adapted + qkv_stacked + cross_kv) * d * i
    encoder_layer = (adapted + qkv_stacked) * d * i
    return max(dims.num_layers * encoder_layer, dims.num_decoder_layers * decoder_layer) * p


# ---------------------------------------------------------------- the three systems

SYSTEMS = ("flan-rlhf LoRA q,v", "flan-rlhf LoRA q,k,v,o", "TRL 0.11 full", "RL4LMs")
LORA_TARGETS = {"flan-rlhf LoRA q,v": ("q", "v"), "flan-rlhf LoRA q,k,v,o": ("q", "k", "v", "o")}


def system_memory(system: str, dims: T5Dims, precision: str, w: Workload = Workload(), r: int = 32,
                  checkpointing: bool = False) -> dict | None:
    """Peak bytes of one PPO iteration of ``system`` on a GPU, by part; ``None`` where the system cannot
    train that precision (full fine-tuning of an int8 / nf4 base).

    Peak = every copy of the weights + trainable state + the larger of the minibatch's training working
    set and sampling's (KV cache, and for this project the merged weights of its no-gradient passes).
    """
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    p = compute_bytes(precision)
    weights = weight_bytes(dims, precision)
    params = t5_parameter_count(dims)
    if system in LORA_TARGETS:
        targets = LORA_TARGETS[system]
        fused = precision in DTYPE_BYTES  # quantised layers take Hugging Face's forward: no merged temporaries
        trainable = lora_parameter_count(dims, r, targets) + value_head_parameter_count(dims)
        parts = {
            "weights": weights,  # one copy: the reference is the same weights with the adapters off
            "trainable_state": trainable_state_bytes(trainable, 4),  # peft keeps adapters in fp32
            "activations": activation_bytes(dims, w, precision, True, targets, r, checkpointing)["total"],
            "sampling": sampling_bytes(dims, w, precision) + (merged_weight_bytes(dims, precision, targets)
                                                              if fused else 0),
        }
    else:
        if precision not in DTYPE_BYTES:
            return None
        models = 2 if system == "TRL 0.11 full" else 3  # TRL: policy + reference; RL4LMs: + value model
        trained = 1 if system == "TRL 0.11 full" else 2
        head = value_head_parameter_count(dims) - (system == "RL4LMs")
        parts = {
            "weights": (models - trained) * weights,  # the frozen copies; the trained ones are in the state
            "trainable_state": trainable_state_bytes(trained * params + head, p),
            "activations": trained * activation_bytes(dims, w, precision, False, (), r, checkpointing)["total"],
            "sampling": sampling_bytes(dims, w, precision),
        }
    parts["peak"] = (parts["weights"] + parts["trainable_state"]
                     + max(parts["activations"], parts["sampling"]))
    return parts


# ---------------------------------------------------------------- tables

def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f}"


def markdown_tables(w: Workload = Workload(), r: int = 32) -> str:
    """docs/memory.md's tables on paper: parameters, one copy's bytes, and peak per size x precision x system."""
    lines = ["| size | parameters | LoRA r=%d q,v | LoRA r=%d q,k,v,o | fp32 GiB | bf16 GiB | int8 GiB | nf4 GiB |" % (r, r),
             "|---|---|---|---|---|---|---|---|"]
    for name, dims in FLAN_T5.items():
        n = t5_parameter_count(dims)
        qv, qkvo = lora_parameter_count(dims, r, ("q", "v")), lora_parameter_count(dims, r, ("q", "k", "v", "o"))
        lines.append(f"| flan-t5-{name} | {n:,} | {qv:,} ({100 * qv / n:.2f}%) | {qkvo:,} ({100 * qkvo / n:.2f}%) | "
                     + " | ".join(_gib(weight_bytes(dims, prec)) for prec in PRECISIONS) + " |")
    lines += ["", f"Peak GiB of one PPO iteration, batch {w.batch} x {w.prompt_tokens} prompt tokens x "
              f"{w.response_tokens} new tokens (without / with gradient checkpointing):", "",
              "| size | precision | " + " | ".join(SYSTEMS) + " |", "|---|---|" + "---|" * len(SYSTEMS)]
    for name, dims in FLAN_T5.items():
        for prec in PRECISIONS:
            cells = []
            for system in SYSTEMS:
                plain, ckpt = (system_memory(system, dims, prec, w, r, c) for c in (False, True))
                cells.append("n/a" if plain is None else f"{_gib(plain['peak'])} / {_gib(ckpt['peak'])}")
            lines.append(f"| {name} | {prec} | " + " | ".join(cells) + " |")
    lines += ["", "Parts at flan-t5-base, bf16, no checkpointing (GiB):", "",
              "| system | weights (frozen copies) | trained weights + grads + Adam | "
              "activations | sampling | peak |", "|---|---|---|---|---|---|"]
    for system in SYSTEMS:
        parts = system_memory(system, FLAN_T5["base"], "bf16", w, r)
        lines.append(f"| {system} | " + " | ".join(_gib(parts[k]) for k in (
            "weights", "trainable_state", "activations", "sampling", "peak")) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- measuring

def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _rss_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_now_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), so ru_maxrss
    afterwards is the peak of what follows; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prepare_model(size: str, folder: str) -> None:
    """A randomly initialised flan-t5-``size`` (the real dims, vocabulary 32,128) saved with
    ``save_pretrained`` in fp32, and a word-level tokenizer of 32,128 ids beside it (``w3``..``w32127``
    plus ``<pad>``=0, ``</s>``=1, ``<unk>``=2; ``</s>`` appended to every text, as T5's tokenizer does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from flan_rlhf.policy import build_t5_from_config

    dims = FLAN_T5[size]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{k}": k for k in range(3, dims.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(folder)
    model = build_t5_from_config(vocab_size=dims.vocab, d_model=dims.d_model, d_ff=dims.d_ff,
                                 num_layers=dims.num_layers, num_decoder_layers=dims.num_decoder_layers,
                                 num_heads=dims.num_heads, d_kv=dims.d_kv)
    model.save_pretrained(folder)


def measure_one(folder: str, size: str, dtype: str, w: Workload, r: int, ppo_epochs: int, threads: int) -> dict:
    """Peak RSS of one PPO iteration of ``PPOModule`` (run in a fresh process by :func:`measure`).

    ``baseline``: ru_maxrss after the imports; the model is then loaded (the package's path:
    ``PolicySpec(name_or_path=folder, dtype=...)``), the peak reset, and ``iteration_peak`` is the peak of
    the fit of one iteration alone; ``process_peak`` (never reset) is kept too.
    """
    import random

    import torch

    import lightning as L
    import transformers
    from torch.utils.data import DataLoader

    from flan_rlhf.module import PPOModule
    from flan_rlhf.policy import LoraSettings, PolicySpec
    from flan_rlhf.rewards.base import Reward
    from flan_rlhf.settings import GenerationSettings, PPOSettings

    class LengthReward(Reward):
        """Characters / 1000 of each response (free; the memory does not depend on the reward)."""

        name = "length"

        def components(self, prompts, responses):
            return {self.name: torch.tensor([len(t) / 1000 for t in responses], dtype=torch.float32)}

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    baseline = _rss_peak_mib()
    torch.manual_seed(0)
    rng = random.Random(0)
    dims = FLAN_T5[size]
    prompts = [" ".join(f"w{rng.randrange(3, dims.vocab)}" for _ in range(w.prompt_tokens - 1)) for _ in range(w.batch)]
    model = PPOModule(
        policy=PolicySpec(name_or_path=folder, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype]),
        reward=LengthReward(), lora=LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_modules=["q", "v"]),
        generation=GenerationSettings(max_new_tokens=w.response_tokens, min_new_tokens=w.response_tokens,
                                      temperature=1.0, top_k=0, top_p=1.0, do_sample=True),
        ppo=PPOSettings(ppo_epochs=ppo_epochs, mini_batch_size=w.batch), truncate_prompt_tokens=w.prompt_tokens,
        sampling_seed=0, log_samples_every_n_steps=0)
    model.configure_model()
    after_load = _rss_now_mib()
    load_peak = _rss_peak_mib()
    reset = _reset_peak()
    lengths = []
    original = model.ppo_iteration

    def recording(prompts_, optimizer, references=None):
        stats = original(prompts_, optimizer, references)
        lengths.append((float(stats["tokens/response_len_mean"]), float(stats["tokens/prompt_len_mean"])
                        if "tokens/prompt_len_mean" in stats else None))
        return stats

    model.ppo_iteration = recording
    loader = DataLoader(prompts, batch_size=w.batch, collate_fn=lambda rows: {"prompt": list(rows)})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    actor = model.actor
    return {
        "size": size, "dtype": dtype, "batch": w.batch, "prompt_tokens": w.prompt_tokens,
        "response_tokens": w.response_tokens, "lora_r": r, "ppo_epochs": ppo_epochs,
        "params_total": sum(p.numel() for p in actor.parameters()),
        "params_trainable": sum(p.numel() for p in actor.parameters() if p.requires_grad),
        "base_weight_dtype": str(next(actor.base_model.shared.parameters()).dtype),
        "lora_dtype": str(next(p for n, p in actor.named_parameters() if "lora_A" in n).dtype),
        "response_len_mean": lengths[0][0] if lengths else None,
        "baseline_mib": round(baseline, 1), "after_load_mib": round(after_load, 1),
        "load_peak_mib": round(load_peak, 1), "peak_reset": reset,
        "iteration_peak_mib": round(_rss_peak_mib(), 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def saved_activation_check(size: str, dtype: str, w: Workload, r: int = 32) -> dict:
    """Bytes autograd keeps for backward in one teacher-forced pass of the package's ``ActorCritic``
    (LoRA r on q,v, fused T5 path), counted by ``torch.autograd.graph.saved_tensors_hooks`` (each storage
    once, parameters left out), beside :func:`activation_bytes` without
    its logits part (the loss's tensors are made after the pass). A check of the per-layer count that
    needs no allocator: small workloads run in seconds."""
    import torch

    from flan_rlhf.policy import ActorCritic, LoraSettings, build_t5_from_config

    dims = FLAN_T5[size]
    model = build_t5_from_config(vocab_size=dims.vocab, d_model=dims.d_model, d_ff=dims.d_ff, num_layers=dims.num_layers,
                                 num_decoder_layers=dims.num_decoder_layers, num_heads=dims.num_heads, d_kv=dims.d_kv)
    actor = ActorCritic(model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]),
                        LoraSettings(r=r, alpha=2 * r, target_modules=["q", "v"]))
    input_ids = torch.randint(3, dims.vocab, (w.batch, w.prompt_tokens))
    decoder_input_ids = torch.randint(3, dims.vocab, (w.batch, w.response_tokens))
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        actor(input_ids, torch.ones_like(input_ids), decoder_input_ids)
    weights = {p.untyped_storage().data_ptr() for p in actor.parameters()}  # the stacked frozen weights too (views)
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    parts = activation_bytes(dims, w, dtype, True, ("q", "v"), r)
    formula = parts["total"] - parts["logits"]
    return {"size": size, "dtype": dtype, **asdict(w), "saved_mib": round(saved / MIB, 2),
            "formula_mib": round(formula / MIB, 2), "error_pct": round(100 * (formula - saved) / saved, 1)}


def compare(row: dict) -> dict:
    """A measured row with the formula's parts for its configuration (MiB) and the formula's error."""
    w = Workload(row["batch"], row["prompt_tokens"], row["response_tokens"])
    formula = formula_for_measurement(row["size"], row["dtype"], w, row["lora_r"])
    measured = row["iteration_peak_mib"] - row["baseline_mib"]
    return {**row, "measured_mib": round(measured, 1), "formula": formula,
            "error_pct": round(100 * (formula["peak"] - measured) / measured, 1)}


def comparison_table(rows: list[dict]) -> str:
    """Markdown: each measured configuration beside the formula."""
    lines = ["| size | weights | batch x prompt x new | measured MiB (iteration peak - after imports) | formula MiB | "
             "error | formula parts: weights + LoRA state + max(activations, sampling) |",
             "|---|---|---|---|---|---|---|"]
    for row in map(compare, rows):
        f = row["formula"]
        lines.append(f"| {row['size']} | {row['dtype']} | {row['batch']} x {row['prompt_tokens']} x {row['response_tokens']} | "
                     f"{row['measured_mib']:.0f} ({row['iteration_peak_mib']:.0f} - {row['baseline_mib']:.0f}) | "
                     f"{f['peak']:.0f} | {row['error_pct']:+.1f}% | {f['weights']:.0f} + "
                     f"{f['trainable_state']:.0f} + max({f['activations']:.0f}, {f['sampling']:.0f}) |")
    return "\n".join(lines)


def formula_for_measurement(size: str, dtype: str, w: Workload, r: int) -> dict:
    """The formula's parts for the measured configuration (flan-rlhf, LoRA q,v, no checkpointing),
    in MiB, and its prediction of the iteration's peak above the post-import baseline."""
    parts = system_memory("flan-rlhf LoRA q,v", FLAN_T5[size], dtype, w, r)
    return {k: round(v / MIB, 1) for k, v in parts.items()}


def measure(args) -> list[dict]:
    """Every (size, dtype) in a fresh subprocess; each row with the formula's figure and the error."""
    rows = []
    w = Workload(args.batch, args.prompt_tokens, args.response_tokens)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, __file__, "--prepare", size, folder], check=True)
            for dtype in args.dtypes:
                cmd = [sys.executable, __file__, "--measure-one", size, dtype, folder, "--batch", str(w.batch),
                       "--prompt-tokens", str(w.prompt_tokens), "--response-tokens", str(w.response_tokens),
                       "--lora-r", str(args.lora_r), "--ppo-epochs", str(args.ppo_epochs), "--threads", str(args.threads)]
                log("running:", " ".join(cmd[1:]))
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                row = compare(json.loads(out.strip().splitlines()[-1]))
                log(f"{size} {dtype}: measured {row['measured_mib']:.0f} MiB, formula {row['formula']['peak']:.0f} MiB, "
                    f"error {row['error_pct']:+.1f}%")
                rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true", help="print docs/memory.md's tables on paper (no model)")
    p.add_argument("--measure", action="store_true", help="measure peak RSS of one PPO iteration per size and dtype")
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=sorted(FLAN_T5))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPE_BYTES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=32)
    p.add_argument("--ppo-epochs", type=int, default=2,
                   help="minibatch passes of the iteration (2: the second backward runs with AdamW's state allocated)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", help="with --measure: also write the measured rows to this JSON file; "
                   "with --markdown: add the comparison table of the rows stored there")
    p.add_argument("--saved-tensors", nargs=2, metavar=("SIZE", "DTYPE"),
                   help="count the bytes autograd saves in one pass (at --batch/--prompt-tokens/--response-tokens) "
                        "against the activation formula")
    p.add_argument("--prepare", nargs=2, metavar=("SIZE", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--measure-one", nargs=3, metavar=("SIZE", "DTYPE", "FOLDER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    w = Workload(args.batch, args.prompt_tokens, args.response_tokens)
    if args.prepare:
        prepare_model(*args.prepare)
        return
    if args.measure_one:
        size, dtype, folder = args.measure_one
        print(json.dumps(measure_one(folder, size, dtype, w, args.lora_r, args.ppo_epochs, args.threads)), flush=True)
        return
    if args.saved_tensors:
        print(json.dumps(saved_activation_check(*args.saved_tensors, w, args.lora_r)), flush=True)
        return
    if args.markdown:
        print(markdown_tables(w, args.lora_r))
        if args.results:
            with open(args.results) as f:
                print("\n" + comparison_table(json.load(f)))
        return
    out = {"workload": asdict(w), "lora_r": args.lora_r, "paper": {
        name: {"params": t5_parameter_count(dims), **{
            f"{system}|{prec}|{'ckpt' if c else 'plain'}": (None if m is None else round(m["peak"] / GIB, 3))
            for system in SYSTEMS for prec in PRECISIONS for c in (False, True)
            for m in [system_memory(system, dims, prec, w, args.lora_r, c)]}}
        for name, dims in FLAN_T5.items()}}
    log(markdown_tables(w, args.lora_r))
    if args.measure:
        out["measured"] = measure(args)
        log(comparison_table(out["measured"]))
        if args.results:
            with open(args.results, "w") as f:
                json.dump([{k: v for k, v in row.items() if k not in ("formula", "measured_mib", "error_pct")}
                           for row in out["measured"]], f, indent=1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
