"""``flan-rlhf score``: score every text of a file with any configured reward.

For auditing a dataset or another system's outputs::

    flan-rlhf score --reward ProfanityReward --input texts.csv --text-column response --output scored.jsonl
    flan-rlhf score --reward configs/rewards/composite_nontoxic_positive.yaml --input outputs.parquet ...
    flan-rlhf score --reward ClassifierReward --reward.label nothate --input texts.jsonl ...

Input (by suffix): ``.jsonl``, ``.json`` (a list of records, or JSON lines), ``.csv``
(quoted newlines inside fields are fine), ``.parquet``. Output: JSON lines, each the input
row plus one column per reward component plus ``reward``. Rows whose text is missing or blank
are not scored; the final line says how many were scored and how many skipped, and why.

A score that is NaN or infinite (a reward that failed on a text) is written as ``null``, counted
on the final line, and makes the exit status 2 unless ``--allow-nonfinite`` is given. Bad input
(a missing, binary or unparseable file, a reward that cannot load) is one ``error:`` line, exit 2.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import torch
from jsonargparse import ArgumentParser
from tqdm import tqdm

import flan_rlhf.rewards  # noqa: F401 - registers every Reward subclass for --reward NAME
from flan_rlhf.errors import first_line
from flan_rlhf.io import TextFileError, atomic_file, file_format, refuse_binary, suffix_choices, table_format
from flan_rlhf.rewards.base import Reward, RewardSetupError, set_up_reward
from flan_rlhf.rewards.text_batches import batched

INPUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # formats of flan_rlhf.io.FORMATS this reads
REWARD_COLUMN = "reward"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="flan-rlhf score", description="Score the texts of a file with a reward.")
    parser.add_argument(
        "--reward",
        type=Reward,
        required=True,
        sub_configs=True,  # lets --reward take a YAML file path (jsonargparse >= 4.49)
        help="a Reward class name with its options (--reward ProfanityReward --reward.name x), "
        "or a YAML file with class_path/init_args",
    )
    parser.add_argument("--input", type=str, required=True, help="file: .jsonl, .json, .csv or .parquet")
    parser.add_argument("--text-column", type=str, default="text", help="column holding the texts to score")
    parser.add_argument(
        "--prompt-column",
        type=str | None,
        default=None,
        help="optional column of prompts, passed to the reward (used by rewards with score_prompt)",
    )
    parser.add_argument("--output", type=str, required=True, help="JSON lines file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per reward call")
    parser.add_argument("--device", type=str, default="cpu", help="device for model rewards, e.g. cuda:0")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="exit 0 even when some scores are NaN/inf (they are written as null either way)")
    return parser


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
    progress: bool = True,
) -> tuple[list[float], dict[str, list[float]]]:
    """Score ``texts`` in batches; returns ``(reward per text, {component: per text})``."""
    totals: list[float] = []
    parts: dict[str, list[float]] = {}
    index = list(range(len(texts)))
    with tqdm(total=len(texts), desc="scoring", unit="text", disable=not progress or not sys.stderr.isatty(), file=sys.stderr) as bar:
        for chunk in batched(index, batch_size):
            total, components = reward.score([prompts[i] for i in chunk], [texts[i] for i in chunk])
            totals.extend(total.tolist())
            for name, values in components.items():
                parts.setdefault(name, []).extend(values.tolist())
            bar.update(len(chunk))
    return totals, parts


def nonfinite_rows(totals: list[float], components: dict[str, list[float]]) -> list[int]:
    """Positions whose total or any component score is NaN or infinite."""
    columns = [totals, *components.values()]
    return [i for i in range(len(totals)) if not all(math.isfinite(column[i]) for column in columns)]


def main(argv: list[str] | None = None) -> int:
    """Run ``flan-rlhf score``; returns 0 on success, 2 on bad input or non-finite scores (one line on stderr)."""
    try:
        return _score(argv)
    except (OSError, ValueError, RewardSetupError) as err:  # RewardOutputError is a ValueError
        print(f"error: {first_line(err)}", file=sys.stderr, flush=True)
        return 2


def _score(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and not args.overwrite:
        parser.error(f"output {output} exists: pass --overwrite to replace it or choose another --output")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    table = read_table(args.input)
    for option, column in (("--text-column", args.text_column), ("--prompt-column", args.prompt_column)):
        if column is not None and column not in table.columns:
            parser.error(
                f"{option} {column!r} is not a column of {args.input}; columns: {list(table.columns)}"
            )

    reward: Reward = parser.instantiate(args).reward
    set_up_reward(reward, torch.device(args.device))

    kept_rows: list[int] = []
    texts: list[str] = []
    skipped: dict[str, int] = {}
    for row_number, value in enumerate(table[args.text_column].tolist()):
        text, reason = classify_text(value)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kept_rows.append(row_number)
        texts.append(text)
    if args.prompt_column is None:
        prompts = [""] * len(texts)
    else:
        prompt_values = table[args.prompt_column].tolist()
        prompts = [classify_text(prompt_values[row])[0] or "" for row in kept_rows]

    totals, components = score_rows(reward, texts, prompts, args.batch_size, progress=True)
    clashes = [name for name in [*components, REWARD_COLUMN] if name in table.columns]
    if clashes:
        parser.error(
            f"input already has column(s) {clashes} that the scores would overwrite: rename them first"
        )

    records = table.iloc[kept_rows].to_dict(orient="records")
    with atomic_file(output) as handle:  # no half-written output on a crash
        for position, record in enumerate(records):
            row = {key: _json_value(value) for key, value in record.items()}
            for name, values in components.items():
                row[name] = _json_value(values[position])
            row[REWARD_COLUMN] = _json_value(totals[position])
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    skipped_total = sum(skipped.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    why = f" ({reasons} text in '{args.text_column}')" if skipped_total else ""
    bad = nonfinite_rows(totals, components)
    nonfinite = f", {len(bad)} not finite (NaN/inf, written as null)" if bad else ""
    print(f"scored {len(texts)} rows, skipped {skipped_total}{why}{nonfinite}; wrote {output}")
    if bad and not args.allow_nonfinite:
        rows = ", ".join(str(kept_rows[i]) for i in bad[:5])
        print(f"error: reward '{reward.name}' gave NaN/inf for {len(bad)} of {len(texts)} texts (input rows {rows}"
              f"{', ...' if len(bad) > 5 else ''}; 0-based) - fix the reward, or pass --allow-nonfinite to accept them",
              file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
