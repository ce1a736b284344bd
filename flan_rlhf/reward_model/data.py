"""Preference pairs ``(prompt, chosen, rejected)`` for the reward model, from ``datasets``.

:class:`PreferenceDataModule` reads a hub name (the Anthropic/hh-rlhf format: ``chosen`` and
``rejected`` columns holding whole conversations), local json/jsonl/csv/parquet files (column
names are configurable) or a label store written by ``flan-rlhf label``. Batches are lists of
strings: the model tokenizes them.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from flan_rlhf.data.loading import DataConfigError, load_source
from flan_rlhf.data.stream import PromptBatchStream, stream_position
from flan_rlhf.errors import first_line
from flan_rlhf.io import table_format
from flan_rlhf.quiet import library_progress_bars_off

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # the flan_rlhf.io.FORMATS read as preference files
#: the columns of the pairs a label store gives (:func:`flan_rlhf.label_store.preference_pairs`, TRL's names)
STORE_COLUMNS = {"prompt_column": "prompt", "chosen_column": "chosen", "rejected_column": "rejected"}
#: where a conversation's last turn to answer begins, in Anthropic/hh-rlhf's format
ASSISTANT_TURN = "\n\nAssistant:"


def split_shared_prompt(chosen: str, rejected: str, turn_marker: str = ASSISTANT_TURN) -> tuple[str, str, str]:
    """``(prompt, chosen_response, rejected_response)`` of a pair whose texts both hold the prompt.

    The prompt is the start the two texts share, cut just after the last ``turn_marker`` in it (hh-rlhf:
    the conversation up to the final ``"\n\nAssistant:"``), else at the last whitespace inside it, so
    no word is split between prompt and response (TRL's ``extract_prompt`` cuts at the first differing
    character). Examples: ``("H: hi\n\nAssistant: Hello!", "H: hi\n\nAssistant: Go away.")`` ->
    ``("H: hi\n\nAssistant:", " Hello!", " Go away.")``; ``("Say hi. Hi there", "Say hi. Hi you")`` ->
    ``("Say hi. Hi", " there", " you")``; no shared start -> ``("", chosen, rejected)``.
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    if shared == len(chosen) or shared == len(rejected):  # one text is a prefix of the other: keep a word back
        shared = max(0, shared - 1)
    prefix = chosen[:shared]
    marker = prefix.rfind(turn_marker) if turn_marker else -1
    if marker >= 0:
        cut = marker + len(turn_marker)
    else:
        spaces = [i for i, ch in enumerate(prefix) if ch.isspace()]
        cut = spaces[-1] if spaces else 0
    return chosen[:cut], chosen[cut:], rejected[cut:]


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs from a ``datasets`` hub name, local files or a label store.

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
        prompt_column: column with the prompt, or ``None`` when chosen/rejected already hold it
            (with ``store``: ``prompt``, the store's column, without being set).
        split_prompt: with no ``prompt_column``, give batches a ``prompt``: the start chosen and
            rejected share (hh-rlhf: the conversation up to the last ``Assistant:``), their rest as
            the responses (:func:`split_shared_prompt`). DPO needs a prompt; the reward model does not.
        max_train_samples: keep only this many training pairs (``None``: all).
        max_val_samples: keep only this many validation pairs.
        batch_size: pairs per batch (the model sees ``2 * batch_size`` sequences).
        num_workers: DataLoader workers.
        seed: shuffling and hold-out seed.
        stream: training batches as one endless stream in a fixed order (a new shuffle every pass),
            starting at batch ``trainer.global_step``, so a resumed run sees exactly the batches an
            uninterrupted one would (:mod:`flan_rlhf.data.stream`); for modules that make one step per
            batch (DPO), with ``trainer.max_steps``. ``false``: one shuffled pass per epoch (the reward model).
        store: a label store written by ``flan-rlhf label`` (a SQLAlchemy URL, e.g.
            ``sqlite:///labels.db``): its labels that prefer one response are the pairs, with their
            prompt; ties and 'both unacceptable' carry no preference and are left out (counted in the
            log). Replaces ``dataset``. A store has no test split: ``val_fraction`` of its pairs are
            held out for validation; the columns are ``prompt``/``chosen``/``rejected``.

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
        stream: bool = False,
        split_prompt: bool = False,
        store: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if store is not None:
            prompt_column = _store_prompt_column(chosen_column, rejected_column, prompt_column)
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
        self.stream = stream
        self.split_prompt = split_prompt
        self.store = store
        self.train_data = None
        self.val_data = None
        self.dropped: dict[str, int] = {}

    # -- loading ---------------------------------------------------------------------------
    def _load_dataset_dict(self):
        """The source as a ``DatasetDict`` through :func:`flan_rlhf.data.loading.load_source` (the
        package's one ``datasets`` loader: local files are checked for UTF-8 and JSON lines first),
        with a local file as split ``train_split`` and one-line errors."""
        from datasets import DatasetDict

        if self.store is not None:
            return DatasetDict({self.train_split: self._store_pairs()})
        path = Path(self.dataset)
        if path.is_file():
            table_format(path, LOCAL_SUFFIXES, what=f"preference file {path}")  # names the accepted suffixes
            return DatasetDict({self.train_split: load_source(str(path))["train"]})
        try:
            return load_source(self.dataset, config_name=self.dataset_config)
        except DataConfigError as err:
            if not isinstance(err.__cause__, (ConnectionError, OSError, TimeoutError)):
                raise
            raise ConnectionError(
                f"cannot load preference dataset {self.dataset!r} ({first_line(err.__cause__)[:200]}); offline, "
                f"pass a local json/jsonl/csv/parquet file with '{self.chosen_column}'/'{self.rejected_column}' "
                "columns as `dataset`"
            ) from err

    def _store_pairs(self):
        """The pairs of the label store as a ``Dataset`` of prompt/chosen/rejected rows; the counts of
        ties and 'both unacceptable' labels left out are logged."""
        from datasets import Dataset

        from flan_rlhf.label_store import LabelStore, preference_pairs, without_preference  # sqlalchemy only

        labels = LabelStore(self.store)
        try:
            rows, skipped = preference_pairs(labels.judgements())
        finally:
            labels.close()
        left_out = without_preference(skipped)
        if not rows:
            raise DataConfigError(f"the label store {self.store} holds no label that prefers one response "
                                  f"({left_out}) - label more pairs with `flan-rlhf label`")
        rank_zero_info(f"label store {self.store}: {len(rows)} preference pairs (left out: {left_out})")
        return Dataset.from_list(rows)

    def _source(self) -> str:
        """The source as error messages name it."""
        return f"label store {self.store!r}" if self.store is not None else repr(self.dataset)

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
            fix = ("label more pairs, or raise val_fraction" if self.store is not None
                   else "add pairs, raise val_fraction, or provide a val_split")
            raise DataConfigError(f"cannot hold out {self.val_fraction:.0%} of {len(train)} pairs of {self._source()} "
                                  f"for validation: {fix}")
        held_out = train.train_test_split(test_size=self.val_fraction, seed=self.seed)
        return held_out["train"], held_out["test"]

    def _check_columns(self, data, split: str) -> None:
        missing = [column for column in self._columns() if column not in data.column_names]
        if missing:
            raise ValueError(
                f"{split} data of {self._source()} lacks column(s) {missing}; it has {data.column_names}: "
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
        with library_progress_bars_off():  # the project's data line says what was dropped
            data = data.filter(has_preference)
        self.dropped[split] = before - len(data)
        if self.dropped[split]:
            rank_zero_info(
                f"{split}: dropped {self.dropped[split]} of {before} pairs with empty or identical texts"
            )
        if len(data) == 0:
            raise ValueError(f"no usable preference pairs in the {split} data of {self._source()}")
        return data

    def prepare_data(self) -> None:
        """Download/cache the source once (rank 0); a label store needs no download (``setup`` reads it)."""
        if self.store is None:
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
        elif self.split_prompt:
            triples = [split_shared_prompt(c, r) for c, r in zip(batch["chosen"], batch["rejected"])]
            batch["prompt"], batch["chosen"], batch["rejected"] = (list(column) for column in zip(*triples))
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
        if not self.stream:
            return self._loader(self.train_data, shuffle=True)
        start_batch, rank, world_size = stream_position(self.trainer)
        batches = PromptBatchStream(n_rows=len(self.train_data), batch_size=self.batch_size, seed=self.seed,
                                    start_batch=start_batch, rank=rank, world_size=world_size,
                                    make_batch=self._rows_batch)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

    def _rows_batch(self, rows) -> dict[str, list[str]]:
        """The batch of training rows ``rows`` (an int array, from the stream)."""
        return self.collate([self.train_data[int(row)] for row in rows])

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_data, shuffle=False)


def _store_prompt_column(chosen_column: str, rejected_column: str, prompt_column: str | None) -> str:
    """The prompt column of a module reading a label store: ``prompt``, the store's. Column options
    naming other columns are refused: a store's pairs have no such columns."""
    given = {"chosen_column": chosen_column, "rejected_column": rejected_column, "prompt_column": prompt_column}
    clashes = [f"{key}={value!r}" for key, value in given.items()
               if value is not None and value != STORE_COLUMNS[key]]
    if clashes:
        raise DataConfigError(f"a label store's pairs have the columns prompt/chosen/rejected: drop "
                              f"{', '.join(clashes)} (they name a dataset's columns), or drop store")
    return STORE_COLUMNS["prompt_column"]
