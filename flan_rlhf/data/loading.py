"""Read a prompt source into a ``datasets.DatasetDict`` and pick or carve out its splits.

Supported sources (``dataset`` argument of :func:`load_source`):

- a Hub name such as ``"knkarthick/dialogsum"`` (``datasets.load_dataset``);
- a file builder ``"json"`` / ``"csv"`` / ``"parquet"`` together with ``data_files``;
- a local file (``.jsonl``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``): one split named ``"train"``;
- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``;
  a saved single ``Dataset`` becomes the split ``"train"``);
- any other local folder is handed to ``datasets.load_dataset`` (folder-based loading).

Local JSON / JSON-lines / CSV files are checked before loading so that bad input fails with
one line naming the file and line: ``datasets`` itself reports a JSON error as "row 1" of an
internal block, and loads invalid UTF-8 without complaint only to fail when a row is read.
When ``data_files`` names several splits, each split is loaded on its own, because
``datasets`` casts every split of one builder to the first split's columns (the DialogSum
release has ``summary`` in train but ``summary1..3`` in test).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Sequence, Union

import numpy as np
import datasets
from datasets import Dataset, DatasetDict, load_from_disk

from flan_rlhf.io import DATASETS_BUILDERS, TextFileError, file_format, read_utf8
from flan_rlhf.quiet import library_progress_bars_off

DataFiles = Union[str, Sequence[str], dict[str, Union[str, Sequence[str]]]]

FILE_BUILDERS = tuple(dict.fromkeys(DATASETS_BUILDERS.values()))  # ("json", "csv", "parquet")
COMPRESSED_EXTENSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
OFFLINE_HINT = (
    "pass local files instead, e.g. --data.dataset json --data.data_files '{train: train.jsonl, validation: "
    "validation.jsonl}', or a folder saved with DatasetDict.save_to_disk as --data.dataset"
)


class DataConfigError(ValueError):
    """The data configuration or the data itself is unusable; the message names the fix."""


def _is_remote(path: str) -> bool:
    return "://" in path


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a Hub id: starts like a path or ends with a data-file extension."""
    return name.startswith((".", "/", "~")) or _file_builder(name) is not None


def _file_builder(path: str) -> str | None:
    """The ``datasets`` builder for a local file, by its suffix (:data:`flan_rlhf.io.FORMATS`)."""
    return DATASETS_BUILDERS.get(file_format(path))


def _normalise_data_files(data_files: DataFiles) -> dict[str, list[str]]:
    """``data_files`` as ``{split: [paths]}``; a bare path or list of paths is the ``"train"`` split."""
    if isinstance(data_files, str):
        return {"train": [data_files]}
    if isinstance(data_files, dict):
        return {
            split: [files] if isinstance(files, str) else list(files) for split, files in data_files.items()
        }
    return {"train": list(data_files)}


def _expand_local_files(patterns: list[str]) -> list[str]:
    """Expand globs of local paths; remote URLs pass through unchanged.

    Raises:
        DataConfigError: a local path or glob matches no file.
    """
    expanded: list[str] = []
    for pattern in patterns:
        if _is_remote(pattern):
            expanded.append(pattern)
            continue
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
        else:
            matches = [pattern] if os.path.isfile(pattern) else []
        if not matches:
            raise DataConfigError(
                f"data file {pattern!r} does not exist; check the path in --data.data_files / --data.dataset"
            )
        expanded.extend(matches)
    return expanded


def check_text_file(path: str, builder: str) -> None:
    """Check a local file before ``datasets`` reads it: UTF-8 for csv/json, one JSON object per line for json.

    A ``.json``/``.jsonl`` file that parses as one JSON document (an array of objects, or an
    object) is accepted as a whole; otherwise every non-blank line must be a JSON object.
    Compressed and parquet files are not checked here (``datasets`` reports those).

    Raises:
        DataConfigError: naming the file and, for JSON lines, the 1-based line number.
    """
    if builder not in ("json", "csv") or os.path.splitext(path)[1].lower() in COMPRESSED_EXTENSIONS:
        return
    try:
        text = read_utf8(path)
    except TextFileError as err:  # "<path> is not valid UTF-8 (line L, byte B: reason)"
        name = os.path.basename(path)
        raise DataConfigError(
            f"{err}; re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {name} > fixed.jsonl"
        ) from None
    if not text.strip():
        raise DataConfigError(
            f"{path} is empty (no rows); fill it or point --data.data_files at the right file"
        )
    if builder != "json":
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataConfigError(
                f"{path} line {err.lineno} is not valid JSON ({err.msg}, column {err.colno}); fix the file"
            ) from None
        return
    if stripped.startswith("{"):
        try:
            json.loads(text)
            return  # a single JSON object (e.g. read with a field); datasets decides if it fits
        except json.JSONDecodeError:
            pass  # not one document: must be JSON lines, checked below
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataConfigError(
                f"{path} line {line_number} is not valid JSON ({err.msg}, column {err.colno}); a JSON-lines "
                "file needs exactly one JSON object per line"
            ) from None
        if not isinstance(value, dict):
            raise DataConfigError(
                f"{path} line {line_number} is a JSON {type(value).__name__}, not an object; a JSON-lines "
                "file needs one object per line, e.g. {\"dialogue\": \"...\", \"summary\": \"...\"}"
            )


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _load_files(builder: str, files_by_split: dict[str, list[str]], cache_dir: str | None) -> DatasetDict:
    """Load local/remote files with a packaged builder, one split at a time (see module docstring)."""
    extra = {}
    if builder == "csv" and all(path.endswith(".tsv") for files in files_by_split.values() for path in files):
        extra["sep"] = "\t"
    splits = {}
    for split, patterns in files_by_split.items():
        files = _expand_local_files(patterns)
        for path in files:
            if not _is_remote(path):
                check_text_file(path, builder)
        try:
            with library_progress_bars_off():  # local files load in a blink; the data lines say what was read
                loaded = datasets.load_dataset(builder, data_files={split: files}, cache_dir=cache_dir, **extra)
        except Exception as err:  # datasets wraps parser errors in several exception types
            cause = _root_cause(err)
            if "corresponds to no data" in str(cause):  # e.g. a CSV file with only a header
                raise DataConfigError(
                    f"{', '.join(files)} has no rows for split {split!r}; fill it or point --data.data_files "
                    "at the right file"
                ) from err
            raise DataConfigError(
                f"could not read {', '.join(files)} as {builder}: {type(cause).__name__}: "
                f"{str(cause).splitlines()[0] if str(cause) else ''}; check the file format matches "
                f"--data.dataset {builder}"
            ) from err
        splits[split] = loaded[split]
    return DatasetDict(splits)


def _load_hub(
    name: str, config_name: str | None, data_files: DataFiles | None, cache_dir: str | None
) -> DatasetDict:
    try:
        loaded = datasets.load_dataset(name, config_name, data_files=data_files, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, TimeoutError) as err:
        # Offline: ConnectionError "Couldn't reach '<name>' on the Hub (OfflineModeIsEnabled)";
        # online but unknown: DatasetNotFoundError (a FileNotFoundError).
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataConfigError(
            f"cannot load dataset {name!r} from the Hugging Face Hub ({reason}); {OFFLINE_HINT}"
        ) from err
    if isinstance(loaded, Dataset):
        return DatasetDict({"train": loaded})
    return loaded


def load_source(
    dataset: str,
    data_files: DataFiles | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load a prompt source into a ``DatasetDict`` (see the module docstring for the accepted forms).

    Args:
        dataset: Hub name, builder name (``json``/``csv``/``parquet``), local file, or local folder.
        data_files: files for a builder (``{split: path_or_paths}``, a path, or a list of paths =
            split ``train``); with a Hub name they are passed through to ``load_dataset``.
        config_name: Hub configuration name (second argument of ``load_dataset``).
        cache_dir: ``datasets`` cache folder (``None`` = ``HF_DATASETS_CACHE``).

    Raises:
        DataConfigError: unreadable files, missing paths, an unreachable Hub dataset (with the
            local-file alternative in the message).
    """
    expanded = os.path.expanduser(dataset)
    if os.path.isdir(expanded):
        if any(os.path.isfile(os.path.join(expanded, marker)) for marker in SAVED_DATASET_MARKERS):
            loaded = load_from_disk(expanded)
            return DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded
        return _load_hub(expanded, config_name, data_files, cache_dir)
    if os.path.isfile(expanded):
        builder = _file_builder(expanded)
        if builder is None:
            raise DataConfigError(
                f"cannot tell the format of {dataset!r} from its extension; use --data.dataset "
                f"{'/'.join(FILE_BUILDERS)} with --data.data_files {dataset}"
            )
        if data_files is not None:
            raise DataConfigError(
                f"--data.dataset is the file {dataset!r} and --data.data_files is also set; use one: "
                f"--data.dataset {builder} --data.data_files '{{train: ...}}'"
            )
        return _load_files(builder, {"train": [expanded]}, cache_dir)
    if dataset in FILE_BUILDERS:
        if data_files is None:
            raise DataConfigError(
                f"--data.dataset {dataset} needs --data.data_files, e.g. --data.data_files '{{train: "
                f"train.{dataset}}}'"
            )
        return _load_files(dataset, _normalise_data_files(data_files), cache_dir)
    if _looks_like_path(dataset):
        raise DataConfigError(f"dataset path {dataset!r} does not exist; check --data.dataset")
    return _load_hub(dataset, config_name, data_files, cache_dir)


def get_split(source: DatasetDict, split: str, option: str) -> Dataset:
    """Return ``source[split]``.

    Raises:
        DataConfigError: the split is absent; the message lists the splits that exist.
    """
    if split not in source:
        raise DataConfigError(
            f"split {split!r} (--data.{option}) is not in the dataset, which has splits {sorted(source)}; "
            f"set --data.{option} to one of them, or use --data.split_fractions to carve splits out of one"
        )
    return source[split]


def check_split_fractions(fractions: Sequence[float]) -> list[float]:
    """Validate ``[train, validation]`` or ``[train, validation, test]`` fractions summing to 1."""
    values = [float(value) for value in fractions]
    if len(values) not in (2, 3) or any(value < 0 for value in values) or abs(sum(values) - 1.0) > 1e-6:
        raise DataConfigError(
            f"split_fractions {values} must be 2 or 3 non-negative numbers summing to 1 ([train, validation] "
            "or [train, validation, test]), e.g. --data.split_fractions '[0.8, 0.1, 0.1]'"
        )
    return values


def fractional_split_indices(n_rows: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded row indices of each part of a fractional split.

    Parts after the first get ``floor(fraction * n_rows)`` rows, the first part (train) the
    rest. The rows are taken as consecutive chunks of ``np.random.default_rng(seed).permutation(n_rows)``
    (train first), and each part's indices are then sorted so that rows keep their file order.

    Returns:
        One int64 array per fraction; together they partition ``range(n_rows)``.
    """
    values = check_split_fractions(fractions)
    sizes = [int(np.floor(value * n_rows)) for value in values[1:]]
    sizes.insert(0, n_rows - sum(sizes))
    permutation = np.random.default_rng(seed).permutation(n_rows)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(permutation[bounds[i] : bounds[i + 1]]) for i in range(len(sizes))]
