"""Saving trained policies: the LoRA adapter in peft's format (safetensors) plus the value head."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from flan_rlhf.policy import ActorCritic


def save_adapter(actor: ActorCritic, tokenizer, out_dir: str) -> str:
    """Write the trained policy into the folder ``out_dir`` (created if missing).

    Callers that replace a folder write through :func:`flan_rlhf.output_dirs.atomic_output_dir`.
    LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (plain
    ``PeftModel.from_pretrained(base, out_dir)`` loads it). Full fine-tuning: a whole HF model
    folder. Both: ``value_head.safetensors`` and the tokenizer.
    """
    os.makedirs(out_dir, exist_ok=True)
    actor.policy.save_pretrained(out_dir, safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in actor.value_head.state_dict().items()},
              os.path.join(out_dir, "value_head.safetensors"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def merged_model(actor: ActorCritic):
    """A plain HF model with LoRA merged into the base weights (a copy; ``actor`` is unchanged)."""
    import copy

    if not actor.uses_lora:
        return copy.deepcopy(actor.policy)
    return copy.deepcopy(actor.policy).merge_and_unload()
