"""Saving trained policies: the LoRA adapter in peft's format (safetensors) plus the value head."""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
from safetensors.torch import save_file

from flan_rlhf.policy import ActorCritic


def _atomic_dir(target: str):
    """A temporary sibling folder that replaces ``target`` when :func:`_commit_dir` is called."""
    parent = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-", dir=parent)


def _commit_dir(tmp: str, target: str) -> None:
    if os.path.isdir(target):
        old = tmp + ".old"
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_adapter(actor: ActorCritic, tokenizer, out_dir: str) -> str:
    """Write the trained policy to ``out_dir`` atomically.

    LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (plain
    ``PeftModel.from_pretrained(base, out_dir)`` loads it). Full fine-tuning: a whole HF model
    folder. Both: ``value_head.safetensors`` and the tokenizer.
    """
    tmp = _atomic_dir(out_dir)
    try:
        actor.policy.save_pretrained(tmp, safe_serialization=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in actor.value_head.state_dict().items()},
                  os.path.join(tmp, "value_head.safetensors"))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        _commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@torch.no_grad()
def merged_model(actor: ActorCritic):
    """A plain HF model with LoRA merged into the base weights (a copy; ``actor`` is unchanged)."""
    import copy

    if not actor.uses_lora:
        return copy.deepcopy(actor.policy)
    return copy.deepcopy(actor.policy).merge_and_unload()
