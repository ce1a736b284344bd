"""Bad data input gets one clear line naming the problem and the fix (issue 7, data cases).

Each case is one entry of CASES: a function that builds the bad input under ``tmp`` and runs
the failing call, and a regex the message must match. Add a case by adding an entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from flan_rlhf.data import DataConfigError, PromptDataModule


def _jsonl(tmp: Path, name: str, rows: list[dict]) -> str:
    path = tmp / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _fit_setup(tmp: Path, **kwargs) -> None:
    kwargs.setdefault("val_split", None)
    PromptDataModule(cache_dir=str(tmp / "cache"), **kwargs).setup("fit")


def missing_prompt_column(tmp):
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", [{"text": "hi", "summary": "s"}]))


def missing_reference_column(tmp):
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", [{"dialogue": "hi", "abstract": "s"}]))


def empty_file(tmp):
    (tmp / "p.jsonl").write_text("\n", encoding="utf-8")
    _fit_setup(tmp, dataset=str(tmp / "p.jsonl"))


def header_only_csv(tmp):
    (tmp / "p.csv").write_text("dialogue,summary\n", encoding="utf-8")
    _fit_setup(tmp, dataset=str(tmp / "p.csv"))


def null_prompts_rejected(tmp):
    rows = [{"dialogue": "fine", "summary": "s"}, {"dialogue": None, "summary": "s"},
            {"dialogue": "  ", "summary": "s"}]
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", rows), empty_prompts="error")


def non_string_prompt_rejected(tmp):
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", [{"dialogue": 7, "summary": "s"}]), empty_prompts="error")


def all_prompts_filtered_out(tmp):
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", [{"dialogue": "short", "summary": "s"}]), min_chars=200)


def invalid_utf8(tmp):
    (tmp / "p.jsonl").write_bytes(
        b'{"dialogue": "ok", "summary": "s"}\n'
        b'{"dialogue": "caf\xe9", "summary": "s"}\n'  # latin-1 e-acute: not UTF-8
    )
    _fit_setup(tmp, dataset="json", data_files={"train": str(tmp / "p.jsonl")})


def invalid_json_line(tmp):
    (tmp / "p.jsonl").write_text('{"dialogue": "a", "summary": "s"}\n\n{"dialogue": "b", "summary": }\n',
                                 encoding="utf-8")
    _fit_setup(tmp, dataset=str(tmp / "p.jsonl"))


def json_line_not_an_object(tmp):
    (tmp / "p.jsonl").write_text('{"dialogue": "a"}\n["b"]\n', encoding="utf-8")
    _fit_setup(tmp, dataset=str(tmp / "p.jsonl"))


def hub_dataset_offline(tmp):
    _fit_setup(tmp, dataset="knkarthick/dialogsum")


def missing_data_file(tmp):
    _fit_setup(tmp, dataset="json", data_files={"train": str(tmp / "nope.jsonl")})


def builder_without_files(tmp):
    _fit_setup(tmp, dataset="csv")


def missing_split(tmp):
    one_row = _jsonl(tmp, "p.jsonl", [{"dialogue": "a", "summary": "s"}])
    _fit_setup(tmp, dataset=one_row, val_split="validation")


def no_source(tmp):
    PromptDataModule()


def unknown_builtin(tmp):
    _fit_setup(tmp, builtin="huge")


def bad_split_fractions(tmp):
    one_row = _jsonl(tmp, "p.jsonl", [{"dialogue": "a", "summary": "s"}])
    _fit_setup(tmp, dataset=one_row, split_fractions=[0.5, 0.6])


def token_limit_without_tokenizer(tmp):
    PromptDataModule(builtin="tiny", max_prompt_tokens=64)


def prompts_too_long_rejected(tmp):
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(str(tmp / "tok"))
    rows = [{"dialogue": "x" * 5, "summary": "s"}, {"dialogue": "y" * 40, "summary": "s"}]
    _fit_setup(tmp, dataset=_jsonl(tmp, "p.jsonl", rows), max_prompt_tokens=16, tokenizer=str(tmp / "tok"),
               too_long="error")


def tokenizer_unavailable_offline(tmp):
    _fit_setup(tmp, builtin="tiny", max_prompt_tokens=64, tokenizer="google/flan-t5-base")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing prompt column": (missing_prompt_column,
                              r"column 'dialogue' \(--data.prompt_column\) is not in split 'train', which "
                              r"has columns \['text', 'summary'\]; set --data.prompt_column"),
    "missing reference column": (missing_reference_column,
                                 r"reference column 'summary' \(--data.reference_columns\) is in no split; "
                                 r"the columns are \{'train': \['dialogue', 'abstract'\]\}"),
    "empty file": (empty_file, r"p.jsonl is empty \(no rows\)"),
    "header-only csv": (header_only_csv,
                        r"p.csv has no rows for split 'train'; fill it or point --data.data_files"),
    "null/blank prompts": (null_prompts_rejected,
                           r"2 prompts in split 'train' are null, empty or not strings \(first: row 1, value "
                           r"None\); fix the data or set --data.empty_prompts drop"),
    "non-string prompt": (non_string_prompt_rejected,
                          r"1 prompts in split 'train' are null, empty or not strings"),
    "everything filtered": (all_prompts_filtered_out,
                            r"no prompts left in split 'train' after filtering \(.*1 shorter than "
                            r"min_chars=200.*\); loosen --data.min_chars"),
    "invalid UTF-8": (invalid_utf8,
                      r"p.jsonl is not valid UTF-8 \(line 2, byte 52: invalid continuation byte\); re-save"),
    "invalid JSON line": (invalid_json_line,
                          r"p.jsonl line 3 is not valid JSON \(Expecting value, column 30\)"),
    "JSON line not an object": (json_line_not_an_object, r"p.jsonl line 2 is a JSON list, not an object"),
    "hub offline": (hub_dataset_offline,
                    r"cannot load dataset 'knkarthick/dialogsum' from the Hugging Face Hub \(.*\); pass "
                    r"local files instead, e.g. --data.dataset json --data.data_files '\{train: train.jsonl"),
    "missing data file": (missing_data_file, r"data file '.*nope.jsonl' does not exist"),
    "builder without files": (builder_without_files, r"--data.dataset csv needs --data.data_files"),
    "missing split": (missing_split,
                      r"split 'validation' \(--data.val_split\) is not in the dataset, which has splits "
                      r"\['train'\]; set --data.val_split to one of them, or use --data.split_fractions"),
    "no source": (no_source, r"set exactly one data source: --data.dataset .* or --data.builtin tiny"),
    "unknown builtin": (unknown_builtin, r"unknown built-in dataset 'huge'; choose one of \['tiny'\]"),
    "bad split fractions": (bad_split_fractions,
                            r"split_fractions \[0.5, 0.6\] must be 2 or 3 non-negative numbers summing to 1"),
    "token limit without tokenizer": (token_limit_without_tokenizer,
                                      r"max_prompt_tokens needs .* --data.tokenizer"),
    "prompts too long": (prompts_too_long_rejected,
                         r"1 prompts in split 'train' are longer than max_prompt_tokens=16 tokens \(longest "
                         r"41, first: row 1\); set --data.too_long truncate or drop"),
    "tokenizer offline": (tokenizer_unavailable_offline,
                          r"cannot load tokenizer 'google/flan-t5-base' .*pass a local folder saved with "
                          r"tokenizer.save_pretrained"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_input_gets_one_clear_line(case, tmp_path):
    make_and_run, expected = CASES[case]
    with pytest.raises(DataConfigError) as caught:
        make_and_run(tmp_path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert __import__("re").search(expected, message), message
