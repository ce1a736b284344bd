"""Real-data fidelity on a DialogSum-format corpus the test builds (issue: step 8).

The files (``tests/dialogsum_files.py``) have DialogSum's release names and columns (``fname``,
``dialogue``, ``summary`` in train and dev, ``summary1..3`` in test, topics beside them) and its
length spread (dialogues of 120 to 3,000 characters); the shipped ``configs/dialogsum_local.yaml``
reads them. A tiny policy is trained 2 iterations on them; then ``predict`` and ``compare`` run
on the test split. Every figure the commands print is recomputed here from the files with
ByT5's one-token-per-byte count.
"""
from __future__ import annotations

import json
import os

import yaml

from tests.conftest import run_command
from tests.dialogsum_files import write_dialogsum_files
from tests.test_cli import ROOT, tiny_config

TEMPLATE_HEAD, TEMPLATE_TAIL = "Summarize the following conversation.\n\n", "\n\nSummary:"
CAP = 400  # --model.truncate_prompt_tokens: ByT5 bytes + </s>
LOCAL_CONFIG = os.path.join(ROOT, "configs", "dialogsum_local.yaml")


def _too_long(dialogue: str) -> bool:
    return len((TEMPLATE_HEAD + dialogue + TEMPLATE_TAIL).encode()) + 1 > CAP


def test_the_local_config_keeps_the_hub_configs_protocol():
    """configs/dialogsum_local.yaml differs from the hub recipe's data only in where rows come from."""
    hub = yaml.safe_load(open(os.path.join(ROOT, "configs", "flan_t5_base_dialogsum.yaml")))["data"]
    local = yaml.safe_load(open(LOCAL_CONFIG))["data"]
    assert local["class_path"] == hub["class_path"]
    source_keys = {"dataset", "data_files", "builtin", "id_column"}
    protocol = {key: value for key, value in local["init_args"].items() if key not in source_keys}
    assert protocol and protocol == {key: hub["init_args"][key] for key in protocol}
    assert (hub["init_args"]["id_column"], local["init_args"]["id_column"]) == ("id", "fname")  # hub copy vs release


def test_the_sample_never_overwrites_dialogsum_files(tmp_path):
    """data/dialogsum/ is where the real release goes: the sample refuses to write over any of its files."""
    import subprocess
    import sys

    folder = tmp_path / "data" / "dialogsum"
    folder.mkdir(parents=True)
    (folder / "dialogsum.dev.jsonl").write_text("the real dev split\n")
    done = subprocess.run([sys.executable, "-m", "tests.dialogsum_files", str(folder)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "dialogsum.dev.jsonl already exists - choose an empty folder" in done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["dialogsum.dev.jsonl"]
    assert (folder / "dialogsum.dev.jsonl").read_text() == "the real dev split\n"


def _dialogsum_overlay(tmp_path) -> str:
    """Small batches, no workers and the test's prompt cap, on top of the shipped local config."""
    overlay = {"data": {"init_args": {"batch_size": 8, "eval_batch_size": 8, "num_workers": 0}},
               "model": {"init_args": {"truncate_prompt_tokens": CAP}}}
    path = tmp_path / "small_batches.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return str(path)


def _data_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("data[")]


def test_predict_and_compare_show_what_happened_to_every_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = write_dialogsum_files(tmp_path / "data" / "dialogsum")
    config = tiny_config(tmp_path, max_steps=2)
    overlay = _dialogsum_overlay(tmp_path)

    # fit: the 200-1,000 character filter applies to train only; every split is cut to the model's cap
    code, out, err = run_command("fit", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay)
    assert code == 0, (out + err)[-3000:]
    train = [r["dialogue"] for r in splits["train"]]
    short, long_ = sum(len(d) < 200 for d in train), sum(len(d) > 1000 for d in train)
    kept_train = [d for d in train if 200 <= len(d) <= 1000]
    validation = [r["dialogue"] for r in splits["validation"]]
    assert _data_lines(out) == [
        f"data[train <- 'train']: 14 loaded; {short} shorter than min_chars=200 dropped; {long_} longer than "
        f"max_chars=1000 dropped; {sum(map(_too_long, kept_train))} truncated to model.truncate_prompt_tokens={CAP} "
        f"(end of the text cut, template kept); {len(kept_train)} kept; references from: summary",
        f"data[validation <- 'validation']: 6 loaded; {sum(map(_too_long, validation))} truncated to "
        f"model.truncate_prompt_tokens={CAP} (end of the text cut, template kept); 6 kept; references from: summary",
    ]

    test = splits["test"]
    n_cut = sum(_too_long(r["dialogue"]) for r in test)
    assert 0 < n_cut < len(test)
    counts = (f"9 loaded; {n_cut} truncated to model.truncate_prompt_tokens={CAP} (end of the text cut, template "
              "kept); 9 kept; references from: summary1, summary2, summary3")

    # predict: one line for its split; rows carry the dataset's id, the sample, the prompt seen, the flag
    code, out, err = run_command("predict", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay,
                                 "--ckpt_path", "last")
    assert code == 0, (out + err)[-3000:]
    assert _data_lines(out) == [f"data[predict <- 'test']: {counts}"]
    rows = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert [(r["id"], r["sample"]) for r in rows] == [(r["fname"], 0) for r in test]
    assert [r["prompt_truncated"] for r in rows] == [_too_long(r["dialogue"]) for r in test]
    for row, source in zip(rows, test):
        assert row["prompt"].startswith(TEMPLATE_HEAD) and row["prompt"].endswith(TEMPLATE_TAIL)
        assert len(row["prompt"].encode()) + 1 <= CAP
        assert source["dialogue"].startswith(row["prompt"][len(TEMPLATE_HEAD):-len(TEMPLATE_TAIL)])
        assert row["references"] == [source[f"summary{k}"] for k in (1, 2, 3)]

    # compare: the same line, and the same counts in metrics.json and report.md
    report = tmp_path / "report"
    code, out, err = run_command("compare", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay,
                                 "--ckpt_path", "last", "--out", str(report))
    assert code == 0, (out + err)[-3000:]
    assert _data_lines(out) == [f"data[test <- 'test']: {counts}"]
    metrics = json.loads((report / "metrics.json").read_text())
    data = metrics["data"]
    assert (data["loaded"], data["truncated_to_model_limit"], data["kept"]) == (9, n_cut, 9)
    assert data["truncated"] == data["shorter_than_min_chars"] == data["longer_than_max_chars"] == 0
    assert data["reference_columns"] == ["summary1", "summary2", "summary3"]
    assert data["settings"]["id_column"] == "fname" and data["summary"] == f"data[test <- 'test']: {counts}"
    assert f"Data: data[test <- 'test']: {counts}" in (report / "report.md").read_text()
    for side in ("before", "after"):
        side_rows = [json.loads(line) for line in open(report / f"samples_{side}.jsonl")]
        assert [(r["id"], r["prompt_truncated"]) for r in side_rows] == [
            (r["fname"], _too_long(r["dialogue"])) for r in test]


def test_every_evaluation_option_reaches_compare_from_its_command_line(tmp_path, monkeypatch):
    """split, dataset split, id column, references, template, samples per prompt, prompts and decoding,
    each set by a flag of `flan-rlhf compare` and each visible in what it wrote."""
    monkeypatch.chdir(tmp_path)
    splits = write_dialogsum_files(tmp_path / "data" / "dialogsum")
    config = tiny_config(tmp_path, max_steps=1)
    overlay = _dialogsum_overlay(tmp_path)
    assert run_command("fit", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay)[0] == 0
    report = tmp_path / "report"
    code, out, err = run_command(
        "compare", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay, "--ckpt_path", "last",
        "--out", str(report),
        "--split", "validation", "--data.init_args.val_split", "test", "--data.init_args.id_column", "topic1",
        "--data.init_args.reference_columns", "[summary2]", "--data.init_args.template", "Dialogue: {text} TL;DR:",
        "--data.init_args.samples_per_prompt", "2", "--data.init_args.max_eval_prompts", "3",
        "--model.init_args.eval_generation.top_p", "0.8", "--model.init_args.eval_generation.max_new_tokens", "5")
    assert code == 0, (out + err)[-3000:]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["data"]["split"] == "test"
    assert metrics["data"]["settings"]["template"] == "Dialogue: {text} TL;DR:"
    assert metrics["data"]["reference_columns"] == ["summary2"] and metrics["data"]["beyond_max_eval_prompts"] == 6
    assert metrics["samples_per_prompt"] == 2 and metrics["n_prompts"] == 3
    assert (metrics["decoding"]["top_p"], metrics["decoding"]["max_new_tokens"]) == (0.8, 5)
    rows = [json.loads(line) for line in open(report / "samples_after.jsonl")]
    test = splits["test"][:3]
    assert [(r["id"], r["sample"]) for r in rows] == [(s["topic1"], k) for s in test for k in (0, 1)]
    assert all(r["prompt"].startswith("Dialogue: ") and r["prompt"].endswith(" TL;DR:") for r in rows)
    assert [r["references"] for r in rows] == [[s["summary2"]] for s in test for _ in (0, 1)]
    assert all(r["response_tokens"] <= 5 for r in rows)

    greedy = tmp_path / "greedy"
    code, out, err = run_command("compare", "--config", config, "--config", LOCAL_CONFIG, "--config", overlay,
                                 "--ckpt_path", "last", "--out", str(greedy), "--greedy", "true", "--data.init_args.max_eval_prompts", "2")
    assert code == 0, (out + err)[-3000:]
    assert json.loads((greedy / "metrics.json").read_text())["decoding"]["mode"] == "greedy"


def test_the_worked_example_prints_the_documented_count_line(tmp_path, capsys):
    """docs/data-and-evaluation.md's worked example: the demo policy's cap and tokenizer on the sample
    files through configs/dialogsum_local.yaml give the count line the page shows."""
    from flan_rlhf.data import PromptDataModule
    from flan_rlhf.demo.prepare import prepare_demo_assets
    from flan_rlhf.tokens import PromptTokenLimit
    from transformers import AutoTokenizer

    page = open(os.path.join(ROOT, "docs", "data-and-evaluation.md")).read()
    section = page[page.index("### A worked DialogSum evaluation"):page.index("### Python API")]
    assert "--config configs/demo_ppo.yaml --config configs/dialogsum_local.yaml --ckpt_path last" in section
    documented = [line for line in section.splitlines() if line.startswith("data[")]

    write_dialogsum_files(tmp_path / "data" / "dialogsum")
    tokenizer = AutoTokenizer.from_pretrained(prepare_demo_assets(tmp_path / "demo")["tokenizer"])
    demo_cap = yaml.safe_load(open(os.path.join(ROOT, "configs", "demo_ppo.yaml")))["model"]["init_args"]["truncate_prompt_tokens"]
    settings = yaml.safe_load(open(LOCAL_CONFIG))["data"]["init_args"]
    settings["data_files"] = {split: str(tmp_path / path) for split, path in settings["data_files"].items()}
    datamodule = PromptDataModule(**settings)

    class DemoPolicyCap:
        def prompt_token_limit(self):
            return PromptTokenLimit(tokenizer, demo_cap)

    datamodule.follow_model(DemoPolicyCap())
    capsys.readouterr()
    datamodule.setup("test")
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data[")]
    assert documented == printed == [datamodule.reports["test"].summary()]
