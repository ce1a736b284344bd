"""``flan-rlhf export``: turn a trained policy into something to serve.

Inputs (one of):
  ``--ckpt_path PATH``  a PPOModule Lightning checkpoint, a folder of them (its newest complete
                        one), or ``last`` with ``--run_config FIT.yaml`` (the newest complete one in
                        that run's ModelCheckpoint folder). The actor-critic is rebuilt from the checkpoint's ``hyper_parameters``
                        (``policy``, ``lora``) and its state dict loaded; the reward is not needed.
                        Read with ``torch.load(weights_only=True)`` and an allow-list of the
                        package's settings dataclasses (no arbitrary code runs);
                        ``--trust_checkpoint true`` lifts that for files you made yourself.
                        A run over a quantised base (QLoRA) is rebuilt on the full-precision base, so
                        ``merged`` merges into full-precision weights (never into 4-/8-bit ones).
  ``--adapter DIR``     a LoRA adapter folder (``PPOModule(export_dir=...)`` or
                        ``export --format adapter``) plus its base (``--base`` or the adapter's
                        ``base_model_name_or_path``).

Outputs (one per call, written to a temporary sibling folder and renamed into place). An
existing ``--out`` is replaced only with ``--overwrite`` and only if it is an earlier flan-rlhf
export holding nothing else; a folder of checkpoints, the input itself or anything the user made
is never replaced (:mod:`flan_rlhf.output_dirs`).
  ``--format merged``  (default) a plain Hugging Face model folder with LoRA merged into the base weights
                    (safetensors), fp32 or ``--dtype bf16``, plus the tokenizer. Plain
                    ``AutoModelForSeq2SeqLM.from_pretrained(out)`` loads it.
  ``--format int8``  int8 dynamic quantisation of the merged fp32 model's Linear layers
                    (:mod:`flan_rlhf.tools.quantize`); ``flan-rlhf generate --model out`` loads it,
                    plain transformers cannot.
  ``--format adapter``  the LoRA adapter (peft format) + value head + tokenizer
                    (:func:`flan_rlhf.policy.save_adapter`).

Every output also holds the manifest ``flan_rlhf_export.json``: source, format and files written.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, is_dataclass, replace
from typing import Any, Literal

import torch

from flan_rlhf.checkpointing import CheckpointError, newest_complete_checkpoint, read_checkpoint_file, state_dict_mismatch
from flan_rlhf.errors import say
from flan_rlhf.output_dirs import OutputDirError, atomic_output_dir, check_replaceable, read_manifest
from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec, disable_activation_checkpointing, load_policy_model
from flan_rlhf.progress import seconds
from flan_rlhf.tools.command import FinishedWithProblem, UsageError, run_tool

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- loading
def settings_globals() -> list[Any]:
    """The settings dataclasses an RL module built in Python keeps in its hyper-parameters, allowed in a safe load."""
    from flan_rlhf.settings import METHOD_SETTINGS, GenerationSettings

    return [PolicySpec, LoraSettings, GenerationSettings, *METHOD_SETTINGS.values()]


def algorithm_settings(checkpoint: dict[str, Any]) -> tuple[str, Any]:
    """``(algorithm, its settings as stored)`` of an RL module's checkpoint (``("PPO", None)`` if none is stored)."""
    from flan_rlhf.settings import METHOD_SETTINGS

    hparams = checkpoint.get("hyper_parameters") or {}
    return next(((key.upper(), hparams[key]) for key in METHOD_SETTINGS if key in hparams), ("PPO", None))


def read_checkpoint(path: str, trust: bool = False) -> dict[str, Any]:
    """``torch.load`` a Lightning checkpoint on CPU, by default without running pickled code."""
    return read_checkpoint_file(path, trusted=trust, allowed_globals=settings_globals(), trust_flag="--trust_checkpoint true")


def _as_dataclass(value: Any, cls: type, what: str):
    if value is None or isinstance(value, cls):
        return value
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return cls(**{k: v for k, v in value.items() if not k.startswith("_")})
    raise ValueError(f"checkpoint hyper-parameter '{what}' is a {type(value).__name__}, expected {cls.__name__} - is this an RL module checkpoint (PPOModule, RLOOModule, GRPOModule)?")


def policy_settings(checkpoint: dict[str, Any]) -> tuple[PolicySpec, LoraSettings | None]:
    """The ``policy`` and ``lora`` hyper-parameters a PPOModule saved (reward is not among them)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if "policy" not in hparams:
        raise ValueError("checkpoint has no 'policy' hyper-parameter - pass a checkpoint of an RL module (PPOModule, RLOOModule, GRPOModule)")
    spec = _as_dataclass(hparams["policy"], PolicySpec, "policy")
    lora = _as_dataclass(hparams.get("lora"), LoraSettings, "lora")
    return spec, lora


def actor_from_checkpoint(checkpoint: dict[str, Any], base: str | None = None) -> tuple[ActorCritic, Any, PolicySpec]:
    """Rebuild the ActorCritic of a PPOModule checkpoint and load its weights.

    A run over a quantised base (``policy.quantization``, QLoRA) is rebuilt on the full-precision
    base: its checkpoint holds only the float32 LoRA and value-head weights, which do not depend on
    the base's precision, so the adapter it exports is the trained one, and a merge adds the LoRA
    update to full-precision weights instead of quantising the sum again. No bitsandbytes needed.

    Args:
        checkpoint: the loaded checkpoint dict (``state_dict`` keys start with ``actor.``).
        base: replaces ``policy.name_or_path`` (e.g. the base folder on this machine).

    Returns:
        ``(actor, tokenizer, spec)`` with the actor in eval mode; ``spec`` as trained (its
        ``quantization`` included, for the export's manifest).
    """
    spec, lora = policy_settings(checkpoint)
    if base is not None:
        spec = PolicySpec(**{**asdict(spec), "name_or_path": base})
        if spec.tokenizer is None and spec.t5_config is not None:
            spec.tokenizer = base
    state = {key[len("actor."):]: value for key, value in checkpoint.get("state_dict", {}).items()
             if key.startswith("actor.") and not key.startswith("actor.frozen_reference.")}
    if not state:
        raise ValueError("checkpoint state_dict holds no 'actor.*' weights - pass a checkpoint of an RL module (PPOModule, RLOOModule, GRPOModule)")
    model, tokenizer = load_policy_model(replace(spec, quantization=None))
    actor = ActorCritic(model, lora, with_value_head=any(key.startswith("value_head.") for key in state))
    problem = state_dict_mismatch(state, actor.state_dict(), required=set(actor.trainable_state_dict()))
    if problem is not None:
        raise ValueError(f"checkpoint weights do not fit the policy its hyper-parameters describe: {problem} - pass "
                         "the --base it was trained from")
    actor.load_state_dict(state, strict=False)
    actor.frozen_reference = None  # not needed for export; frees the full-fine-tuning copy
    return actor.eval(), tokenizer, spec


def merged_from_adapter(adapter_dir: str, base: str | None = None):
    """Load ``base`` + the LoRA adapter in ``adapter_dir`` and merge it.

    Returns:
        ``(merged_model, tokenizer, base_name)``.
    """
    from peft import PeftModel

    from flan_rlhf.policy import load_seq2seq_model, load_tokenizer

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        hint = " (it holds config.json: a full model, pass it as --base or to `flan-rlhf generate --model`)" \
            if os.path.isfile(os.path.join(adapter_dir, "config.json")) else ""
        raise FileNotFoundError(f"'{adapter_dir}' is not a LoRA adapter folder: no adapter_config.json{hint}")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = json.load(handle)
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter '{adapter_dir}' does not name its base model - pass --base NAME_OR_FOLDER")
    has_tokenizer = os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
    tokenizer = load_tokenizer(adapter_dir if has_tokenizer else base)
    model = load_seq2seq_model(base)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return merged.eval(), tokenizer, base


def prepare_for_inference(model, dtype: torch.dtype):
    """Cast to ``dtype``, turn gradient checkpointing off and the KV cache on (in place)."""
    disable_activation_checkpointing(model)
    model.config.use_cache = True
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------- writing
def output_check(out: str, overwrite: bool, inputs: list[str | None]) -> dict[str, Any]:
    """What :func:`flan_rlhf.output_dirs.check_replaceable` needs to guard ``--out`` (``inputs`` are never replaced)."""
    return {"overwrite": overwrite, "opt_in": "--overwrite true", "what": f"--out '{out}'",
            "inputs": [path for path in inputs if path and os.path.exists(path)]}


def checkpoint_file(requested: str, run_config: list[str] | None = None) -> str:
    """``--ckpt_path``: a ``.ckpt`` file as given, a folder's newest complete checkpoint, or ``last``:
    the newest complete checkpoint in the ``ModelCheckpoint`` folder of the training YAMLs ``run_config``.

    Raises:
        CheckpointError: ``last`` without ``run_config``, or with one that sets no checkpoint
            folder; a folder holding no complete checkpoint.
    """
    if requested == "last":
        if not run_config:
            raise CheckpointError("--ckpt_path last needs the run's training YAML to find its checkpoints: add "
                                  "--run_config YOUR_FIT.yaml, or pass --ckpt_path CKPT_FOLDER or a .ckpt file")
        from flan_rlhf.lightning_cli import last_folders_of

        folders = last_folders_of(run_config)
        if not folders:
            raise CheckpointError(f"--run_config {' '.join(run_config)} leads to no checkpoint folder (no ModelCheckpoint "
                                  "dirpath, no run under its logger's folder), so --ckpt_path last cannot find the run's "
                                  "checkpoints - pass --ckpt_path CKPT_FOLDER or a .ckpt file")
        requested = folders
    elif not os.path.isdir(requested):
        return requested
    path, messages = newest_complete_checkpoint(requested)
    for message in messages:
        say(f"note: {message}")
    if path is None:
        where = requested if isinstance(requested, str) else ", ".join(requested)
        raise CheckpointError(f"--ckpt_path {where} holds no complete .ckpt file - train first or pass a .ckpt file")
    return path


def write_merged(model, tokenizer, out_dir: str, info: dict[str, Any], check: dict[str, Any], card=None) -> str:
    """A plain HF folder (safetensors + config + generation config + tokenizer), and its model card."""
    with atomic_output_dir(out_dir, info, **check) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_card(tmp, card, out_dir)
    return out_dir


def _write_card(folder: str, card, out_dir: str) -> None:
    if card is not None:
        from flan_rlhf.model_card import write_card

        write_card(folder, card, folder_name=out_dir)


def write_int8(model, tokenizer, out_dir: str, info: dict[str, Any], check: dict[str, Any], per_channel: bool = False,
               card=None) -> str:
    """An int8 folder read by :func:`flan_rlhf.tools.quantize.load_int8`, and its model card."""
    from flan_rlhf.tools.quantize import quantize_int8, save_int8

    quantized = quantize_int8(model, per_channel=per_channel)
    with atomic_output_dir(out_dir, info, **check) as tmp:
        save_int8(quantized, tmp, tokenizer, info)
        _write_card(tmp, card, out_dir)
    return out_dir


def write_adapter(actor: ActorCritic, tokenizer, out_dir: str, info: dict[str, Any], check: dict[str, Any],
                  card=None) -> str:
    """peft adapter folder + value head + tokenizer (a whole model folder for full fine-tuning), and its model card."""
    from flan_rlhf.policy import save_adapter

    with atomic_output_dir(out_dir, info, **check) as tmp:
        save_adapter(actor, tokenizer, tmp, final_dir=out_dir)
        _write_card(tmp, card, out_dir)
    return out_dir


def _folder_mb(folder: str) -> float:
    """The size of the files under ``folder`` (sub-folders included), in MiB."""
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(folder) for name in files) / 2**20


def export(out: str, ckpt_path: str | None = None, adapter: str | None = None, base: str | None = None,
           format: Literal["merged", "int8", "adapter"] = "merged", dtype: Literal["fp32", "bf16"] = "fp32",
           per_channel: bool = False, overwrite: bool = False, trust_checkpoint: bool = False,
           run_config: str | list[str] | None = None, report: str | None = None, push_to_hub: str | None = None,
           dry_run: bool = False) -> str:
    """Turn a checkpoint or adapter into a merged, int8 or adapter-only model folder.

    Args:
        out: the folder to write (written beside, then renamed into place).
        ckpt_path: a PPOModule checkpoint (.ckpt), a folder of them (its newest complete one), or
            ``last``: the newest complete checkpoint of the run ``run_config`` describes.
        adapter: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors); instead of ``ckpt_path``.
        base: the base model (hub id or folder), replacing the checkpoint's policy.name_or_path or
            the adapter's base_model_name_or_path.
        format: ``merged``: a plain Hugging Face folder with LoRA merged in; ``int8``: int8 dynamic
            quantisation for CPU serving (read by flan-rlhf generate); ``adapter``: the LoRA adapter
            + value head + tokenizer.
        dtype: the weights dtype of a merged export.
        per_channel: with ``--format int8``, one scale per output row instead of per matrix.
        overwrite: replace ``out`` if it is an earlier flan-rlhf export (nothing else is ever replaced).
        trust_checkpoint: load the checkpoint with full pickle (runs code stored in the file): only
            for files you made.
        run_config: the training YAML the checkpoint's run was fit with, or a list of them
            (``[base.yaml,overlay.yaml]``, composed as fit composes them), read only to find its
            ModelCheckpoint folder for ``--ckpt_path last``.
        report: a ``flan-rlhf compare`` report folder (or its ``metrics.json``): its before/after
            table goes into the export's model card.
        push_to_hub: a Hub model repo (``user/name``) to upload the export to (created private if
            missing; needs a token: ``hf auth login`` or HF_TOKEN).
        dry_run: with ``push_to_hub``, list what would be uploaded instead of uploading.

    Returns:
        the closing summary: what was written from what, and where.
    """
    from flan_rlhf import __version__

    started = time.perf_counter()
    if (ckpt_path is None) == (adapter is None):
        raise UsageError("pass exactly one of --ckpt_path (a .ckpt file or checkpoint folder) and --adapter (an adapter folder)")
    if format == "int8" and dtype != "fp32":
        raise UsageError("--format int8 quantises the fp32 weights: drop --dtype bf16")
    if format == "adapter" and adapter:
        raise UsageError("--format adapter with --adapter: the input already is an adapter folder - copy it instead")
    if format == "adapter" and dtype != "fp32":
        raise UsageError("--dtype applies to merged exports; the adapter is written in its training dtype")
    if per_channel and format != "int8":
        raise UsageError("--per_channel only applies with --format int8")
    if dry_run and not push_to_hub:
        raise UsageError("--dry_run applies to --push_to_hub: add --push_to_hub USER/NAME, or drop --dry_run")
    if run_config and ckpt_path != "last":
        raise UsageError("--run_config is read only for --ckpt_path last: drop it, or pass --ckpt_path last")
    run_config = [run_config] if isinstance(run_config, str) else run_config
    source = checkpoint_file(ckpt_path, run_config) if ckpt_path else adapter
    check = output_check(out, overwrite, [ckpt_path, source, base])
    check_replaceable(out, **check)
    metrics = read_report(report)
    info: dict[str, Any] = {"format": format, "written_by": "flan-rlhf export", "dtype": "int8" if format == "int8" else dtype,
                            "flan_rlhf_version": __version__, "torch_version": torch.__version__}
    if ckpt_path:
        from flan_rlhf.model_card import facts_from_settings

        checkpoint = read_checkpoint(source, trust_checkpoint)
        actor, tokenizer, spec = actor_from_checkpoint(checkpoint, base)
        info["source"] = {"checkpoint": os.path.abspath(source), "global_step": checkpoint.get("global_step"),
                          "epoch": checkpoint.get("epoch"), "policy": asdict(spec)}
        lora = policy_settings(checkpoint)[1]
        info["lora"] = asdict(lora) if lora is not None else None
        algorithm, settings = algorithm_settings(checkpoint)
        card = facts_from_settings(format, spec, lora, settings, (checkpoint.get("flan_rlhf") or {}).get("reward"),
                                   checkpoint.get("global_step"), metrics, algorithm=algorithm)
        del checkpoint
        if format == "adapter":  # a base built from t5_config is saved beside the adapter (policy.save_adapter)
            write_adapter(actor, tokenizer, out, info, check, card)
            label = ("LoRA adapter" if actor.uses_lora else "full model") + (" + value head" if actor.value_head is not None else "")
            return _pushed(_summary(label, source, out, started), out, push_to_hub, dry_run)
        from flan_rlhf.policy import merged_model

        model = merged_model(actor)
        del actor
    else:
        from flan_rlhf.interrupts import command_line
        from flan_rlhf.model_card import CardFacts, algorithm_of_export, method_text

        model, tokenizer, base = merged_from_adapter(adapter, base)
        info["source"] = {"adapter": os.path.abspath(adapter), "base": base}
        manifest = read_manifest(adapter)
        card = CardFacts(export_format=format, base_model=base, metrics=metrics, command=command_line(),
                         steps=(manifest or {}).get("global_step"), method=method_text(algorithm_of_export(manifest)))
    model = prepare_for_inference(model, DTYPES[dtype])
    if format == "int8":
        write_int8(model, tokenizer, out, info, check, per_channel=per_channel, card=card)
    else:
        write_merged(model, tokenizer, out, info, check, card)
    label = "int8 (dynamic quantisation) model" if format == "int8" else f"merged {dtype} model"
    return _pushed(_summary(label, source, out, started), out, push_to_hub, dry_run)


def _pushed(summary: str, out: str, push_to_hub: str | None, dry_run: bool) -> str:
    """``summary`` plus the upload's lines (:func:`flan_rlhf.tools.hub_push.push_folder`) when asked for.

    Raises:
        FinishedWithProblem: the upload failed; the export is written (the summary says where).
    """
    if not push_to_hub:
        return summary
    from flan_rlhf.tools.hub_push import HubPushError, push_folder

    try:
        return f"{summary}\n{push_folder(out, push_to_hub, dry_run=dry_run)}"
    except HubPushError as err:
        raise FinishedWithProblem(summary, str(err)) from None


def read_report(report: str | None) -> dict[str, Any] | None:
    """The ``metrics.json`` of a ``flan-rlhf compare`` report folder (or that file itself), or None.

    Raises:
        UsageError: ``report`` holds no ``metrics.json`` or it is not a report's.
    """
    if report is None:
        return None
    path = os.path.join(report, "metrics.json") if os.path.isdir(report) else report
    try:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--report {report}: cannot read {path} ({type(err).__name__}) - pass the --out folder of "
                         "`flan-rlhf compare`") from None
    if not isinstance(metrics, dict) or "before" not in metrics or "after" not in metrics:
        raise UsageError(f"--report {report}: {path} has no before/after metrics - pass the --out folder of `flan-rlhf compare`")
    return metrics


def _summary(label: str, source: str, out: str, started: float) -> str:
    """``export: merged fp32 model from SOURCE in 1.2 s`` and ``  folder: OUT (4.2 MB)``."""
    return (f"export: {label} from {source} in {seconds(time.perf_counter() - started)}\n"
            f"  folder: {out} ({_folder_mb(out):.1f} MB)")


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf export ...``; returns 0 on success, 2 on bad input (one line on stderr)."""
    return run_tool("export", argv, export, errors=(CheckpointError, OutputDirError))


if __name__ == "__main__":
    sys.exit(main())
