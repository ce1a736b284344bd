"""The preference-trained reward model: the "human feedback" part of RLHF.

:class:`PreferenceRewardModel` (LightningModule) fits a sequence classifier with one scalar
output on ``(prompt, chosen, rejected)`` triples with the Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, eq. 1) and logs loss and pairwise
accuracy. At the end of ``fit`` it saves a Hugging Face folder (model + tokenizer) to
``export_dir``. The pairs come from :class:`flan_rlhf.reward_model.data.PreferenceDataModule`;
:class:`flan_rlhf.rewards.PreferenceReward` (a scorer, no Lightning) loads the exported folder.

Fit it with ``flan-rlhf fit --config configs/reward_model_tiny.yaml``; then name the export
folder in a PPO config: ``reward: {class_path: flan_rlhf.rewards.PreferenceReward,
init_args: {path: <export_dir>}}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from flan_rlhf.output_dirs import GuardedExportMixin
from flan_rlhf.policy import load_tokenizer
from flan_rlhf.rewards.preference_reward import EXPORT_METADATA_FILE
from flan_rlhf.rewards.text_batches import forward_argument_names

__all__ = ["PreferenceRewardModel", "bradley_terry_loss", "pairwise_accuracy"]

def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log sigmoid(r_c - r_r)`` over pairs; inputs of shape ``(pairs,)``, output scalar."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Share of pairs with ``r_c > r_r`` strictly (ties count as wrong); scalar in ``[0, 1]``."""
    return (chosen_rewards > rejected_rewards).float().mean()


class PreferenceRewardModel(GuardedExportMixin, L.LightningModule):
    """A scalar-output sequence classifier trained with the Bradley-Terry pairwise loss.

    Args:
        model_name_or_path: hub id or folder of a pretrained encoder to start from (its head is
            replaced by a 1-output head). Ignored when ``model_config`` is given.
        model_config: build a randomly initialised model from this config dict instead
            (``{"model_type": "bert", "hidden_size": 64, ...}``; for tests and tiny offline runs).
        tokenizer: tokenizer id/folder (default: ``model_name_or_path``); ``"byt5"`` builds the
            byte-level ByT5 tokenizer, which needs no files.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_length: truncate each (prompt, response) input to this many tokens.
        export_dir: folder to ``save_pretrained`` the model + tokenizer into when fit ends
            (``None``: no export). Load it with :class:`PreferenceReward`. A folder holding
            anything but an earlier export of this same run is refused before training starts.
        overwrite_export_dir: allow replacing an earlier flan-rlhf export of another run in
            ``export_dir``. Never replaces a folder holding files flan-rlhf did not write.
    """

    # settings the stored weights depend on: resuming with other values stops (flan_rlhf.resume_settings)
    FIXED_BY_CHECKPOINT = ("model_config",)

    def __init__(
        self,
        model_name_or_path: str = "distilroberta-base",
        model_config: dict | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        max_length: int = 512,
        export_dir: str | None = None,
        overwrite_export_dir: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if model_config is not None:
            settings = dict(model_config)
            if "model_type" not in settings:
                raise ValueError("model_config needs a 'model_type' (e.g. 'bert') to pick the architecture")
            config = AutoConfig.for_model(settings.pop("model_type"), **settings)
            config.num_labels = 1
            self.model = AutoModelForSequenceClassification.from_config(config)
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model_name_or_path, num_labels=1, ignore_mismatched_sizes=True
            )
        self.tokenizer = load_tokenizer(tokenizer or model_name_or_path)
        if self.tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS, as TRL's RewardTrainer
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.config.id2label = {0: "reward"}
        self.model.config.label2id = {"reward": 0}
        self.trained_with_prompt: bool | None = None

    def forward(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> torch.Tensor:
        """Scalar reward per response, shape ``(batch,)``; with prompts, encodes (prompt, response) pairs."""
        encoded = self.tokenizer(
            list(prompts) if prompts is not None else list(responses),
            list(responses) if prompts is not None else None,
            padding=True,
            truncation=True,
            max_length=self.hparams.max_length,
            return_tensors="pt",
        ).to(self.device)
        accepted = forward_argument_names(self.model)
        inputs = {key: value for key, value in encoded.items() if key in accepted}
        return self.model(**inputs).logits.squeeze(-1)

    def _pair_step(self, batch: dict, stage: str) -> torch.Tensor:
        prompts = batch.get("prompt")
        self.trained_with_prompt = prompts is not None
        pairs = len(batch["chosen"])
        # One forward pass for chosen and rejected together (one padding length, one batch).
        both = self(
            None if prompts is None else list(prompts) * 2, list(batch["chosen"]) + list(batch["rejected"])
        )
        chosen_rewards, rejected_rewards = both[:pairs], both[pairs:]
        loss = bradley_terry_loss(chosen_rewards, rejected_rewards)
        accuracy = pairwise_accuracy(chosen_rewards, rejected_rewards)
        on_step = stage == "train"
        options = dict(on_step=on_step, on_epoch=True, prog_bar=True, batch_size=pairs, sync_dist=not on_step)
        self.log(f"{stage}/loss", loss, **options)
        self.log(f"{stage}/accuracy", accuracy, **options)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._pair_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._pair_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._pair_step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay
        )

    def export(self, directory: str | Path) -> Path:
        """Save model + tokenizer (``save_pretrained``) and the training metadata into the folder ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        metadata = {"trained_with_prompt": self.trained_with_prompt, "max_length": self.hparams.max_length}
        (directory / EXPORT_METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        return directory

    def export_target(self) -> tuple[str | None, bool, str]:
        return self.hparams.export_dir, self.hparams.overwrite_export_dir, "--model.init_args.overwrite_export_dir true"

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            manifest = {"format": "reward model", "written_by": "flan-rlhf fit (PreferenceRewardModel)"}
            with self.export_folder(manifest) as folder:
                self.export(folder)
            path = self.hparams.export_dir
            rank_zero_info(f"reward model saved to {path}; load it with PreferenceReward(path='{path}')")
