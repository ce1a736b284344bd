"""The seq2seq actor-critic: a Hugging Face encoder-decoder with LoRA adapters and a value head.

* Loading: any encoder-decoder by hub name or local folder (``from_pretrained``), or a FLAN-T5
  architecture (T5 v1.1: gated-GELU, untied embeddings) built from a config with no files.
* Reference policy: under LoRA, the same weights with the adapters disabled (peft's
  ``disable_adapter()``), so no second copy is held in memory; under full fine-tuning, a frozen
  deep copy.
* Value head: ``Linear(d_model, 1)`` on the decoder's last hidden state (after the final layer
  norm), as TRL's ``AutoModelForSeq2SeqLMWithValueHead`` did.
* QLoRA (``PolicySpec.quantization``): the frozen base loaded in 4 or 8 bits by bitsandbytes
  through transformers' ``quantization_config``, the LoRA adapters and the value head in float32;
  the reference is still the base with the adapters off, so the one copy of the weights is the
  quantised one. Exports rebuild the policy on the full-precision base (docs/scaling.md).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from flan_rlhf.quiet import library_progress_bars_off
from flan_rlhf.t5_fused import encode_prompts, fused_decode, fused_forward
from flan_rlhf.tokens import PromptTokenLimit

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the fix."""


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft ``LoraConfig``).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator; the update is scaled by ``alpha / r``.
        dropout: dropout on the adapter input. 0 by default: dropout during PPO makes the
            log-probs of the rollout and of the update disagree, so the first ratio is not 1.
        target_modules: module names to adapt (``q``, ``k``, ``v``, ``o`` for T5 attention).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])


@dataclass
class PolicySpec:
    """Where the policy's weights and tokenizer come from.

    Attributes:
        name_or_path: hub id (``google/flan-t5-base``) or local folder of a HF encoder-decoder.
            ``None`` builds a FLAN-T5-architecture model from ``t5_config``.
        tokenizer: hub id or folder of the tokenizer; ``"byt5"`` is ``ByT5Tokenizer()`` (needs no
            files); ``None`` means the same as ``name_or_path``.
        t5_config: keyword arguments of :func:`build_t5_from_config` (used when
            ``name_or_path`` is ``None``).
        trust_remote_code: allow model code from the hub. Off: remote code runs with your rights.
        dtype: weights dtype when loading (``float32``, ``bfloat16``, ``float16``); ``None`` keeps
            the checkpoint's. Mixed precision is the Trainer's ``precision`` setting.
        quantization: QLoRA: load the frozen base in ``4bit`` (bitsandbytes ``Linear4bit``) or
            ``8bit`` (LLM.int8(), ``Linear8bitLt``); the LoRA adapters and the value head stay
            float32 and the reference is the same quantised base with the adapters off. Needs
            ``name_or_path``, LoRA and ``pip install 'flan-rlhf[qlora]'``. ``None``: full precision.
            Exports rebuild the policy on the full-precision base.
        quant_type: 4-bit data type: ``nf4`` (NormalFloat, the QLoRA paper's) or ``fp4``.
        quant_double: 4-bit: quantise the quantisation constants too (QLoRA's double
            quantisation, ~0.4 bit less per weight).
        quant_compute_dtype: 4-bit: the dtype the dequantised weights multiply in; ``None`` is
            ``bfloat16`` on a GPU that has it, else ``float32``.
    """

    name_or_path: str | None = None
    tokenizer: str | None = None
    t5_config: dict[str, Any] | None = None
    trust_remote_code: bool = False
    dtype: str | None = None
    quantization: Literal["4bit", "8bit"] | None = None
    quant_type: Literal["nf4", "fp4"] = "nf4"
    quant_double: bool = True
    quant_compute_dtype: Literal["bfloat16", "float16", "float32"] | None = None


#: the oldest bitsandbytes transformers 5 quantises with (its ``BITSANDBYTES_MIN_VERSION``), which is
#: also the first line whose 4-/8-bit layers run on CPU as well (bitsandbytes PR #1602, in 0.46)
BITSANDBYTES_MIN_VERSION = "0.46.1"
QLORA_INSTALL = "pip install 'flan-rlhf[qlora]'"
_QUANTIZATION_CHOICES = {"quantization": (None, "4bit", "8bit"), "quant_type": ("nf4", "fp4"),
                         "quant_compute_dtype": (None, "bfloat16", "float16", "float32")}


def quantization_problem(spec: PolicySpec) -> str | None:
    """One line naming what stops ``spec.quantization`` and the fix, or ``None`` (also for no quantisation).

    Cheap (no import of bitsandbytes), so the CLI runs it before anything loads: an unknown value, a
    base built from ``t5_config`` (no checkpoint to quantise), bitsandbytes missing or too old.
    """
    for key, choices in _QUANTIZATION_CHOICES.items():
        value = getattr(spec, key, None)
        if value not in choices:
            names = ", ".join("null" if choice is None else repr(choice) for choice in choices)
            return f"policy.{key} is {value!r} - use one of {names}"
    if getattr(spec, "quantization", None) is None:
        return None
    if spec.name_or_path is None:
        return (f"policy.quantization {spec.quantization} needs a checkpoint to quantise, and a policy built from "
                "t5_config has none - set policy.name_or_path (a hub id or folder), or drop policy.quantization")
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        return f"policy.quantization {spec.quantization} needs bitsandbytes, which is not installed - {QLORA_INSTALL}"
    if Version(installed) < Version(BITSANDBYTES_MIN_VERSION):
        return (f"policy.quantization {spec.quantization} needs bitsandbytes >= {BITSANDBYTES_MIN_VERSION}, "
                f"found {installed} - {QLORA_INSTALL}")
    return None


def check_quantization(spec: PolicySpec, lora: LoraSettings | None) -> None:
    """Refuse a quantised base that cannot be trained, before any weights load.

    Raises:
        ModelLoadError: :func:`quantization_problem`, or a quantised base without LoRA (its frozen
            4-/8-bit weights cannot be fine-tuned themselves).
    """
    problem = quantization_problem(spec)
    if problem is None and getattr(spec, "quantization", None) is not None and lora is None:
        problem = (f"policy.quantization {spec.quantization} freezes the base in {spec.quantization} and "
                   "`lora: null` would train those frozen weights - set lora (adapters train over a quantised "
                   "base), or drop policy.quantization for full fine-tuning")
    if problem is not None:
        raise ModelLoadError(problem)


def bitsandbytes_config(spec: PolicySpec):
    """transformers' ``BitsAndBytesConfig`` of ``spec.quantization`` (see :class:`PolicySpec`)."""
    from transformers import BitsAndBytesConfig

    if spec.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = spec.quant_compute_dtype or (
        "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=spec.quant_type,
                              bnb_4bit_use_double_quant=spec.quant_double,
                              bnb_4bit_compute_dtype=getattr(torch, compute))


def quantized_device_map() -> dict[str, Any]:
    """Where a quantised model is loaded: this process's GPU, else the CPU.

    bitsandbytes quantises while the weights load onto their device, so the model must be loaded
    where it trains. Lightning sets each process's GPU (``torch.cuda.set_device`` in
    ``CUDAAccelerator.setup_device``) before it calls ``configure_model``, so
    ``torch.cuda.current_device()`` is local rank's GPU under DDP too (the ``device_map={"":
    local_rank}`` of transformers' and peft's multi-GPU QLoRA recipes); Lightning's later
    ``.to(root_device)`` then moves nothing.
    """
    return {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (a HF model, or peft's wrapper of one) was loaded with bitsandbytes quantisation."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_base(model: nn.Module) -> nn.Module:
    """Freeze a quantised base and cast its non-quantised float16/bfloat16 weights (layer norms,
    embeddings, the head) to float32, in place: peft's ``prepare_model_for_kbit_training`` without
    its gradient-checkpointing part (its input-gradient hook is needed only by reentrant
    checkpointing, and :func:`enable_activation_checkpointing` is non-reentrant, as peft's own
    comment there says).

    Also turns off bitsandbytes' CPU inference repacking of 4-bit weights: on a CPU with
    AVX512-BF16, ``Linear4bit.forward`` in eval mode under ``no_grad`` (a validation, a reference
    pass) repacks its weight for ``gemv_4bit`` for good, and every later forward, training ones
    included, then runs ``gemv_4bit``, which has no autograd kernel: the LoRA gradients came out
    ``None`` with only a torch warning (bitsandbytes 0.50.2, measured in tests/test_qlora.py).
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit (private attribute)
            module.support_avx512bf16_for_cpu = False
    return model


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Load a tokenizer; ``"byt5"`` builds ``ByT5Tokenizer()`` with no files."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name_or_path == "byt5":
        return ByT5Tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint("tokenizer", name_or_path, err)) from err


def _load_hint(what: str, name_or_path: str, err: Exception) -> str:
    """One line that names what failed and how to fix it."""
    if os.path.isdir(name_or_path):
        return (
            f"cannot load {what} from folder '{name_or_path}': {str(err).splitlines()[0]} "
            f"- point it at a folder written by save_pretrained() of a Hugging Face encoder-decoder"
        )
    if os.path.exists(name_or_path):
        return f"{what} path '{name_or_path}' is a file, not a model folder - pass the folder that holds config.json"
    return (
        f"cannot load {what} '{name_or_path}': not a local folder and not reachable on the Hugging Face Hub "
        f"(offline or unknown name) - check the name, or download it on a connected machine with "
        f"`hf download {name_or_path} --local-dir DIR` and pass DIR"
    )


def load_seq2seq_model(name_or_path: str, trust_remote_code: bool = False, dtype: str | None = None,
                       quantization_config: Any = None):
    """``AutoModelForSeq2SeqLM.from_pretrained`` with errors that say what to do.

    Args:
        quantization_config: a ``BitsAndBytesConfig`` (:func:`bitsandbytes_config`): the model is
            quantised while it loads, onto :func:`quantized_device_map`.

    Raises:
        ModelLoadError: offline and not cached, unknown name, or a folder that does not hold an
            encoder-decoder (e.g. a causal LM or a classifier); bitsandbytes that cannot run here.
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint("model", name_or_path, err)) from err
    if not getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(
            f"model '{name_or_path}' is a {config.model_type} model, not an encoder-decoder - "
            f"flan-rlhf trains seq2seq models such as google/flan-t5-base; pass one of those"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=quantized_device_map())
    try:
        with library_progress_bars_off():
            return AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_load_hint("model", name_or_path, err)) from err
    except (ImportError, RuntimeError) as err:  # transformers' bitsandbytes checks (version, backend of this device)
        if quantization_config is None or "bitsandbytes" not in str(err):
            raise
        raise ModelLoadError(f"cannot quantise '{name_or_path}' with bitsandbytes here: {str(err).splitlines()[0]} "
                             f"- {QLORA_INSTALL} on a machine bitsandbytes supports, or drop policy.quantization") from err


def build_t5_from_config(
    vocab_size: int,
    d_model: int = 128,
    d_ff: int = 256,
    num_layers: int = 2,
    num_decoder_layers: int | None = None,
    num_heads: int = 4,
    d_kv: int | None = None,
    dropout_rate: float = 0.0,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
    decoder_start_token_id: int = 0,
    seed: int = 0,
):
    """A randomly initialised FLAN-T5-architecture model (T5 v1.1: gated-GELU, untied embeddings).

    The untied ``lm_head`` is initialised with std ``d_model**-0.5`` instead of HF's 1.0:
    with std 1 the initial logits have std ~sqrt(d_model) and the first cross-entropy is ~40
    (measured on the demo); scaled, it starts near ``log(vocab_size)``.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=d_ff,
        d_kv=d_kv or d_model // num_heads,
        num_layers=num_layers,
        num_decoder_layers=num_decoder_layers or num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=dropout_rate,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        decoder_start_token_id=decoder_start_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeds this build only; the caller's CPU RNG stream is kept
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(config)
        # transformers 5 T5 ties lm_head to the input embedding whatever the config says (it only
        # reads tie_word_embeddings=False as "don't scale decoder outputs"). FLAN-T5 is untied,
        # so give the head its own weights; from_pretrained keeps them apart when both differ.
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.shared.weight).normal_(mean=0.0, std=d_model**-0.5))
    model.config.tie_word_embeddings = False
    return model


def load_policy_tokenizer(spec: PolicySpec):
    """The policy's tokenizer (right padding, as T5 expects) from a :class:`PolicySpec`."""
    if spec.name_or_path is None and spec.t5_config is None:
        raise ModelLoadError("policy needs either name_or_path (hub id or folder) or t5_config - set one of them")
    tok_name = spec.tokenizer or spec.name_or_path
    if tok_name is None:
        raise ModelLoadError("a policy built from t5_config needs `tokenizer` (a folder, a hub id, or 'byt5')")
    tokenizer = load_tokenizer(tok_name, spec.trust_remote_code)
    tokenizer.padding_side = "right"  # T5 was trained with right padding (TRL PR #262: left padding broke T5)
    return tokenizer


def load_policy_model(spec: PolicySpec, tokenizer: Any = None):
    """Build or load ``(model, tokenizer)`` from a :class:`PolicySpec`.

    Args:
        tokenizer: the spec's tokenizer when already loaded (:func:`load_policy_tokenizer`).

    Returns:
        model: a HF encoder-decoder (``PreTrainedModel``); with ``spec.quantization``, quantised,
            frozen and prepared for adapters (:func:`prepare_quantized_base`).
        tokenizer: its tokenizer (right padding, as T5 expects).

    Raises:
        ModelLoadError: :func:`quantization_problem`, and what :func:`load_seq2seq_model` raises.
    """
    problem = quantization_problem(spec)
    if problem is not None:
        raise ModelLoadError(problem)
    if tokenizer is None:
        tokenizer = load_policy_tokenizer(spec)
    if getattr(spec, "quantization", None) is not None:
        model = load_seq2seq_model(spec.name_or_path, spec.trust_remote_code, spec.dtype, bitsandbytes_config(spec))
        model = prepare_quantized_base(model)
    elif spec.name_or_path is not None:
        model = load_seq2seq_model(spec.name_or_path, spec.trust_remote_code, spec.dtype)
    else:
        cfg = dict(spec.t5_config or {})
        cfg.setdefault("vocab_size", len(tokenizer))
        cfg.setdefault("pad_token_id", tokenizer.pad_token_id)
        cfg.setdefault("eos_token_id", tokenizer.eos_token_id)
        cfg.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
        model = build_t5_from_config(**cfg)
    return model, tokenizer


class PromptLimitOfPolicy:
    """Mixin for a LightningModule with ``policy_spec``, ``tokenizer`` and ``truncate_prompt_tokens``.

    :meth:`prompt_token_limit` hands the module's prompt-token cap and tokenizer to the data module
    (:meth:`flan_rlhf.data.PromptDataModule.follow_model`), which then cuts the inserted text of a
    long prompt instead of letting the tokenizer cut the prompt's end (the template's tail).
    """

    def prompt_token_limit(self) -> PromptTokenLimit:
        """The cap and the policy's tokenizer (loaded here when ``configure_model`` has not run yet)."""
        if self.tokenizer is None:
            self.tokenizer = load_policy_tokenizer(self.policy_spec)
        return PromptTokenLimit(self.tokenizer, int(self.truncate_prompt_tokens))


def hidden_size(model) -> int:
    """The decoder hidden size of a HF encoder-decoder config."""
    config = model.config
    return int(getattr(config, "d_model", None) or config.hidden_size)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation (gradient) checkpointing of a HF model, under transformers 5's
    name for it (``activation_checkpointing_enable``; the old name warns) or 4's."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Turn activation checkpointing off if it is on, under either transformers name (as above)."""
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def _is_dropout_setting(name: str, value: object) -> bool:
    # "dropout", "dropout_rate", "attention_dropout", "activation_dropout", "encoder_layerdrop", ...
    return isinstance(value, float) and ("dropout" in name or "layerdrop" in name)


def disable_dropout(module: nn.Module) -> None:
    """Set every dropout probability to 0 (N implementation details of RLHF, #6: dropout off in
    policy, reference and critic so rollout and update log-probs agree), in train mode too.

    Covers ``nn.Dropout`` modules, the float probabilities HF layers pass to functional dropout
    (T5Attention's ``dropout``, BART's ``dropout``/``activation_dropout``, LayerDrop's
    ``layerdrop``) and the config's, so a model rebuilt from its config has none either.
    """
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        for name, value in list(vars(sub).items()):
            if _is_dropout_setting(name, value):
                setattr(sub, name, 0.0)
    config = getattr(module, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if _is_dropout_setting(name, value):
                setattr(config, name, 0.0)


class ActorCritic(nn.Module):
    """Policy (a seq2seq LM, optionally with LoRA), value head, and the frozen reference.

    Args:
        model: a HF encoder-decoder (``PreTrainedModel``).
        lora: adapter settings, or ``None`` for full fine-tuning (a frozen deep copy then
            serves as reference; refused for a quantised ``model``).
        gradient_checkpointing: recompute activations in backward to save memory.
        with_value_head: build the value head (PPO's critic); critic-free methods (RLOO, GRPO)
            pass ``False`` and ``value_head`` is ``None``.
    """

    def __init__(self, model: nn.Module, lora: LoraSettings | None = None, gradient_checkpointing: bool = False,
                 with_value_head: bool = True):
        super().__init__()
        if lora is None and is_quantized(model):
            raise ModelLoadError("a quantised base (policy.quantization) cannot be fully fine-tuned: its 4-/8-bit "
                                 "weights are frozen - set lora, or load the base without policy.quantization")
        disable_dropout(model)
        # from_pretrained returns eval mode and Lightning keeps submodules' modes as found; HF's
        # gradient checkpointing runs only in train mode, which with every dropout at 0 computes
        # what eval mode does.
        model.train()
        self.uses_lora = lora is not None
        if lora is not None:
            from peft import LoraConfig, TaskType, get_peft_model

            for p in model.parameters():
                p.requires_grad_(False)
            peft_config = LoraConfig(
                task_type=TaskType.SEQ_2_SEQ_LM,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
            )
            self.policy = get_peft_model(model, peft_config)
            self.frozen_reference = None
        else:
            # Full fine-tuning: the reference is a frozen copy (costs one more model in memory).
            reference = copy.deepcopy(model)
            for p in reference.parameters():
                p.requires_grad_(False)
            reference.eval()
            self.policy = model
            # Kept out of the module tree's parameters list via a plain attribute would break
            # device moves; register it but exclude it from checkpoints in OnPolicyModule.
            self.frozen_reference = reference
        self.gradient_checkpointing = gradient_checkpointing
        if gradient_checkpointing:
            base = self.policy.get_base_model() if self.uses_lora else self.policy
            enable_activation_checkpointing(base)
            base.config.use_cache = False
        self.value_head: nn.Linear | None = None
        if with_value_head:
            self.value_head = nn.Linear(hidden_size(model), 1)
            # Small init keeps the first value estimates near 0 (TRL ValueHead uses default Linear init + dropout).
            nn.init.normal_(self.value_head.weight, std=hidden_size(model) ** -0.5 * 0.1)
            nn.init.zeros_(self.value_head.bias)

    @property
    def base_model(self) -> nn.Module:
        """The underlying HF model (LoRA layers included, peft wrapper removed)."""
        return self.policy.get_base_model() if self.uses_lora else self.policy

    @property
    def vocab_size(self) -> int:
        """Number of logits the policy produces per position (its output layer's width)."""
        head = self.base_model.get_output_embeddings()
        return head.out_features if head is not None else self.base_model.config.vocab_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass of the policy and value head.

        Args:
            input_ids: prompt tokens, shape ``(batch, prompt_len)``, right-padded.
            attention_mask: shape ``(batch, prompt_len)``.
            decoder_input_ids: ``[decoder_start] + response[:-1]``, shape ``(batch, response_len)``
                (causal decoder: positions after a row's EOS do not change the ones before it).

        Returns:
            logits: shape ``(batch, response_len, vocab)``, float32.
            values: shape ``(batch, response_len)``, float32; ``None`` without a value head.
        """
        hidden, logits = self._teacher_forced(self.policy, input_ids, attention_mask, decoder_input_ids)
        if self.value_head is None:
            return logits.float(), None
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits.float(), values.float()

    def _teacher_forced(self, model, input_ids, attention_mask, decoder_input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(decoder output after the final norm, logits)`` of ``model`` (the policy or the frozen
        copy): T5-family models take the fused path (the same arithmetic in fewer ops,
        :mod:`flan_rlhf.t5_fused`, equality tested), anything else its own ``forward``."""
        if not self.gradient_checkpointing:
            base = model.get_base_model() if self.uses_lora and model is self.policy else model
            fused = fused_forward(base, input_ids, attention_mask, decoder_input_ids)
            if fused is not None:
                return fused
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        return out.decoder_hidden_states[-1], out.logits

    def shared_prompt_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             decoder_input_ids: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """Logits of ``copies`` responses per prompt with one encoder pass per prompt (DPO's chosen and rejected).

        Args:
            input_ids, attention_mask: ``(batch, prompt_len)``, right-padded prompts.
            decoder_input_ids: ``(copies * batch, response_len)``; row ``c * batch + i`` answers prompt ``i``.
            reference: the reference policy (adapters off, or the frozen copy), under ``no_grad``.
        Returns:
            ``(copies * batch, response_len, vocab)``, float32; with ``reference=False`` the
            encoder's gradient collects every copy's.
        """
        batch = input_ids.shape[0]
        if decoder_input_ids.shape[0] % batch:
            raise ValueError(f"{decoder_input_ids.shape[0]} decoder rows are not a whole number of copies of "
                             f"{batch} prompts")
        copies = decoder_input_ids.shape[0] // batch
        model = self.frozen_reference if reference and self.frozen_reference is not None else self.policy
        base = model.get_base_model() if self.uses_lora and model is self.policy else model
        with self.reference_context() if reference else nullcontext(), torch.no_grad() if reference else nullcontext():
            if self.gradient_checkpointing:
                encoder_hidden = base.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                    return_dict=True).last_hidden_state
            else:
                encoder_hidden = encode_prompts(base, input_ids, attention_mask)
            encoder_hidden = encoder_hidden.repeat(copies, 1, 1)
            attention_mask = attention_mask.repeat(copies, 1)
            fused = None if self.gradient_checkpointing else fused_decode(base, encoder_hidden, attention_mask,
                                                                           decoder_input_ids)
            if fused is not None:
                return fused[1].float()
            from transformers.modeling_outputs import BaseModelOutput

            out = base(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden), attention_mask=attention_mask,
                       decoder_input_ids=decoder_input_ids, use_cache=False, return_dict=True)
            return out.logits.float()

    def reference_context(self):
        """Context under which ``self.policy`` computes the reference policy (LoRA: adapters off)."""
        return self.policy.disable_adapter() if self.uses_lora else nullcontext()

    @torch.no_grad()
    def reference_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Logits of the frozen reference policy, shape ``(batch, response_len, vocab)``, float32."""
        model = self.frozen_reference if self.frozen_reference is not None else self.policy
        with self.reference_context():
            _, logits = self._teacher_forced(model, input_ids, attention_mask, decoder_input_ids)
        return logits.float()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: LoRA weights (or all policy weights) and the value head."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}


BASE_SUBFOLDER = "base"  # where an adapter's base built from t5_config is saved, inside the adapter folder


def save_adapter(actor: ActorCritic, tokenizer, out_dir: str, final_dir: str | None = None) -> str:
    """Write the trained policy into the folder ``out_dir`` (created if missing).

    Callers that replace a folder write through :func:`flan_rlhf.output_dirs.atomic_output_dir`
    into a temporary ``out_dir`` renamed to ``final_dir`` afterwards. LoRA: ``adapter_config.json``
    + ``adapter_model.safetensors``, whose ``base_model_name_or_path`` loads from any folder
    (:func:`portable_base_name`); a base built from ``t5_config`` exists nowhere else, so it is
    saved in ``base/`` beside the adapter. Full fine-tuning: a whole HF model folder. Both:
    the tokenizer, and ``value_head.safetensors`` when the actor has a value head (PPO).
    """
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    actor.policy.save_pretrained(out_dir, safe_serialization=True)
    if actor.value_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in actor.value_head.state_dict().items()},
                  os.path.join(out_dir, "value_head.safetensors"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "adapter_config.json")
    if actor.uses_lora and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            adapter_config = json.load(handle)
        recorded = adapter_config.get("base_model_name_or_path")
        if not recorded:  # built from t5_config: the base itself goes beside the adapter
            base = copy.deepcopy(actor.policy).unload()  # peft: the LoRA layers out, base weights untouched
            with library_progress_bars_off():  # no "Writing model shards" bar for one small file
                base.save_pretrained(os.path.join(out_dir, BASE_SUBFOLDER), safe_serialization=True)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(os.path.join(out_dir, BASE_SUBFOLDER))
            del base
        adapter_config["base_model_name_or_path"] = portable_base_name(recorded, final_dir or out_dir)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(adapter_config, handle, indent=2, sort_keys=True)
    return out_dir


def portable_base_name(recorded: str | None, adapter_dir: str) -> str:
    """The ``base_model_name_or_path`` an adapter in ``adapter_dir`` should record so it loads from anywhere.

    A local folder (``artifacts/demo/sft_model``, relative to where training ran) becomes its
    absolute path; a hub id (``google/flan-t5-base``, no such local folder) stays as it is; no base
    (built from ``t5_config``) becomes the absolute path of ``adapter_dir/base``, where
    :func:`save_adapter` saves it. Examples: ``portable_base_name("google/flan-t5-base", "/x") ==
    "google/flan-t5-base"``; ``portable_base_name(None, "/runs/adapter") == "/runs/adapter/base"``.
    """
    if not recorded:
        return os.path.join(os.path.abspath(adapter_dir), BASE_SUBFOLDER)
    return os.path.abspath(recorded) if os.path.isdir(recorded) else recorded


@torch.no_grad()
def merged_model(actor: ActorCritic):
    """A plain HF model with LoRA merged into the base weights (a copy; ``actor`` is unchanged).

    Raises:
        ModelLoadError: a quantised base: peft would merge into 4-/8-bit weights and quantise the
            sum again; :func:`flan_rlhf.tools.export.actor_from_checkpoint` rebuilds the policy on
            the full-precision base to merge there.
    """
    if is_quantized(actor.policy):
        raise ModelLoadError("will not merge LoRA into a quantised base (the sum would be quantised again) - "
                             "rebuild the policy on the full-precision base: flan-rlhf export --ckpt_path CKPT")
    if not actor.uses_lora:
        return copy.deepcopy(actor.policy)
    return copy.deepcopy(actor.policy).merge_and_unload()
