"""Loading prompt sources in every supported form (flan_rlhf.data.loading, flan_rlhf.data.builtin)."""
from __future__ import annotations

import json

import numpy as np
from datasets import Dataset, DatasetDict

from flan_rlhf.data.builtin import load_builtin
from flan_rlhf.data.loading import fractional_split_indices, load_source

TRAIN_ROWS = [
    {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet."},
    {"dialogue": "#Person1#: Tea?\n#Person2#: Yes, please.", "summary": "#Person2# wants tea."},
    {"dialogue": "#Person1#: Late again.\n#Person2#: Sorry!", "summary": "#Person2# is late."},
]
TEST_ROWS = [
    {"dialogue": "#Person1#: Rain?\n#Person2#: All day.", "summary1": "It rains.",
     "summary2": "Rain all day.", "summary3": "A rainy day."},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_jsonl_builder_with_per_split_files_that_have_different_columns(tmp_path):
    # DialogSum's release: `summary` in train, `summary1..3` in test. datasets alone cannot load
    # these as one builder call (it casts every split to the first split's columns).
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", TEST_ROWS)
    source = load_source("json", {"train": train, "test": test}, cache_dir=str(tmp_path / "cache"))
    assert sorted(source) == ["test", "train"]
    assert source["train"]["dialogue"] == [row["dialogue"] for row in TRAIN_ROWS]
    assert sorted(source["test"].column_names) == ["dialogue", "summary1", "summary2", "summary3"]
    assert source["test"][0]["summary3"] == "A rainy day."


def test_local_jsonl_file_path_is_one_train_split(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", TRAIN_ROWS)
    source = load_source(path, cache_dir=str(tmp_path / "cache"))
    assert list(source) == ["train"]
    assert source["train"]["summary"] == ["They greet.", "#Person2# wants tea.", "#Person2# is late."]


def test_json_array_file(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(TRAIN_ROWS, indent=2), encoding="utf-8")
    source = load_source("json", str(path), cache_dir=str(tmp_path / "cache"))
    assert source["train"].num_rows == 3
    assert source["train"][1]["summary"] == "#Person2# wants tea."


def test_csv_and_tsv_files(tmp_path):
    (tmp_path / "p.csv").write_text('dialogue,summary\n"A, then B",ab\nC,c\n', encoding="utf-8")
    (tmp_path / "p.tsv").write_text("dialogue\tsummary\nA, then B\tab\nC\tc\n", encoding="utf-8")
    for name in ("p.csv", "p.tsv"):
        source = load_source(str(tmp_path / name), cache_dir=str(tmp_path / "cache"))
        assert source["train"]["dialogue"] == ["A, then B", "C"]
        assert source["train"]["summary"] == ["ab", "c"]


def test_parquet_builder(tmp_path):
    Dataset.from_list(TRAIN_ROWS).to_parquet(str(tmp_path / "train.parquet"))
    files = {"train": str(tmp_path / "train.parquet")}
    source = load_source("parquet", files, cache_dir=str(tmp_path / "cache"))
    assert source["train"]["summary"] == [row["summary"] for row in TRAIN_ROWS]


def test_saved_dataset_dict_and_saved_single_dataset_folders(tmp_path):
    DatasetDict({"train": Dataset.from_list(TRAIN_ROWS), "test": Dataset.from_list(TEST_ROWS)}).save_to_disk(
        str(tmp_path / "dd"))
    Dataset.from_list(TRAIN_ROWS).save_to_disk(str(tmp_path / "single"))
    both = load_source(str(tmp_path / "dd"))
    assert sorted(both) == ["test", "train"] and both["test"].num_rows == 1
    single = load_source(str(tmp_path / "single"))
    assert list(single) == ["train"] and single["train"].num_rows == 3


def test_fractional_split_sizes_partition_and_seed():
    parts = fractional_split_indices(10, [0.6, 0.2, 0.2], seed=3)
    assert [len(part) for part in parts] == [6, 2, 2]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert all(list(part) == sorted(part) for part in parts)  # file order kept inside each part
    # floor() for the evaluation parts, the remainder to train: 7 rows, 25% -> floor(1.75) = 1
    assert [len(part) for part in fractional_split_indices(7, [0.5, 0.25, 0.25], seed=0)] == [5, 1, 1]
    assert [len(part) for part in fractional_split_indices(7, [0.7, 0.3], seed=0)] == [5, 2]
    again = fractional_split_indices(10, [0.6, 0.2, 0.2], seed=3)
    assert all((a == b).all() for a, b in zip(parts, again))
    others = [fractional_split_indices(10, [0.6, 0.2, 0.2], seed=s)[1].tolist() for s in range(4, 10)]
    assert any(other != parts[1].tolist() for other in others)


def test_builtin_tiny_has_three_varied_splits():
    tiny = load_builtin("tiny")
    assert {name: ds.num_rows for name, ds in tiny.items()} == {"train": 48, "validation": 8, "test": 8}
    dialogues = [d for ds in tiny.values() for d in ds["dialogue"]]
    assert len(set(dialogues)) == 64
    assert all(d.startswith("#Person1#: ") and "\n#Person2#: " in d for d in dialogues)
    assert all(s.strip() for ds in tiny.values() for s in ds["summary"])
