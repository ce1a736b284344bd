"""``flan-rlhf score``: score every text of a file with any configured reward.

For auditing a dataset or another system's outputs::

    flan-rlhf score --reward ProfanityReward --input responses.jsonl --output scored.jsonl
    flan-rlhf score --reward configs/rewards/composite_nontoxic_positive.yaml --input outputs.parquet ...
    flan-rlhf score --reward ClassifierReward --reward.label nothate --input texts.csv --text_column text ...
    flan-rlhf score --reward RougeReward --input responses.jsonl --reference_column references ...

The defaults read what ``flan-rlhf generate`` writes: texts from ``response``, prompts from
``prompt`` when the file has that column.

Input (by suffix): ``.jsonl``, ``.json`` (a list of records, or JSON lines), ``.csv``
(quoted newlines inside fields are fine), ``.parquet``. Output: JSON lines, each the input
row plus one column per reward component plus ``reward``. Rows whose text is missing or blank
are not scored; the closing summary says how many were scored and how many skipped, and why.

A score that is NaN or infinite (a reward that failed on a text) is written as ``null``, counted
in the summary, and makes the exit status 2 unless ``--allow_nonfinite true`` is given. Bad input
(a missing, binary or unparseable file, a reward that cannot load) is one ``error:`` line, exit 2.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from jsonargparse.typing import PositiveInt

import flan_rlhf.rewards  # noqa: F401 - registers every Reward subclass for --reward NAME
from flan_rlhf.errors import first_line
from flan_rlhf.progress import RowProgress, seconds
from flan_rlhf.io import TextFileError, atomic_file, file_format, refuse_binary, suffix_choices, table_format
from flan_rlhf.rewards.base import Reward, RewardSetupError, set_up_reward
from flan_rlhf.rewards.text_batches import batched
from flan_rlhf.tools.command import FinishedWithProblem, UsageError, run_tool

INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # formats of flan_rlhf.io.FORMATS this reads
REWARD_COLUMN = "reward"
TEXT_COLUMN, PROMPT_COLUMN = "response", "prompt"  # what flan-rlhf generate writes


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a jsonl/json/csv/parquet file into a DataFrame with a real parser.

    CSV is read with every column as text and no NA guessing, so ``007`` stays ``007``, ``NA``
    stays ``NA``, an empty cell is ``""`` and only a row's absent trailing fields are missing.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix, or the file cannot be parsed (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist: check --input")
    if file_format(path) != "parquet":
        try:
            refuse_binary(path)
        except TextFileError:
            raise ValueError(f"input file {path} is binary, not {path.suffix} text: "
                             f"pass a {suffix_choices(INPUT_SUFFIXES)} file") from None
    kind = table_format(path, INPUT_SUFFIXES)
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return _read_json(path)
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot parse {path} as {kind} ({first_line(err)[:200]}): check the file format") from err


def _read_json(path: Path) -> pd.DataFrame:
    """A ``.json`` file: a list of records, ``{"data": [...]}``-style wrapper, or JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        return pd.read_json(path, lines=True, dtype=False)  # JSON lines saved as .json
    if isinstance(content, dict):
        lists = [value for value in content.values() if isinstance(value, list)]
        if len(lists) != 1:
            raise ValueError("a .json object must hold exactly one list of records")
        content = lists[0]
    if not isinstance(content, list):
        raise ValueError("expected a list of records")
    return pd.DataFrame.from_records(content)


def classify_text(value: object) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable text, else ``(None, reason)``: ``missing``, ``empty`` or ``not text``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None, "missing"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a number in a text column (e.g. JSON) is still text to score
    if not isinstance(value, str):
        return None, "not text"
    if not value.strip():
        return None, "empty"
    return value, None


def reference_texts(value: object) -> tuple[list[str], str | None]:
    """A cell of the reference column as a list of reference strings, or ``([], reason)`` when it has none.

    A string is one reference; a list (JSON, parquet) holds several; blank ones are dropped.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    items = value if isinstance(value, list) else [value]
    kept = [text for text in (classify_text(item)[0] for item in items) if text is not None]
    if kept:
        return kept, None
    return [], classify_text(items[0])[1] if len(items) == 1 else "empty"


def _json_value(value: object) -> object:
    """A DataFrame cell as something ``json.dumps`` writes (NaN/NA -> null, numpy -> Python)."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "tolist"):  # numpy scalars and arrays (parquet list columns)
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, (pd.Timestamp,)):
        return value.isoformat()
    return value


def score_rows(
    reward: Reward,
    texts: list[str],
    prompts: list[str],
    batch_size: int,
    progress: RowProgress | None = None,
    references: list[list[str]] | None = None,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score ``texts`` in batches; returns ``(reward per text, {component: per text})``.

    ``references``: one list of reference texts per text, for a reward that needs them.
    ``progress`` is advanced by the number of texts of each batch.
    """
    totals: list[float] = []
    parts: dict[str, list[float]] = {}
    index = list(range(len(texts)))
    for chunk in batched(index, batch_size):
        total, components = reward.score([prompts[i] for i in chunk], [texts[i] for i in chunk],
                                         None if references is None else [references[i] for i in chunk])
        totals.extend(total.tolist())
        for name, values in components.items():
            parts.setdefault(name, []).extend(values.tolist())
        if progress is not None:
            progress.update(len(chunk))
    return totals, parts


def nonfinite_rows(totals: list[float], components: dict[str, list[float]]) -> list[int]:
    """Positions whose total or any component score is NaN or infinite."""
    columns = [totals, *components.values()]
    return [i for i in range(len(totals)) if not all(math.isfinite(column[i]) for column in columns)]


def score(input: str, output: str, reward: Reward, text_column: str = TEXT_COLUMN, prompt_column: str | None = None,
          reference_column: str | None = None, batch_size: PositiveInt = 64, device: str = "cpu",
          overwrite: bool = False, allow_nonfinite: bool = False) -> str:
    """Score the texts of a file with a reward; one output row per scored input row.

    Args:
        input: the file to read: .jsonl, .json, .csv or .parquet.
        output: the JSON lines file to write: each scored input row plus one column per reward
            component and ``reward``.
        reward: a Reward class name with its options (``--reward ProfanityReward --reward.name x``),
            or a YAML file with class_path/init_args (configs/rewards/).
        text_column: the column holding the texts to score.
        prompt_column: the column of prompts passed to the reward (rewards with score_prompt use
            them); default: ``prompt`` when the file has that column, else none.
        reference_column: the column of reference texts (a string or a list of strings per row) for a
            reward that compares each text with references (RougeReward, BleuReward); rows whose
            reference is missing or blank are skipped.
        batch_size: texts per reward call.
        device: where model rewards run, e.g. cuda:0.
        overwrite: replace ``output`` if it exists.
        allow_nonfinite: exit 0 even when some scores are NaN/inf (they are written as null either way).

    Returns:
        the closing summary: what was scored and skipped, and where the rows are.
    """
    started = time.perf_counter()
    target = Path(output)
    if target.is_dir():
        raise UsageError(f"--output {target} is a folder: pass a .jsonl file path")
    if target.exists() and not overwrite:
        raise UsageError(f"--output {target} exists: pass --overwrite true to replace it or choose another --output")
    table = read_table(input)
    if text_column not in table.columns:
        raise UsageError(f"--text_column {text_column!r} is not a column of {input}; its columns: {list(table.columns)} - "
                         "pass --text_column with the one holding the texts")
    if prompt_column is None:
        prompt_column = PROMPT_COLUMN if PROMPT_COLUMN in table.columns else None
    elif prompt_column not in table.columns:
        raise UsageError(f"--prompt_column {prompt_column!r} is not a column of {input}; its columns: {list(table.columns)}")
    if reference_column is not None and reference_column not in table.columns:
        raise UsageError(f"--reference_column {reference_column!r} is not a column of {input}; its columns: "
                         f"{list(table.columns)}")
    if reward.needs_references and reference_column is None:
        raise UsageError(f"reward '{reward.name}' compares each text with references: pass --reference_column with "
                         f"the column holding them (one of {list(table.columns)})")
    set_up_reward(reward, torch.device(device))

    kept_rows: list[int] = []
    texts: list[str] = []
    skipped: dict[tuple[str, str], int] = {}  # (reason, column) -> rows
    references: list[list[str]] | None = None if reference_column is None else []
    reference_values = table[reference_column].tolist() if reference_column is not None else None
    for row_number, value in enumerate(table[text_column].tolist()):
        text, reason = classify_text(value)
        if reason is None and reference_values is not None:
            row_references, reference_problem = reference_texts(reference_values[row_number])
            reason = None if reference_problem is None else (reference_problem, reference_column)
        if reason is not None:
            key = reason if isinstance(reason, tuple) else (reason, text_column)
            skipped[key] = skipped.get(key, 0) + 1
            continue
        kept_rows.append(row_number)
        texts.append(text)
        if references is not None:
            references.append(row_references)
    if prompt_column is None:
        prompts = [""] * len(texts)
    else:
        prompt_values = table[prompt_column].tolist()
        prompts = [classify_text(prompt_values[row])[0] or "" for row in kept_rows]

    with RowProgress(len(texts), "score") as progress:
        totals, components = score_rows(reward, texts, prompts, batch_size, progress, references)
    clashes = [name for name in [*components, REWARD_COLUMN] if name in table.columns]
    if clashes:
        raise UsageError(f"input already has column(s) {clashes} that the scores would overwrite: rename them first")

    records = table.iloc[kept_rows].to_dict(orient="records")
    with atomic_file(target) as handle:  # no half-written output on a crash
        for position, record in enumerate(records):
            row = {key: _json_value(value) for key, value in record.items()}
            for name, values in components.items():
                row[name] = _json_value(values[position])
            row[REWARD_COLUMN] = _json_value(totals[position])
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    skipped_total = sum(skipped.values())
    reasons = ", ".join(f"{count} {reason} text in '{column}'" for (reason, column), count in sorted(skipped.items()))
    why = f" ({reasons})" if skipped_total else ""
    bad = nonfinite_rows(totals, components)
    nonfinite = f", {len(bad)} not finite (NaN/inf, written as null)" if bad else ""
    summary = (f"score: {len(texts)} rows scored with '{reward.name}', {skipped_total} skipped{why}{nonfinite} "
               f"in {seconds(time.perf_counter() - started)}\n  rows: {len(texts)} in {target}")
    if bad and not allow_nonfinite:
        rows = ", ".join(str(kept_rows[i]) for i in bad[:5])
        raise FinishedWithProblem(summary, f"reward '{reward.name}' gave NaN/inf for {len(bad)} of {len(texts)} texts "
                                           f"(input rows {rows}{', ...' if len(bad) > 5 else ''}; 0-based) - fix the "
                                           "reward, or pass --allow_nonfinite true to accept them")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf score ...``; returns 0 on success, 2 on bad input or non-finite scores (one line on stderr)."""
    return run_tool("score", argv, score, errors=(RewardSetupError,))


if __name__ == "__main__":
    sys.exit(main())
