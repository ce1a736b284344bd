"""Small prompt sets shipped inside the package, so tiny configs and tests need no files.

``tiny``: 64 short two-person dialogues in DialogSum's format (``#Person1#: ...`` turns, one
reference summary each), hand-written for this package: everyday topics (shopping, travel,
work, health, school, repairs), a few with a rude or irritated speaker so a toxicity reward
has something to react to. Columns ``dialogue`` and ``summary`` (the datamodule's defaults);
splits ``train`` (48 rows), ``validation`` (8) and ``test`` (8), as stored in the file's
``split`` field.
"""
from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, DatasetDict

from flan_rlhf.data.loading import DataConfigError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_DATASETS: dict[str, Path] = {"tiny": ASSETS_DIR / "tiny_prompts.jsonl"}


def load_builtin(name: str) -> DatasetDict:
    """Load a built-in prompt set as a ``DatasetDict`` split by each row's ``split`` field.

    Raises:
        DataConfigError: unknown name (the message lists the available ones).
    """
    if name not in BUILTIN_DATASETS:
        raise DataConfigError(
            f"unknown built-in dataset {name!r}; choose one of {sorted(BUILTIN_DATASETS)} for --data.builtin"
        )
    rows_by_split: dict[str, list[dict]] = {}
    with open(BUILTIN_DATASETS[name], encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                rows_by_split.setdefault(row.pop("split"), []).append(row)
    return DatasetDict({split: Dataset.from_list(rows) for split, rows in rows_by_split.items()})
