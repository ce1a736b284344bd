"""A small corpus in DialogSum's release format, built here because the real data cannot ship.

The release's files are ``dialogsum.train.jsonl``, ``dialogsum.dev.jsonl`` and
``dialogsum.test.jsonl``: ``fname``, ``dialogue`` (turns ``#Person1#: ...`` on lines of their
own), ``summary`` and ``topic`` in train and dev; ``summary1..3`` and ``topic1..3`` in test (three
references). This writes 14 / 6 / 9 rows with the same columns and DialogSum's length spread
(dialogues of 120 to 3,000 characters), so the 200-1,000 character training filter, truncation
and multi-reference scoring all have work to do. ``configs/dialogsum_local.yaml`` reads them:

    python -m tests.dialogsum_files data/dialogsum
    flan-rlhf fit --config configs/tiny.yaml --config configs/dialogsum_local.yaml
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

#: split role -> the release's file name
RELEASE_FILES = {"train": "dialogsum.train.jsonl", "validation": "dialogsum.dev.jsonl", "test": "dialogsum.test.jsonl"}
LENGTHS = {"train": [120, 150, 250, 400, 600, 800, 950, 1100, 1500, 2000, 300, 500, 700, 900],
           "validation": [180, 350, 700, 1200, 2500, 260],
           "test": [130, 210, 330, 390, 520, 1400, 2200, 3000, 610]}
TURNS = ["How are you doing today?", "I'm looking for a flat near the station.", "The rent is due on Monday.",
         "Could you send me the report before lunch?", "We missed the bus again, so we walked.",
         "Let's meet at the cafe at six."]
TEST_SUMMARIES = ["#Person1# and #Person2# talk about Bus No. {i}. It leaves at 6 p.m.",
                  "#Person2# tells #Person1# that Bus No. {i} leaves at six.",
                  "#Person1# asks about the bus. #Person2# says No. {i} goes at 6 p.m."]


def _dialogue(rng: random.Random, n_chars: int) -> str:
    turns, speaker = [], 1
    while sum(len(t) + 1 for t in turns) < n_chars:
        turns.append(f"#Person{speaker}#: {rng.choice(TURNS)}")
        speaker = 3 - speaker
    return "\n".join(turns)[:n_chars].rstrip()


def write_dialogsum_files(folder: str | Path) -> dict[str, list[dict]]:
    """Write the three files into ``folder`` (created); returns ``{split role: rows}``.

    Raises:
        FileExistsError: one of the three files is already there (it may be the real release,
            where ``configs/dialogsum_local.yaml`` looks for it): nothing is written.
    """
    folder = Path(folder)
    present = [name for name in RELEASE_FILES.values() if (folder / name).exists()]
    if present:
        raise FileExistsError(f"{folder / present[0]} already exists - choose an empty folder for the sample "
                              "(this would overwrite it)")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    splits: dict[str, list[dict]] = {}
    for split, sizes in LENGTHS.items():
        rows = []
        for i, n in enumerate(sizes):
            row = {"fname": f"{split}_{i}", "dialogue": _dialogue(rng, n)}
            if split == "test":
                row.update({f"summary{k}": TEST_SUMMARIES[k - 1].format(i=i) for k in (1, 2, 3)})
                row.update({f"topic{k}": "daily life" for k in (1, 2, 3)})
            else:
                row.update(summary=f"#Person1# talks to #Person2# ({i}).", topic="daily life")
            rows.append(row)
        (folder / RELEASE_FILES[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = rows
    return splits


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.dialogsum_files FOLDER")
    target = Path(sys.argv[1])
    try:
        written = write_dialogsum_files(target)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {', '.join(f'{len(rows)} {split}' for split, rows in written.items())} rows "
          f"in DialogSum's format to {target}/")
