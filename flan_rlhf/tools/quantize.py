"""Int8 dynamic quantisation of a seq2seq model's Linear layers, and a folder format to ship it.

Dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) stores each ``nn.Linear``
weight as int8 with a scale and zero point and quantises the activations on the fly, per
batch; matmuls run in int8 (fbgemm/x86 or qnnpack kernels). It needs no calibration data and
is meant for CPU serving. Embeddings, layer norms and attention biases stay float32.

Plain ``transformers`` cannot load such a model, so the folder written by :func:`save_int8`
holds ``config.json`` + ``generation_config.json`` + the tokenizer (readable by transformers),
plus :data:`INT8_WEIGHTS` (safetensors: raw int8 weights, scales, zero points and the float
tensors) and :data:`INT8_MARKER` (json: which modules are quantised and how). :func:`load_int8`
rebuilds the model on the ``meta`` device (no random init), swaps in quantised Linear modules
and fills every tensor from the file. No pickle is involved anywhere.

Note: ``torch.ao.quantization`` is deprecated upstream in favour of ``torchao`` but still
ships and works in torch 2.13; its deprecation warnings are silenced here.
"""
from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Iterable

import torch
from torch import nn

INT8_MARKER = "flan_rlhf_int8.json"
INT8_WEIGHTS = "model_int8.safetensors"
INT8_FORMAT = "flan-rlhf-int8-dynamic"
INT8_FORMAT_VERSION = 1

_WEIGHT_INT8 = ".weight_int8"
_WEIGHT_SCALE = ".weight_scale"
_WEIGHT_ZERO_POINT = ".weight_zero_point"
_BIAS = ".bias"


@contextmanager
def _quiet_quantization_warnings():
    """Silence torch.ao's deprecation notices (see module docstring) and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*deprecated.*")
        yield


def _dynamic_linear_class():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return DynamicQuantizedLinear


def is_int8_folder(folder: str) -> bool:
    """Whether ``folder`` holds an int8 export written by :func:`save_int8`."""
    return os.path.isfile(os.path.join(folder, INT8_MARKER))


def quantize_int8(model: nn.Module, per_channel: bool = False, skip: Iterable[str] = ()) -> nn.Module:
    """Int8 dynamic quantisation of every ``nn.Linear`` (a copy; ``model`` is unchanged).

    Args:
        model: a float32 HF model (merged: no LoRA layers left).
        per_channel: one scale per output row instead of one per matrix (usually closer to
            the float model, same speed).
        skip: names of Linear modules to keep in float32 (e.g. ``["lm_head"]``).

    Returns:
        The quantised copy, in eval mode.

    Raises:
        ValueError: the model holds non-float32 weights or LoRA layers.
    """
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    wrong = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"int8 quantisation needs float32 weights, got {', '.join(wrong)} - quantise the fp32 model, not a bf16/fp16 one")
    if any("lora_" in name for name, _ in model.named_modules()):
        raise ValueError("model still holds LoRA layers - merge them first (flan_rlhf.policy.merged_model or merge_and_unload())")
    skip = set(skip)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    spec = {name: qconfig for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in skip}
    if not spec:
        raise ValueError("model has no nn.Linear layers to quantise")
    with _quiet_quantization_warnings():
        quantized = quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=False)
    return quantized.eval()


def _qscheme_name(qweight: torch.Tensor) -> str:
    scheme = qweight.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return "per_tensor_affine"
    if scheme in (torch.per_channel_affine, torch.per_channel_symmetric):
        return "per_channel_affine"
    raise ValueError(f"unsupported weight qscheme {scheme}")


def int8_state(quantized: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors and a manifest that describe a :func:`quantize_int8` model completely.

    Returns:
        tensors: for each quantised Linear ``name``: ``name.weight_int8`` (int8, shape
            ``(out, in)``), ``name.weight_scale`` (float64, shape ``()`` or ``(out,)``),
            ``name.weight_zero_point`` (int64, same shape) and ``name.bias`` (float32, ``(out,)``)
            if it has one; then every float parameter and buffer under its first name.
        manifest: ``{"quantized": {name: {"qscheme", "axis", "bias", "in_features",
            "out_features"}}, "aliases": {second_name: first_name}}`` (tied weights).
    """
    qlinear_cls = _dynamic_linear_class()
    tensors: dict[str, torch.Tensor] = {}
    quantized_modules: dict[str, dict[str, Any]] = {}
    for name, module in quantized.named_modules():
        if not isinstance(module, qlinear_cls):
            continue
        qweight, bias = module.weight(), module.bias()
        scheme = _qscheme_name(qweight)
        tensors[name + _WEIGHT_INT8] = qweight.int_repr().contiguous()
        if scheme == "per_tensor_affine":
            tensors[name + _WEIGHT_SCALE] = torch.tensor(qweight.q_scale(), dtype=torch.float64)
            tensors[name + _WEIGHT_ZERO_POINT] = torch.tensor(qweight.q_zero_point(), dtype=torch.int64)
            axis = None
        else:
            tensors[name + _WEIGHT_SCALE] = qweight.q_per_channel_scales().to(torch.float64).contiguous()
            tensors[name + _WEIGHT_ZERO_POINT] = qweight.q_per_channel_zero_points().to(torch.int64).contiguous()
            axis = int(qweight.q_per_channel_axis())
        if bias is not None:
            tensors[name + _BIAS] = bias.detach().float().contiguous()
        quantized_modules[name] = {
            "qscheme": scheme, "axis": axis, "bias": bias is not None,
            "in_features": int(module.in_features), "out_features": int(module.out_features),
        }
    aliases: dict[str, str] = {}
    first_name_of: dict[tuple, str] = {}
    floats = list(quantized.named_parameters(remove_duplicate=False)) + list(quantized.named_buffers(remove_duplicate=False))
    for name, tensor in floats:
        # Tied weights (T5: shared / encoder.embed_tokens / decoder.embed_tokens) are stored once.
        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in first_name_of:
            aliases[name] = first_name_of[key]
            continue
        first_name_of[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, {"quantized": quantized_modules, "aliases": aliases}


def save_int8(quantized: nn.Module, folder: str, tokenizer=None, info: dict[str, Any] | None = None) -> None:
    """Write a :func:`quantize_int8` model into an existing, empty ``folder`` (the caller makes
    it atomic). Files: config, generation config, tokenizer, :data:`INT8_WEIGHTS`, :data:`INT8_MARKER`."""
    from safetensors.torch import save_file

    tensors, manifest = int8_state(quantized)
    save_file(tensors, os.path.join(folder, INT8_WEIGHTS), metadata={"format": INT8_FORMAT})
    quantized.config.save_pretrained(folder)
    generation_config = getattr(quantized, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    marker = {
        "format": INT8_FORMAT,
        "version": INT8_FORMAT_VERSION,
        "weights": INT8_WEIGHTS,
        "engine_at_export": torch.backends.quantized.engine,
        "torch_version": torch.__version__,
        **manifest,
        "info": info or {},
    }
    with open(os.path.join(folder, INT8_MARKER), "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)


def _read_marker(folder: str) -> dict[str, Any]:
    marker_path = os.path.join(folder, INT8_MARKER)
    if not os.path.isfile(marker_path):
        raise FileNotFoundError(f"'{folder}' is not an int8 export (no {INT8_MARKER}) - write one with `flan-rlhf export --format int8`")
    with open(marker_path, encoding="utf-8") as handle:
        try:
            marker = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{marker_path} is not valid JSON ({err}) - re-run `flan-rlhf export --format int8`") from err
    if marker.get("format") != INT8_FORMAT or marker.get("version") != INT8_FORMAT_VERSION:
        raise ValueError(
            f"{marker_path} holds format {marker.get('format')!r} v{marker.get('version')}, this flan-rlhf reads "
            f"{INT8_FORMAT!r} v{INT8_FORMAT_VERSION} - re-export with this version"
        )
    return marker


def _requantize(int_repr: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qscheme: str,
                axis: int | None) -> torch.Tensor:
    """The qint8 tensor with integer values ``int_repr`` (int8) through the public quantize functions.

    ``(q - zero_point) * scale`` is re-quantised with the same scale and zero point: ``|q - zp| <= 255``,
    so ``x / scale`` lands within float rounding of an integer and rounds back to ``q`` exactly.
    ``scale``/``zero_point``: 0-dim (per tensor) or ``(out,)`` (per channel along ``axis``).
    """
    integers = int_repr.to(torch.float64)
    if qscheme == "per_tensor_affine":
        floats = ((integers - float(zero_point)) * float(scale)).float()
        return torch.quantize_per_tensor(floats, float(scale), int(zero_point), torch.qint8)
    shape = [1] * int_repr.dim()
    shape[int(axis)] = -1
    floats = ((integers - zero_point.view(shape).to(torch.float64)) * scale.view(shape)).float()
    return torch.quantize_per_channel(floats, scale.to(torch.float64), zero_point.to(torch.int64), int(axis), torch.qint8)


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` (e.g. ``encoder.block.0.layer.0.layer_norm.weight``)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in dict(module.named_parameters(recurse=False)):
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))
    elif leaf in dict(module.named_buffers(recurse=False)):
        setattr(module, leaf, tensor)  # nn.Module.__setattr__ keeps a registered buffer a buffer
    else:
        raise ValueError(f"int8 weights name '{name}', which this model config does not have - the folder's config.json and weights disagree")


def load_int8(folder: str) -> nn.Module:
    """Load an int8 export written by :func:`save_int8` (``flan-rlhf export --format int8``).

    Returns:
        The quantised HF encoder-decoder in eval mode, ready for ``generate``.

    Raises:
        FileNotFoundError / ValueError: not an int8 folder, missing files, or weights that do not
            match the config (each with a one-line fix).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, GenerationConfig

    marker = _read_marker(folder)
    weights_path = os.path.join(folder, marker.get("weights", INT8_WEIGHTS))
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"int8 export '{folder}' has no {os.path.basename(weights_path)} - re-run `flan-rlhf export --format int8`")
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # the structure only; every tensor is filled from the file below
        model = AutoModelForSeq2SeqLM.from_config(config)
    tensors = load_file(weights_path)
    qlinear_cls = _dynamic_linear_class()
    with _quiet_quantization_warnings():
        for name, spec in marker["quantized"].items():
            int_repr = tensors.pop(name + _WEIGHT_INT8)
            scale = tensors.pop(name + _WEIGHT_SCALE)
            zero_point = tensors.pop(name + _WEIGHT_ZERO_POINT)
            bias = tensors.pop(name + _BIAS) if spec["bias"] else None
            qweight = _requantize(int_repr, scale, zero_point, spec["qscheme"], spec.get("axis"))
            module = qlinear_cls(spec["in_features"], spec["out_features"], bias_=spec["bias"], dtype=torch.qint8)
            module.set_weight_bias(qweight, bias)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module)
    for name, tensor in tensors.items():
        _set_tensor(model, name, tensor)
    for alias, source in marker["aliases"].items():
        _set_tensor(model, alias, tensors[source])
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left_on_meta:
        raise ValueError(f"int8 export '{folder}' lacks {len(left_on_meta)} tensors (e.g. {left_on_meta[:2]}) - re-run `flan-rlhf export --format int8`")
    if os.path.isfile(os.path.join(folder, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
