"""The preference-trained reward model: the "human feedback" part of RLHF.

* :class:`PreferenceRewardModel` (LightningModule) fits a sequence classifier with one scalar
  output on ``(prompt, chosen, rejected)`` triples with the Bradley-Terry loss
  ``-log sigmoid(r_chosen - r_rejected)`` (Ouyang et al. 2022, eq. 1) and logs loss and pairwise
  accuracy. At the end of ``fit`` it saves a Hugging Face folder (model + tokenizer) to
  ``export_dir``.
* :class:`PreferenceDataModule` (LightningDataModule) reads pairs from a ``datasets`` hub name
  (the Anthropic/hh-rlhf format: ``chosen``/``rejected`` columns holding whole conversations)
  or local json/jsonl/csv/parquet files; column names are configurable.
* :class:`PreferenceReward` (Reward, in ``preference_reward.py`` so scoring does not import
  Lightning) loads the exported folder and scores responses.

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
from torch.utils.data import DataLoader

from flan_rlhf.errors import first_line
from flan_rlhf.output_dirs import GuardedExportMixin
from flan_rlhf.rewards.preference_reward import EXPORT_METADATA_FILE, PreferenceReward
from flan_rlhf.rewards.text_batches import forward_argument_names

__all__ = [
    "PreferenceDataModule",
    "PreferenceReward",
    "PreferenceRewardModel",
    "bradley_terry_loss",
    "pairwise_accuracy",
]

BYTE_TOKENIZER = "byt5"
LOCAL_SUFFIX_TO_BUILDER = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_tokenizer(name_or_path: str):
    """``AutoTokenizer.from_pretrained(name_or_path)``; ``"byt5"`` builds the byte-level ByT5
    tokenizer, which needs no files (for tiny offline runs)."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if name_or_path == BYTE_TOKENIZER:
        return ByT5Tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path)


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


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from a ``datasets`` hub name or local files.

    Args:
        dataset: hub name (e.g. ``Anthropic/hh-rlhf``), a local json/jsonl/csv/parquet file, or a
            folder of such files (``datasets`` maps ``train.*``/``test.*`` names to splits).
        dataset_config: hub config name (``data_dir`` for hh-rlhf subsets goes here too).
        train_split: split to train on.
        val_split: split to validate on; when the source lacks it, ``val_fraction`` of the
            training split is held out instead (``None``: always hold out).
        val_fraction: share of training pairs held out when there is no ``val_split``.
        chosen_column: column with the preferred response (hh-rlhf: the whole conversation).
        rejected_column: column with the dispreferred response.
        prompt_column: column with the prompt, or ``None`` when chosen/rejected already hold it.
        max_train_samples: keep only this many training pairs (``None``: all).
        max_val_samples: keep only this many validation pairs.
        batch_size: pairs per batch (the model sees ``2 * batch_size`` sequences).
        num_workers: DataLoader workers.
        seed: shuffling and hold-out seed.

    Rows whose chosen or rejected text is missing/empty, or where both are identical, carry no
    preference and are dropped; the counts are printed and kept in ``self.dropped``.
    """

    def __init__(
        self,
        dataset: str = "Anthropic/hh-rlhf",
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "test",
        val_fraction: float = 0.05,
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        prompt_column: str | None = None,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.train_split = train_split
        self.val_split = val_split
        self.val_fraction = val_fraction
        self.chosen_column = chosen_column
        self.rejected_column = rejected_column
        self.prompt_column = prompt_column
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_data = None
        self.val_data = None
        self.dropped: dict[str, int] = {}

    # -- loading ---------------------------------------------------------------------------
    def _load_dataset_dict(self):
        """The source as a ``DatasetDict`` (local files or hub), with one-line errors."""
        from datasets import DatasetDict, load_dataset

        path = Path(self.dataset)
        if path.is_file():
            builder = LOCAL_SUFFIX_TO_BUILDER.get(path.suffix.lower())
            if builder is None:
                raise ValueError(
                    f"cannot read preference file {path} (suffix {path.suffix!r}): "
                    "use .json, .jsonl, .csv or .parquet"
                )
            return load_dataset(builder, data_files={self.train_split: str(path)})
        try:
            loaded = load_dataset(self.dataset, self.dataset_config)
        except (ConnectionError, OSError) as err:  # DatasetNotFoundError is a FileNotFoundError
            raise ConnectionError(
                f"cannot load preference dataset {self.dataset!r} ({first_line(err)[:200]}); offline, pass a local "
                f"json/jsonl/csv/parquet file with '{self.chosen_column}'/'{self.rejected_column}' "
                "columns as `dataset`"
            ) from err
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({self.train_split: loaded})

    def _load_splits(self):
        """``(train, val)`` datasets before column checks and cleaning."""
        splits = self._load_dataset_dict()
        if self.train_split not in splits:
            raise ValueError(
                f"dataset {self.dataset!r} has no split {self.train_split!r}; "
                f"it has {list(splits)}: set train_split"
            )
        self._check_columns(splits[self.train_split], self.train_split)
        if self.val_split is not None and self.val_split in splits:
            return splits[self.train_split], splits[self.val_split]
        train = splits[self.train_split]
        if round(len(train) * self.val_fraction) < 1 or len(train) < 2:
            raise ValueError(
                f"cannot hold out {self.val_fraction:.0%} of {len(train)} pairs of {self.dataset!r} "
                "for validation: add pairs, raise val_fraction, or provide a val_split"
            )
        held_out = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
        return held_out["train"], held_out["test"]

    def _check_columns(self, data, split: str) -> None:
        missing = [column for column in self._columns() if column not in data.column_names]
        if missing:
            raise ValueError(
                f"{split} data of {self.dataset!r} lacks column(s) {missing}; it has {data.column_names}: "
                f"set chosen_column/rejected_column/prompt_column"
            )

    def _columns(self) -> list[str]:
        prompt = [self.prompt_column] if self.prompt_column else []
        return [self.chosen_column, self.rejected_column, *prompt]

    def _clean(self, data, split: str):
        """Check columns, keep only prompt/chosen/rejected, drop pairs that carry no preference."""
        self._check_columns(data, split)
        data = data.select_columns(self._columns())
        chosen_column, rejected_column = self.chosen_column, self.rejected_column

        def has_preference(row: dict) -> bool:
            chosen, rejected = row[chosen_column], row[rejected_column]
            if not chosen or not rejected or chosen == rejected:
                return False
            return bool(str(chosen).strip() and str(rejected).strip())

        before = len(data)
        data = data.filter(has_preference)
        self.dropped[split] = before - len(data)
        if self.dropped[split]:
            rank_zero_info(
                f"{split}: dropped {self.dropped[split]} of {before} pairs with empty or identical texts"
            )
        if len(data) == 0:
            raise ValueError(f"no usable preference pairs in the {split} data of {self.dataset!r}")
        return data

    def prepare_data(self) -> None:
        """Download/cache the source once (rank 0)."""
        self._load_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        train, val = self._load_splits()
        train, val = self._clean(train, "train"), self._clean(val, "val")
        if self.max_train_samples is not None:
            train = train.select(range(min(self.max_train_samples, len(train))))
        if self.max_val_samples is not None:
            val = val.select(range(min(self.max_val_samples, len(val))))
        self.train_data, self.val_data = train, val

    # -- batches ---------------------------------------------------------------------------
    def collate(self, rows: list[dict]) -> dict[str, list[str]]:
        """Rows -> ``{"chosen": [...], "rejected": [...], ("prompt": [...])}``, lists of ``pairs`` strings."""
        batch = {
            "chosen": [str(row[self.chosen_column]) for row in rows],
            "rejected": [str(row[self.rejected_column]) for row in rows],
        }
        if self.prompt_column:
            prompts = [row[self.prompt_column] for row in rows]
            batch["prompt"] = ["" if prompt is None else str(prompt) for prompt in prompts]
        return batch

    def _loader(self, data, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            generator=generator if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_data, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)
