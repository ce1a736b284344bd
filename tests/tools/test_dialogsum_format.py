"""Real-data fidelity on a DialogSum-format corpus the test builds (issue: step 8).

The files have DialogSum's column names (``fname``, ``dialogue``, ``summary`` in train and dev,
``summary1..3`` in test, topics beside them) and its length spread (dialogues of 120 to 3,000
characters). A tiny policy is trained 2 iterations on them with the shipped DialogSum config's
data settings; then ``predict`` and ``compare`` run on the test split. Every figure the commands
print is recomputed here from the files with ByT5's one-token-per-byte count.
"""
from __future__ import annotations

import json
import os
import random

import yaml

from tests.conftest import run_command
from tests.test_cli import ROOT, tiny_config

TEMPLATE_HEAD, TEMPLATE_TAIL = "Summarize the following conversation.\n\n", "\n\nSummary:"
CAP = 400  # --model.truncate_prompt_tokens: ByT5 bytes + </s>
TURNS = ["How are you doing today?", "I'm looking for a flat near the station.", "The rent is due on Monday.",
         "Could you send me the report before lunch?", "We missed the bus again, so we walked.",
         "Let's meet at the cafe at six."]


def _dialogue(rng: random.Random, n_chars: int) -> str:
    turns, speaker = [], 1
    while sum(len(t) + 1 for t in turns) < n_chars:
        turns.append(f"#Person{speaker}#: {rng.choice(TURNS)}")
        speaker = 3 - speaker
    return "\n".join(turns)[:n_chars].rstrip()


def write_dialogsum_files(folder) -> dict[str, list[dict]]:
    """train (14 rows), validation (6), test (9, three references each) as JSON lines."""
    rng = random.Random(0)
    lengths = {"train": [120, 150, 250, 400, 600, 800, 950, 1100, 1500, 2000, 300, 500, 700, 900],
               "validation": [180, 350, 700, 1200, 2500, 260],
               "test": [130, 210, 330, 390, 520, 1400, 2200, 3000, 610]}
    splits: dict[str, list[dict]] = {}
    for split, sizes in lengths.items():
        rows = []
        for i, n in enumerate(sizes):
            row = {"fname": f"{split}_{i}", "dialogue": _dialogue(rng, n)}
            if split == "test":
                row.update({f"summary{k}": f"#Person1# and #Person2# talk, version {k} of {i}." for k in (1, 2, 3)})
                row.update({f"topic{k}": "daily life" for k in (1, 2, 3)})
            else:
                row.update(summary=f"#Person1# talks to #Person2# ({i}).", topic="daily life")
            rows.append(row)
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        splits[split] = rows
    return splits


def _too_long(dialogue: str) -> bool:
    return len((TEMPLATE_HEAD + dialogue + TEMPLATE_TAIL).encode()) + 1 > CAP


def _dialogsum_overlay(tmp_path) -> str:
    """The shipped DialogSum config's data settings, read from the file, on the local release-format files."""
    shipped = yaml.safe_load(open(os.path.join(ROOT, "configs", "flan_t5_base_dialogsum.yaml")))["data"]
    assert shipped["init_args"]["id_column"] == "id"  # the hub copy's name; the release files say fname
    shipped["init_args"].update(
        id_column="fname", builtin=None, dataset="json", data_files={split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation", "test")},
        batch_size=8, eval_batch_size=8, num_workers=0)
    overlay = {"data": shipped, "model": {"init_args": {"truncate_prompt_tokens": CAP}}}
    path = tmp_path / "dialogsum_local.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return str(path)


def _data_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("data[")]


def test_predict_and_compare_show_what_happened_to_every_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    splits = write_dialogsum_files(tmp_path)
    config = tiny_config(tmp_path, max_steps=2)
    overlay = _dialogsum_overlay(tmp_path)

    # fit: the 200-1,000 character filter applies to train only; every split is cut to the model's cap
    code, out, err = run_command("fit", "--config", config, "--config", overlay)
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
    code, out, err = run_command("predict", "--config", config, "--config", overlay, "--ckpt_path", "last")
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
    code, out, err = run_command("compare", "--config", config, "--config", overlay, "--ckpt_path", "last",
                                 "--out", str(report))
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
    splits = write_dialogsum_files(tmp_path)
    config = tiny_config(tmp_path, max_steps=1)
    overlay = _dialogsum_overlay(tmp_path)
    assert run_command("fit", "--config", config, "--config", overlay)[0] == 0
    report = tmp_path / "report"
    code, out, err = run_command(
        "compare", "--config", config, "--config", overlay, "--ckpt_path", "last", "--out", str(report),
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
    code, out, err = run_command("compare", "--config", config, "--config", overlay, "--ckpt_path", "last",
                                 "--out", str(greedy), "--greedy", "true", "--data.init_args.max_eval_prompts", "2")
    assert code == 0, (out + err)[-3000:]
    assert json.loads((greedy / "metrics.json").read_text())["decoding"]["mode"] == "greedy"
