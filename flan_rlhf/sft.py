"""Supervised fine-tuning (SFT) of a seq2seq model on (prompt, reference) pairs.

The step before PPO in the popular FLAN-T5 recipe (e.g. flan-t5-base on DialogSum), and the
step that turns the offline demo's randomly initialised T5 into a summariser. Teacher-forced
cross-entropy of ``references[0]`` given ``prompt``, AdamW, linear warm-up then cosine or
linear decay. On the demo the decay mattered: a constant learning rate plateaued at a loss of
~0.13, a decaying one reached ~0.03, and only then did the model reproduce the training share
of toxic summaries (issue 5, throwaway experiment).

Batches come from :class:`flan_rlhf.data.PromptDataModule`::

    {"prompt": list[str], "references": list[list[str]], "prompt_id": LongTensor, "sample": LongTensor}

and are tokenised here (T5 right padding; labels padded with -100, which HF's T5 turns into
``decoder_input_ids`` by shifting right with ``decoder_start_token_id``).

At the end of ``fit``, ``save_dir`` receives the model (LoRA merged into the weights) and the
tokenizer via ``save_pretrained`` (safetensors), written to a temporary folder and renamed, so
a PPO config can name it as ``policy.name_or_path``.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

import lightning as L
import torch

from flan_rlhf.checkpointing import CheckpointError, state_dict_mismatch
from flan_rlhf.optim import adamw, lr_schedule
from flan_rlhf.output_dirs import GuardedExportMixin
from flan_rlhf.policy import (
    LoraSettings,
    ModelLoadError,
    PolicySpec,
    PromptLimitOfPolicy,
    enable_activation_checkpointing,
    load_policy_model,
)

IGNORE_INDEX = -100  # label value torch's cross_entropy (and HF) skip


def tokenize_pairs(
    tokenizer: Any, prompts: list[str], targets: list[str], truncate_prompt_tokens: int, truncate_target_tokens: int
) -> dict[str, torch.Tensor]:
    """Tokenise (prompt, target) pairs for teacher forcing.

    Returns:
        ``input_ids`` and ``attention_mask`` of shape ``(batch, prompt_len)`` (right-padded,
        ``</s>`` appended by the tokenizer) and ``labels`` of shape ``(batch, target_len)`` with
        padding replaced by ``-100``.
    """
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=truncate_prompt_tokens, return_tensors="pt")
    dec = tokenizer(text_target=targets, padding=True, truncation=True, max_length=truncate_target_tokens, return_tensors="pt")
    labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def first_references(batch: dict[str, Any]) -> list[str]:
    """``references[0]`` of every row; a row without references is a data error."""
    missing = [int(pid) for pid, refs in zip(batch["prompt_id"], batch["references"]) if not refs]
    if missing:
        raise ValueError(
            f"SFT needs a reference text for every prompt, but rows {missing[:5]} have none - set "
            f"--data.reference_columns to the column(s) holding the target texts"
        )
    return [refs[0] for refs in batch["references"]]


class SFTModule(GuardedExportMixin, PromptLimitOfPolicy, L.LightningModule):
    """Supervised fine-tuning of a Hugging Face encoder-decoder: cross-entropy of ``references[0]``.

    Args:
        policy: where the model and tokenizer come from (hub id, folder, or a T5 built from
            ``t5_config`` with a tokenizer folder).
        learning_rate: peak AdamW learning rate (after warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up, in optimizer steps.
        schedule: decay after warm-up: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: the decay ends at ``learning_rate * min_lr_ratio``.
        decay_steps: optimizer steps at which the decay reaches its floor; ``null`` takes
            ``trainer.max_steps`` (the prompt stream is infinite, so set ``max_steps``).
        truncate_prompt_tokens: the prompt cap in tokens (``</s>`` included); the data module cuts the
            inserted text of a longer prompt to fit, so the template is kept.
        truncate_target_tokens: targets are truncated to this many tokens (``</s>`` included).
        lora: LoRA adapter settings; ``null`` trains all weights. The saved model has the
            adapters merged in.
        gradient_checkpointing: recompute activations in backward to save memory.
        save_dir: folder that receives the fine-tuned model + tokenizer at the end of ``fit``
            (``save_pretrained``, safetensors; written atomically on rank 0). ``null`` disables.
            A folder holding anything but an earlier save of this same run is refused before
            training starts (:mod:`flan_rlhf.output_dirs`).
        overwrite_save_dir: allow replacing an earlier flan-rlhf save of another run in
            ``save_dir``. Never replaces a folder holding files flan-rlhf did not write.
    """

    # settings the stored weights depend on: resuming with other values stops (flan_rlhf.resume_settings)
    FIXED_BY_CHECKPOINT = ("policy.t5_config", "lora.r", "lora.alpha", "lora.target_modules")

    def __init__(
        self,
        policy: PolicySpec,
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        decay_steps: int | None = None,
        truncate_prompt_tokens: int = 512,
        truncate_target_tokens: int = 128,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        save_dir: str | None = None,
        overwrite_save_dir: bool = False,
    ) -> None:
        super().__init__()
        if schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}")
        if learning_rate <= 0 or warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"need learning_rate > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; got {learning_rate}, "
                f"{warmup_steps}, {min_lr_ratio}"
            )
        if getattr(policy, "quantization", None) is not None:
            raise ModelLoadError("SFTModule does not train over a quantised base (policy.quantization is for the RL "
                                 "modules, whose checkpoints hold only the adapters) - drop policy.quantization")
        self.save_hyperparameters()
        self.policy_spec = policy
        self.lora = lora
        self.model: Any = None
        self.tokenizer: Any = None
        self.truncate_prompt_tokens = truncate_prompt_tokens

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Load or build the model once (Lightning calls this before restoring a checkpoint)."""
        if self.model is not None:
            return
        model, self.tokenizer = load_policy_model(self.policy_spec, self.tokenizer)
        model.train()  # load_policy_model returns eval mode; Lightning keeps submodules' modes as found
        if self.hparams.gradient_checkpointing:
            enable_activation_checkpointing(model)
            model.config.use_cache = False
        if self.lora is not None:
            from peft import LoraConfig, TaskType, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    task_type=TaskType.SEQ_2_SEQ_LM,
                    r=self.lora.r,
                    lora_alpha=self.lora.alpha,
                    lora_dropout=self.lora.dropout,
                    target_modules=list(self.lora.target_modules),
                ),
            )
        self.model = model

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = adamw(params, self.hparams.learning_rate, self.hparams.weight_decay)
        total = self.hparams.decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        if total is None and self.hparams.schedule != "constant":
            raise ValueError(
                "the learning-rate decay needs a length: set trainer.max_steps (the prompt stream is infinite) "
                "or model.decay_steps"
            )
        scheduler = lr_schedule(optimizer, self.hparams.warmup_steps, total or 1, self.hparams.schedule,
                                self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Mean token cross-entropy of ``references[0]`` and the number of target tokens."""
        tensors = tokenize_pairs(
            self.tokenizer, list(batch["prompt"]), first_references(batch),
            self.hparams.truncate_prompt_tokens, self.hparams.truncate_target_tokens,
        )
        tensors = {k: v.to(self.device) for k, v in tensors.items()}
        out = self.model(**tensors, use_cache=False, return_dict=True)
        n_tokens = int((tensors["labels"] != IGNORE_INDEX).sum())
        return out.loss, n_tokens

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self._loss(batch)
        size = len(batch["prompt"])
        self.log("sft/loss", loss, on_step=True, prog_bar=True, batch_size=size)
        self.log("sft/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=size)
        self.log("sft/target_tokens", float(n_tokens), on_step=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("sft/val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch["prompt"]))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self._loss(batch)
        self.log("sft/test_loss", loss, on_epoch=True, sync_dist=True, batch_size=len(batch["prompt"]))

    # ------------------------------------------------------------------ export
    def merged_model(self) -> Any:
        """The fine-tuned HF model with LoRA adapters merged in (a copy; training state untouched)."""
        if self.lora is None:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        problem = state_dict_mismatch(checkpoint.get("state_dict", {}), self.state_dict())
        if problem is not None:
            raise CheckpointError(f"checkpoint does not fit this model: {problem} - resume with the policy and lora "
                                  "settings it was trained with, or start a fresh run without --ckpt_path")

    def export_target(self) -> tuple[str | None, bool, str]:
        return self.hparams.save_dir, self.hparams.overwrite_save_dir, "--model.init_args.overwrite_save_dir true"

    def on_fit_end(self) -> None:
        if self.hparams.save_dir is None:
            return
        if self.trainer.is_global_zero:
            model = self.merged_model()
            model.config.use_cache = True
            manifest = {"format": "model", "written_by": "flan-rlhf fit (SFTModule)", "global_step": self.global_step}
            with self.export_folder(manifest) as folder:
                model.save_pretrained(folder)  # safetensors (the default of transformers >= 4.35)
                self.tokenizer.save_pretrained(folder)
        self.trainer.strategy.barrier("sft_save")
