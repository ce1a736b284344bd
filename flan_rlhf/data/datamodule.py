"""``PromptDataModule``: prompts (and reference texts) for PPO training and evaluation.

Batch format, for every stage (tokenisation is the LightningModule's job)::

    {
        "prompt": list[str],               # (batch,) templated prompt texts, as the model sees them
        "references": list[list[str]],     # (batch,) reference texts per prompt, possibly []
        "prompt_id": LongTensor,           # (batch,) row index in the source split as loaded
        "sample": LongTensor,              # (batch,) sample index 0..k-1 of an eval prompt; 0 in training
        "truncated": BoolTensor,           # (batch,) the prompt's inserted text was cut to a token limit
        "id": list,                        # (batch,) the id column's value; only with ``id_column``
    }

``prompt_id`` is the row's position in the source split before any filtering or fractional
split, so it points back at the file row (0-based; for JSON lines, line ``prompt_id + 1``
when the file has no blank lines).

Preparation of each split, in order (each split's counts are printed as one line,
:meth:`SplitReport.summary`, and kept in ``PromptDataModule.reports``):
1. null, empty, whitespace-only or non-string prompts are dropped (or rejected);
2. character filter on the raw prompt text: ``min_chars <= len(text) <= max_chars`` (by default
   on the training split only, ``filter_splits``);
3. ``max_prompt_tokens`` with ``too_long`` drop or error: the templated prompt is counted;
4. evaluation splits only: the first ``max_eval_prompts`` prompts are kept;
5. truncation: a templated prompt over ``max_prompt_tokens`` (``too_long: truncate``), then over
   the model's own cap (``--model.truncate_prompt_tokens``, counted with the model's tokenizer),
   loses the end of its inserted text, never the template, so instructions such as
   ``Summary:`` stay in place and the model's own cut (which takes the end of the prompt) does
   not happen.

The training dataloader is the infinite :class:`~flan_rlhf.data.stream.PromptBatchStream`
starting at ``trainer.global_step`` (see that module for the exact order).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from flan_rlhf.data.builtin import load_builtin
from flan_rlhf.data.loading import DataConfigError, fractional_split_indices, get_split, load_source
from flan_rlhf.data.stream import PromptBatchStream, stream_position
from flan_rlhf.data.templates import apply_template, resolve_template, truncate_to_token_limit
from flan_rlhf.tokens import PromptTokenLimit, count_tokens


ROLES = ("train", "validation", "test", "predict")
ROLE_OPTIONS = {
    "train": "train_split", "validation": "val_split", "test": "test_split", "predict": "predict_split",
}
STAGE_ROLES = {
    "fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("predict",),
}


# --------------------------------------------------------------------------------------------
# Prepared splits
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptTable:
    """One prepared split: parallel lists, one entry per kept row.

    Attributes:
        prompts: templated prompt texts, exactly as the model sees them (after any truncation).
        references: reference texts of each row (empty list when none).
        prompt_ids: row index of each prompt in the source split as loaded.
        truncated: whether the row's inserted text was cut to fit a prompt-token limit.
        ids: the row's value of ``id_column`` (``None`` when no id column is set).
    """

    prompts: list[str]
    references: list[list[str]]
    prompt_ids: list[int]
    truncated: list[bool] = field(default_factory=list)
    ids: list[Any] | None = None

    def __post_init__(self) -> None:
        if not self.truncated:
            object.__setattr__(self, "truncated", [False] * len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n_rows: int | None) -> "PromptTable":
        """The first ``n_rows`` rows (all when ``None``)."""
        if n_rows is None:
            return self
        return PromptTable(self.prompts[:n_rows], self.references[:n_rows], self.prompt_ids[:n_rows],
                           self.truncated[:n_rows], None if self.ids is None else self.ids[:n_rows])

    def batch(self, rows: Sequence[int] | np.ndarray, samples: Sequence[int] | None = None) -> dict[str, Any]:
        """Collated batch of the given row positions (``samples`` default to 0). See module docstring."""
        positions = [int(row) for row in rows]
        batch = {
            "prompt": [self.prompts[i] for i in positions],
            "references": [list(self.references[i]) for i in positions],
            "prompt_id": torch.tensor([self.prompt_ids[i] for i in positions], dtype=torch.long),
            "sample": torch.tensor(
                list(samples) if samples is not None else [0] * len(positions), dtype=torch.long
            ),
            "truncated": torch.tensor([self.truncated[i] for i in positions], dtype=torch.bool),
        }
        if self.ids is not None:
            batch["id"] = [self.ids[i] for i in positions]
        return batch

    def fingerprint(self) -> str:
        """SHA-256 of the (prompt_id, prompt) pairs in order: detects changed training data on resume."""
        digest = hashlib.sha256()
        for prompt_id, prompt in zip(self.prompt_ids, self.prompts):
            digest.update(f"{prompt_id}\t{prompt}\x1e".encode("utf-8"))
        return digest.hexdigest()


@dataclass
class SplitReport:
    """What preparation did to one split (row counts, in the order of the steps).

    ``truncated`` counts kept rows whose inserted text was cut to ``max_prompt_tokens``;
    ``truncated_to_model_limit`` those cut (further) to the model's prompt-token limit.
    """

    role: str
    split: str
    loaded: int = 0
    invalid_prompts_dropped: int = 0
    shorter_than_min_chars: int = 0
    longer_than_max_chars: int = 0
    too_many_tokens_dropped: int = 0
    beyond_max_eval_prompts: int = 0
    truncated: int = 0
    truncated_to_model_limit: int = 0
    kept: int = 0
    reference_columns: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. ``data[test <- 'test']: 500 loaded; 440 truncated to max_prompt_tokens=512 (end of
        the text cut, template kept); 500 kept; references from: summary1, summary2, summary3``."""
        parts = [f"{self.loaded} loaded"]
        settings = self.settings
        counts = [
            (self.invalid_prompts_dropped, "null/empty/non-string prompts dropped"),
            (self.shorter_than_min_chars, f"shorter than min_chars={settings.get('min_chars')} dropped"),
            (self.longer_than_max_chars, f"longer than max_chars={settings.get('max_chars')} dropped"),
            (self.too_many_tokens_dropped,
             f"over max_prompt_tokens={settings.get('max_prompt_tokens')} dropped"),
            (self.beyond_max_eval_prompts,
             f"beyond max_eval_prompts={settings.get('max_eval_prompts')} left out"),
            (self.truncated,
             f"truncated to max_prompt_tokens={settings.get('max_prompt_tokens')} (end of the text cut, template kept)"),
            (self.truncated_to_model_limit,
             f"truncated to {settings.get('model_limit')} (end of the text cut, template kept)"),
        ]
        parts += [f"{count} {what}" for count, what in counts if count]
        parts.append(f"{self.kept} kept")
        references = ", ".join(self.reference_columns) if self.reference_columns else "none"
        return f"data[{self.role} <- {self.split!r}]: {'; '.join(parts)}; references from: {references}"

    def as_dict(self) -> dict[str, Any]:
        """The counts, settings and :meth:`summary` line as plain JSON values (for ``metrics.json``)."""
        return {**asdict(self), "summary": self.summary()}


def _column_values(dataset: Dataset, column: str, split: str, option: str) -> list[Any]:
    if column not in dataset.column_names:
        raise DataConfigError(
            f"column {column!r} (--data.{option}) is not in split {split!r}, which has columns "
            f"{dataset.column_names}; set --data.{option} to one of them"
        )
    return dataset[column]


def _reference_texts(values: Sequence[Any]) -> list[str]:
    """Non-blank reference strings among one row's values (lists are flattened, numbers made text)."""
    texts: list[str] = []
    for value in values:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is None:
                continue
            text = item if isinstance(item, str) else str(item)
            if text.strip():
                texts.append(text)
    return texts


def _id_values(dataset: Dataset, id_column: str | None, split: str) -> list[Any] | None:
    """The id column's values as JSON-ready scalars (text unless int), or None without an id column."""
    if id_column is None:
        return None
    return [value if isinstance(value, (str, int)) or value is None else str(value)
            for value in _column_values(dataset, id_column, split, "id_column")]


def prepare_prompts(
    dataset: Dataset,
    *,
    role: str,
    split: str,
    prompt_column: str,
    reference_columns: Sequence[str],
    template: str,
    row_ids: Sequence[int] | None = None,
    id_column: str | None = None,
    min_chars: int | None = None,
    max_chars: int | None = None,
    empty_prompts: str = "drop",
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    too_long: str = "truncate",
    max_prompts: int | None = None,
    model_limit: PromptTokenLimit | None = None,
) -> tuple[PromptTable, SplitReport]:
    """Turn one split into a :class:`PromptTable` (steps 1-6 of the module docstring).

    Args:
        dataset: the split's rows (``datasets.Dataset``).
        role: ``train``/``validation``/``test``/``predict`` (for messages and the report).
        split: the split's name in the source (for messages).
        prompt_column: column holding the prompt text.
        reference_columns: reference columns; those present in this split are used, in this
            order (a split may lack some, e.g. ``summary`` in train vs ``summary1..3`` in test).
            Empty = no references. Non-empty but none present is an error.
        template: a resolved template (see :mod:`flan_rlhf.data.templates`).
        row_ids: source row index of each dataset row (default ``0..len-1``).
        id_column: column whose value each row carries as its ``id`` (e.g. DialogSum's ``fname``).
        min_chars, max_chars: inclusive bounds on the raw prompt's character count.
        empty_prompts: ``"drop"`` or ``"error"`` for null/empty/whitespace/non-string prompts.
        tokenizer: Hugging Face tokenizer used for ``max_prompt_tokens``.
        max_prompt_tokens: maximum tokens of the templated prompt, special tokens included.
        too_long: ``"truncate"``, ``"drop"`` or ``"error"`` for prompts over ``max_prompt_tokens``.
        max_prompts: keep only the first this many prompts after filtering.
        model_limit: the model's own prompt-token cap; prompts over it get their inserted text cut
            with the model's tokenizer (so the model never cuts the template's tail).

    Raises:
        DataConfigError: empty split, missing columns, rejected prompts, nothing left after filtering.
    """
    option = ROLE_OPTIONS[role]
    report = SplitReport(
        role=role, split=split, loaded=len(dataset),
        settings={"prompt_column": prompt_column, "id_column": id_column, "template": template,
                  "min_chars": min_chars, "max_chars": max_chars, "max_prompt_tokens": max_prompt_tokens,
                  "max_eval_prompts": max_prompts,
                  "model_limit": None if model_limit is None
                  else f"{model_limit.option.removeprefix('--')}={model_limit.max_tokens}"},
    )
    if len(dataset) == 0:
        raise DataConfigError(
            f"split {split!r} (--data.{option}) of the dataset is empty (0 rows); check the data files or "
            "choose another split"
        )
    raw_prompts = _column_values(dataset, prompt_column, split, "prompt_column")
    row_id_values = _id_values(dataset, id_column, split)
    present = [column for column in reference_columns if column in dataset.column_names]
    if reference_columns and not present:
        raise DataConfigError(
            f"none of the reference columns {list(reference_columns)} (--data.reference_columns) is in split "
            f"{split!r}, which has columns {dataset.column_names}; list the columns holding references, or "
            "[] for none"
        )
    report.reference_columns = present
    reference_values = [dataset[column] for column in present]
    ids = list(range(len(dataset))) if row_ids is None else [int(i) for i in row_ids]

    # 1. null / empty / non-string prompts
    invalid = [i for i, text in enumerate(raw_prompts) if not isinstance(text, str) or not text.strip()]
    if invalid and empty_prompts == "error":
        first = invalid[0]
        raise DataConfigError(
            f"{len(invalid)} prompts in split {split!r} are null, empty or not strings (first: row "
            f"{ids[first]}, value {raw_prompts[first]!r:.40}); fix the data or set --data.empty_prompts drop"
        )
    report.invalid_prompts_dropped = len(invalid)
    invalid_set = set(invalid)
    keep = [i for i in range(len(raw_prompts)) if i not in invalid_set]

    # 2. character filter on the raw text
    if min_chars is not None:
        report.shorter_than_min_chars = sum(len(raw_prompts[i]) < min_chars for i in keep)
        keep = [i for i in keep if len(raw_prompts[i]) >= min_chars]
    if max_chars is not None:
        report.longer_than_max_chars = sum(len(raw_prompts[i]) > max_chars for i in keep)
        keep = [i for i in keep if len(raw_prompts[i]) <= max_chars]

    # 3. max_prompt_tokens with too_long drop / error (the templated prompt is counted)
    if max_prompt_tokens is not None and too_long != "truncate" and keep:
        lengths = count_tokens(tokenizer, [apply_template(template, raw_prompts[i]) for i in keep])
        over = [j for j, length in enumerate(lengths) if length > max_prompt_tokens]
        if over and too_long == "error":
            raise DataConfigError(
                f"{len(over)} prompts in split {split!r} are longer than "
                f"max_prompt_tokens={max_prompt_tokens} tokens (longest {max(lengths)}, first: row "
                f"{ids[keep[over[0]]]}); set --data.too_long truncate or drop, or raise "
                "--data.max_prompt_tokens"
            )
        report.too_many_tokens_dropped = len(over)
        over_set = set(over)
        keep = [i for j, i in enumerate(keep) if j not in over_set]
    if not keep:
        raise DataConfigError(
            f"no prompts left in split {split!r} after filtering ({report.summary()}); loosen "
            "--data.min_chars / --data.max_chars / --data.max_prompt_tokens or fix the data"
        )

    # 4. evaluation subset
    if max_prompts is not None and len(keep) > max_prompts:
        report.beyond_max_eval_prompts = len(keep) - max_prompts
        keep = keep[:max_prompts]

    # 5. truncation: cut the end of the inserted text, never the template
    texts = [raw_prompts[i] for i in keep]
    cut = [False] * len(texts)
    limits = []
    if max_prompt_tokens is not None and too_long == "truncate":
        limits.append((PromptTokenLimit(tokenizer, max_prompt_tokens, "--data.max_prompt_tokens"), "truncated"))
    if model_limit is not None:
        limits.append((model_limit, "truncated_to_model_limit"))
    for limit, counter in limits:
        lengths = count_tokens(limit.tokenizer, [apply_template(template, text) for text in texts])
        over = [j for j, length in enumerate(lengths) if length > limit.max_tokens]
        for j in over:
            texts[j] = truncate_to_token_limit(limit.tokenizer, template, texts[j], limit.max_tokens, limit.option)
            cut[j] = True
        setattr(report, counter, len(over))

    table = PromptTable(
        prompts=[apply_template(template, text) for text in texts],
        references=[_reference_texts([values[i] for values in reference_values]) for i in keep],
        prompt_ids=[ids[i] for i in keep],
        truncated=cut,
        ids=None if row_id_values is None else [row_id_values[i] for i in keep],
    )
    report.kept = len(table)
    return table, report


# --------------------------------------------------------------------------------------------
# Evaluation dataset and collate
# --------------------------------------------------------------------------------------------
class EvalPromptDataset(TorchDataset):
    """Finite map-style dataset: each prompt of ``table`` repeated ``samples_per_prompt`` times.

    Item ``i`` is prompt ``i // k``, sample ``i % k`` (prompt-major, so a prompt's samples are
    adjacent). Under DDP, Lightning's ``DistributedSampler`` shards it and pads the last round
    by repeating items: deduplicate per-sample results by ``(prompt_id, sample)``.
    """

    def __init__(self, table: PromptTable, samples_per_prompt: int = 1) -> None:
        self.table = table
        self.samples_per_prompt = samples_per_prompt

    def __len__(self) -> int:
        return len(self.table) * self.samples_per_prompt

    def __getitem__(self, index: int) -> tuple[int, int]:
        """``(row, sample)`` of item ``index``; :meth:`collate` turns a list of them into a batch."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return divmod(index, self.samples_per_prompt)

    def collate(self, items: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """The batch format of :meth:`PromptTable.batch` for ``(row, sample)`` items."""
        return self.table.batch([row for row, _ in items], [sample for _, sample in items])


# --------------------------------------------------------------------------------------------
# The LightningDataModule
# --------------------------------------------------------------------------------------------
def _load_tokenizer(name: str) -> Any:
    from flan_rlhf.policy import ModelLoadError, load_tokenizer  # transformers: only when a token limit is used

    try:
        return load_tokenizer(name)
    except ModelLoadError as err:
        reason = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else str(err)
        raise DataConfigError(
            f"cannot load tokenizer {name!r} for --data.max_prompt_tokens ({reason}); offline, pass a local "
            "folder saved with tokenizer.save_pretrained as --data.tokenizer, or unset "
            "--data.max_prompt_tokens"
        ) from err


class PromptDataModule(LightningDataModule):
    """Prompts and references for RLHF-PPO training and evaluation of seq2seq policies.

    Exactly one source: ``dataset`` or ``builtin``. The training dataloader is infinite and
    resumable (see :mod:`flan_rlhf.data.stream`): use ``max_steps`` and an integer
    ``val_check_interval`` with ``check_val_every_n_epoch=None``. Evaluation dataloaders are
    finite and in file order.

    Args:
        dataset: Hub name (e.g. ``knkarthick/dialogsum``), a builder ``json``/``csv``/``parquet``
            used with ``data_files``, a local data file (one split ``train``), or a folder saved
            with ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``.
        data_files: files for a builder: ``{split: path or [paths]}``, or one path / list of paths
            (= split ``train``). Globs allowed. Each split is loaded separately, so splits may
            have different columns.
        builtin: name of a prompt set shipped with the package instead of ``dataset``:
            ``tiny`` (64 short dialogues with a summary each; splits train/validation/test).
        dataset_config: Hub configuration name (second argument of ``datasets.load_dataset``).
        train_split: split used for training (and divided when ``split_fractions`` is set).
        val_split: split used for validation; null disables validation.
        test_split: split used for ``test``; null means no test split.
        predict_split: split used for ``predict``; null = the test split.
        split_fractions: ``[train, validation]`` or ``[train, validation, test]`` fractions
            (summing to 1) of ``train_split``, drawn with ``seed``; use when the source has a
            single split. Validation and test then come from these parts (null ``val_split``
            still disables validation).
        prompt_column: column with the prompt text (``a.b`` reaches a nested field, e.g.
            ``prompt.text`` in RealToxicityPrompts).
        id_column: column whose value every prompt carries as ``id`` into predict rows, compare rows
            and the report's samples (DialogSum: ``fname``); null = rows carry only ``prompt_id``.
        reference_columns: columns with reference texts; each split uses those of them it has,
            in this order (DialogSum: ``[summary, summary1, summary2, summary3]`` gives 1
            reference in train and 3 in test). Every listed column must exist in some split,
            and every used split needs at least one. ``[]`` = no references.
        template: prompt template: a preset (``raw``, ``summarize_dialogue``, ``continue_text``)
            or a custom string with one ``{text}`` placeholder.
        min_chars: drop prompts whose raw text has fewer characters (the popular DialogSum
            detox recipe uses 200).
        max_chars: drop prompts whose raw text has more characters (that recipe: 1000).
        filter_splits: the splits ``min_chars``/``max_chars`` apply to: the training split only by
            default, so validation and test stay the dataset's own (and comparable with published
            scores); add ``validation``, ``test``, ``predict`` to filter those too.
        max_prompt_tokens: maximum tokens of the templated prompt (special tokens included);
            needs ``tokenizer``.
        tokenizer: tokenizer name or local folder used to count prompt tokens.
        too_long: prompts over ``max_prompt_tokens``: ``truncate`` the end of the inserted text (the
            template is kept; counted), ``drop`` them (counted), or ``error``. Independently, a prompt
            over the model's ``truncate_prompt_tokens`` always has its inserted text cut to fit.
        empty_prompts: null/empty/whitespace/non-string prompts: ``drop`` (count logged) or ``error``.
        batch_size: training prompts per batch on each device (one PPO iteration's rollout batch).
        eval_batch_size: prompts (samples) per evaluation batch on each device.
        num_workers: DataLoader worker processes (0 = load in the main process).
        seed: seed of the training order and of ``split_fractions``.
        max_eval_prompts: keep only the first this many prompts of validation/test/predict splits.
        samples_per_prompt: evaluation samples per prompt (``k``; each batch row has a ``sample``
            index), e.g. 25 for Expected Maximum Toxicity.
        cache_dir: ``datasets`` cache folder (null = ``HF_DATASETS_CACHE``).
    """

    def __init__(
        self,
        dataset: str | None = None,
        data_files: dict[str, str | list[str]] | str | list[str] | None = None,
        builtin: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        predict_split: str | None = None,
        split_fractions: Sequence[float] | None = None,
        prompt_column: str = "dialogue",
        id_column: str | None = None,
        reference_columns: Sequence[str] = ("summary",),
        template: str = "raw",
        min_chars: int | None = None,
        max_chars: int | None = None,
        filter_splits: Sequence[Literal["train", "validation", "test", "predict"]] = ("train",),
        max_prompt_tokens: int | None = None,
        tokenizer: str | None = None,
        too_long: Literal["truncate", "drop", "error"] = "truncate",
        empty_prompts: Literal["drop", "error"] = "drop",
        batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        max_eval_prompts: int | None = None,
        samples_per_prompt: int = 1,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (dataset is None) == (builtin is None):
            raise DataConfigError(
                "set exactly one data source: --data.dataset (Hub name, json/csv/parquet with "
                "--data.data_files, a file or a saved folder) or --data.builtin tiny"
            )
        if too_long not in ("truncate", "drop", "error") or empty_prompts not in ("drop", "error"):
            raise DataConfigError(
                f"too_long must be truncate/drop/error and empty_prompts drop/error; got {too_long!r}, "
                f"{empty_prompts!r}"
            )
        if max_prompt_tokens is not None and (tokenizer is None or max_prompt_tokens <= 0):
            raise DataConfigError(
                "--data.max_prompt_tokens needs a positive value and --data.tokenizer (a tokenizer name or "
                "local folder)"
            )
        unknown = [name for name in filter_splits if name not in ROLES]
        if unknown:
            raise DataConfigError(f"--data.filter_splits names {unknown}; choose from {list(ROLES)}")
        if min_chars is not None and max_chars is not None and min_chars > max_chars:
            raise DataConfigError(
                f"min_chars={min_chars} is greater than max_chars={max_chars}; swap or loosen them"
            )
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("samples_per_prompt", samples_per_prompt)):
            if value < 1:
                raise DataConfigError(f"--data.{name} must be at least 1, got {value}")
        if max_eval_prompts is not None and max_eval_prompts < 1:
            raise DataConfigError(
                f"--data.max_eval_prompts must be at least 1 or null, got {max_eval_prompts}"
            )
        if seed < 0 or num_workers < 0:
            raise DataConfigError(
                f"--data.seed and --data.num_workers must be >= 0, got {seed} and {num_workers}"
            )
        self.dataset = dataset
        self.data_files = data_files
        self.builtin = builtin
        self.dataset_config = dataset_config
        self.split_names = {"train": train_split, "validation": val_split, "test": test_split,
                            "predict": predict_split if predict_split is not None else test_split}
        self.split_fractions = list(split_fractions) if split_fractions is not None else None
        self.prompt_column = prompt_column
        self.id_column = id_column
        self.reference_columns = list(reference_columns)
        self.template = resolve_template(template)
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.filter_splits = tuple(filter_splits)
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer_name = tokenizer
        self.too_long = too_long
        self.empty_prompts = empty_prompts
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.max_eval_prompts = max_eval_prompts
        self.samples_per_prompt = samples_per_prompt
        self.cache_dir = cache_dir
        self.tables: dict[str, PromptTable] = {}
        self.reports: dict[str, SplitReport] = {}
        self._source: DatasetDict | None = None
        self._tokenizer: Any = None
        self._resume_state: dict[str, Any] | None = None
        self._model_limit: PromptTokenLimit | None = None

    # ---- the model's prompt-token cap ----------------------------------------------------
    def follow_model(self, model: Any) -> None:
        """Cut prompts to ``model``'s prompt-token cap here, on the inserted text, before the model sees them.

        ``model`` provides it through ``prompt_token_limit()`` (a :class:`~flan_rlhf.tokens.PromptTokenLimit`
        or None); a model without that method leaves the prompts as they are. :meth:`setup` calls this with
        the trainer's module; call it yourself before :meth:`setup` when no trainer runs the module.
        Splits prepared under another cap are prepared again.
        """
        limit_of = getattr(model, "prompt_token_limit", None)
        limit = limit_of() if callable(limit_of) else None
        previous = self._model_limit
        cap_of = (lambda cap: None if cap is None else cap.max_tokens)
        if cap_of(previous) != cap_of(limit):
            self.tables, self.reports = {}, {}
        self._model_limit = limit

    # ---- loading -------------------------------------------------------------------------
    def _load_source(self) -> DatasetDict:
        if self.builtin is not None:
            source = load_builtin(self.builtin)
        else:
            assert self.dataset is not None
            source = load_source(self.dataset, self.data_files, self.dataset_config, self.cache_dir)
        wanted = [self.prompt_column, *self.reference_columns]
        nested = [c for c in wanted if "." in c and any(c not in ds.column_names for ds in source.values())]
        if nested:
            # struct fields become "a.b" columns
            source = DatasetDict({name: ds.flatten() for name, ds in source.items()})
        columns_by_split = {name: ds.column_names for name, ds in source.items()}
        for column in self.reference_columns:
            if not any(column in columns for columns in columns_by_split.values()):
                raise DataConfigError(
                    f"reference column {column!r} (--data.reference_columns) is in no split; the columns are "
                    f"{columns_by_split}; remove it or fix its name"
                )
        return source

    def prepare_data(self) -> None:
        """Download / build the ``datasets`` cache once per node (Lightning calls it on local rank 0 only)."""
        if self.dataset is not None:
            load_source(self.dataset, self.data_files, self.dataset_config, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Prepare the splits a stage needs (fit: train + validation; validate; test; predict)."""
        model = getattr(self.trainer, "lightning_module", None)
        if model is not None:
            self.follow_model(model)
        roles = STAGE_ROLES.get(stage, ROLES) if stage is not None else ROLES
        if stage is None and self.split_fractions is not None and len(self.split_fractions) == 2:
            roles = ("train", "validation")  # "everything" = the parts that exist
        roles = [role for role in roles if self.split_names[role] is not None and role not in self.tables]
        if not roles:
            return
        if self._source is None:
            self._source = self._load_source()
        for role in roles:
            same_as_test = self.split_names["predict"] == self.split_names["test"] and "test" in self.tables
            if role == "predict" and same_as_test:
                self.tables[role] = self.tables["test"]
                self.reports[role] = self.reports["test"]
                continue
            table, report = self._prepare_role(role)
            self.tables[role], self.reports[role] = table, report
            if rank_zero_only.rank == 0:  # on stdout, beside the command's other lines
                print(report.summary(), flush=True)

    def _tokenizer_or_none(self) -> Any:
        if self.max_prompt_tokens is None:
            return None
        if self._tokenizer is None:
            assert self.tokenizer_name is not None
            self._tokenizer = _load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def _prepare_role(self, role: str) -> tuple[PromptTable, SplitReport]:
        assert self._source is not None
        if self.split_fractions is None:
            split = self.split_names[role]
            assert split is not None
            dataset, row_ids = get_split(self._source, split, ROLE_OPTIONS[role]), None
        else:
            split = self.split_names["train"]
            assert split is not None
            whole = get_split(self._source, split, "train_split")
            parts = fractional_split_indices(len(whole), self.split_fractions, self.seed)
            part = {"train": 0, "validation": 1, "test": 2, "predict": 2}[role]
            if part >= len(parts):
                raise DataConfigError(
                    f"--data.split_fractions {self.split_fractions} has no test part for {role}; give three "
                    "fractions [train, validation, test] or set --data.test_split null"
                )
            row_ids = parts[part]
            dataset = whole.select(row_ids)
            split = f"{split}[part {part} of split_fractions]"
        return prepare_prompts(
            dataset, role=role, split=split, prompt_column=self.prompt_column, id_column=self.id_column,
            reference_columns=self.reference_columns, template=self.template, row_ids=row_ids,
            **self._character_filter(role), empty_prompts=self.empty_prompts,
            tokenizer=self._tokenizer_or_none(), max_prompt_tokens=self.max_prompt_tokens,
            too_long=self.too_long,
            max_prompts=None if role == "train" else self.max_eval_prompts, model_limit=self._model_limit,
        )

    def _character_filter(self, role: str) -> dict[str, int | None]:
        """``min_chars``/``max_chars`` for ``role``: the settings when ``role`` is in ``filter_splits``, else none."""
        if role in self.filter_splits:
            return {"min_chars": self.min_chars, "max_chars": self.max_chars}
        return {"min_chars": None, "max_chars": None}

    def _table(self, role: str) -> PromptTable:
        if role not in self.tables:
            self.setup({"train": "fit", "validation": "validate"}.get(role, role))
        return self.tables[role]

    # ---- dataloaders ---------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Infinite training batches, starting at batch ``trainer.global_step`` (exact resume)."""
        table = self._table("train")
        start_batch, rank, world_size = stream_position(self.trainer)
        self._check_resume_state(table, world_size)
        stream = PromptBatchStream(
            n_rows=len(table), batch_size=self.batch_size, seed=self.seed, start_batch=start_batch,
            rank=rank, world_size=world_size, make_batch=table.batch,
        )
        return DataLoader(stream, batch_size=None, num_workers=self.num_workers)

    def _eval_dataloader(self, role: str) -> DataLoader | list:
        if self.split_names[role] is None:
            return []
        dataset = EvalPromptDataset(self._table(role), self.samples_per_prompt)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, collate_fn=dataset.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation prompts in file order, each ``samples_per_prompt`` times (``[]`` without a split)."""
        return self._eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader | list:
        """Test prompts in file order, each repeated ``samples_per_prompt`` times."""
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader | list:
        """Prediction prompts (``predict_split``, default the test split), as for test."""
        return self._eval_dataloader("predict")

    # ---- resume check --------------------------------------------------------------------
    def _train_state(self, table: PromptTable, world_size: int) -> dict[str, Any]:
        return {"train_rows": len(table), "train_fingerprint": table.fingerprint(), "seed": self.seed,
                "batch_size": self.batch_size, "world_size": world_size}

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: what determines the training order, to verify it on resume."""
        if "train" not in self.tables:
            return {}
        return self._train_state(self.tables["train"], stream_position(self.trainer)[2])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the checkpoint's training-order state; checked when the train dataloader is built."""
        self._resume_state = dict(state_dict) if state_dict else None

    def _check_resume_state(self, table: PromptTable, world_size: int) -> None:
        if not self._resume_state:
            return
        saved, now = self._resume_state, self._train_state(table, world_size)
        differences = [
            f"{key}: {saved[key]} then, {now[key]} now"
            for key in ("train_rows", "seed", "batch_size")
            if key in saved and saved[key] != now[key]
        ]
        if not differences and saved.get("train_fingerprint") not in (None, now["train_fingerprint"]):
            differences.append("same number of rows but different prompts")
        if differences:
            raise DataConfigError(
                f"the training data or its order differ from the checkpoint's ({'; '.join(differences)}); "
                "resume with the data settings the checkpoint was written with, or start a new run without "
                "--ckpt_path"
            )
        if saved.get("world_size", world_size) != world_size:
            rank_zero_warn(
                f"resuming with world_size={world_size} but the checkpoint was written with "
                f"{saved['world_size']}: global batches are cut differently from here on, so the data order "
                "is not the uninterrupted one"
            )
