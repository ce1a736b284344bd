"""`flan-rlhf score`: messy CSV (quoted newlines, empty cells, non-English), other formats,
rewards given by class name or YAML, the skip report, and no silent overwrite."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from profanity_check import predict_prob
from tests.rewards_helpers import save_classifier
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from flan_rlhf.rewards import CompositeReward, Reward
from flan_rlhf.tools.command import tool_parser
from flan_rlhf.tools.score import main, score

REPO = Path(__file__).resolve().parents[2]

# Rows 1, 3, 4 have text (two with newlines inside quotes, one Cyrillic with an emoji); row 2 has
# an empty cell, row 5 only spaces, row 6 lacks the text field altogether (pandas reads it as an
# empty cell: CSV cannot tell the two apart).
MESSY_CSV = (
    "id,text,note\n"
    '1,"Thank you so much,\nmy dear friend!",first\n'
    "2,,empty cell\n"
    '3,"Привет, друг! Ты молодец 😊",non-English\n'
    '4,"You are a stupid idiot.\nShut up, ""genius"".",quoted quotes\n'
    '5,"   ",blank\n'
    "6\n"
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_messy_csv_gives_one_row_per_text_and_reports_skips(tmp_path, capsys):
    source = tmp_path / "messy.csv"
    source.write_text(MESSY_CSV, encoding="utf-8")
    output = tmp_path / "out" / "scored.jsonl"
    assert main(["--reward", "ProfanityReward", "--input", str(source), "--output", str(output), "--batch_size", "2",
                 "--text_column", "text"]) == 0

    rows = read_jsonl(output)
    texts = ["Thank you so much,\nmy dear friend!", "Привет, друг! Ты молодец 😊", 'You are a stupid idiot.\nShut up, "genius".']
    assert [row["id"] for row in rows] == ["1", "3", "4"]
    assert [row["text"] for row in rows] == texts
    assert [row["note"] for row in rows] == ["first", "non-English", "quoted quotes"]
    expected = 1.0 - predict_prob(texts)
    for row, value in zip(rows, expected):
        assert set(row) == {"id", "text", "note", "non_profanity", "reward"}
        assert row["non_profanity"] == pytest.approx(value, abs=1e-6) and row["reward"] == row["non_profanity"]
    assert rows[2]["reward"] < 0.5 < rows[0]["reward"]

    summary = capsys.readouterr().out.strip().splitlines()[-2:]
    assert summary[0].startswith("score: 3 rows scored with 'non_profanity', 3 skipped (3 empty text in 'text') in ")
    assert summary[1] == f"  rows: 3 in {output}"


def test_refuses_to_overwrite_without_the_flag(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"text": "hello there"}) + "\n")
    output = tmp_path / "out.jsonl"
    output.write_text("keep me\n")
    argv = ["--reward", "VaderReward", "--input", str(source), "--output", str(output), "--text_column", "text"]
    assert main(argv) == 2
    assert "pass --overwrite true to replace it" in capsys.readouterr().err
    assert output.read_text() == "keep me\n"
    assert main([*argv, "--overwrite"]) == 2  # a boolean takes a value
    assert "booleans take a value (--flag true)" in capsys.readouterr().err
    assert output.read_text() == "keep me\n"
    assert main([*argv, "--overwrite", "true"]) == 0
    assert read_jsonl(output)[0]["positivity"] == pytest.approx(0.0)  # "hello there" is neutral for VADER


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_reads_jsonl_json_and_parquet_with_a_yaml_reward(tmp_path, suffix, capsys):
    frame = pd.DataFrame({"response": ["What a lovely day!", None, "I hate you, idiot."], "k": [1, 2, 3]})
    source = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        frame.to_json(source, orient="records", lines=True)
    elif suffix == ".json":
        frame.to_json(source, orient="records")
    else:
        frame.to_parquet(source)
    output = tmp_path / "out.jsonl"
    config = REPO / "configs" / "rewards" / "composite_offline.yaml"
    argv = ["--reward", str(config), "--input", str(source), "--output", str(output)]  # reads 'response' by default
    assert main(argv) == 0

    assert "score: 2 rows scored with 'composite', 1 skipped (1 missing text in 'response')" in capsys.readouterr().out
    rows = read_jsonl(output)
    assert [row["k"] for row in rows] == [1, 3]
    analyzer = SentimentIntensityAnalyzer()
    for row in rows:
        toxicity = predict_prob([row["response"]])[0]
        positivity = analyzer.polarity_scores(row["response"])["compound"]
        assert row["non_toxicity"] == pytest.approx(1 - toxicity, abs=1e-6)
        assert row["positivity"] == pytest.approx(positivity, abs=1e-6)
        assert row["reward"] == pytest.approx(1.0 * (1 - toxicity) + 0.5 * positivity, abs=1e-5)


def test_classifier_reward_by_name_with_options_on_the_command_line(tmp_path):
    folder = save_classifier(tmp_path / "clf", {0: "hate", 1: "nothate"}, [-2.0, 3.0])
    source = tmp_path / "in.csv"
    source.write_text("text\nhello world\nyou are stupid\n")
    output = tmp_path / "out.jsonl"
    argv = ["--reward", "ClassifierReward", "--reward.model", str(folder), "--reward.label", "nothate",
            "--input", str(source), "--output", str(output), "--text_column", "text"]
    assert main(argv) == 0
    assert [row["nothate"] for row in read_jsonl(output)] == [3.0, 3.0]  # column 1 by name, not column 0


def test_unknown_text_column_is_one_clear_error(tmp_path, capsys):
    source = tmp_path / "in.csv"
    source.write_text("body\nhi\n")
    assert main(["--reward", "VaderReward", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--text_column 'response' is not a column" in err and "['body']" in err


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "rewards").glob("*.yaml")), ids=lambda p: p.name)
def test_every_reward_yaml_builds_a_reward(config):
    """Construction is lazy: no model is loaded, so even download-needing configs build offline."""
    parser = tool_parser("score", score)
    args = parser.parse_args(["--reward", str(config), "--input", "x.csv", "--output", "y.jsonl"])
    reward = parser.instantiate_classes(args).reward
    assert isinstance(reward, Reward)
    if isinstance(reward, CompositeReward):
        assert list(reward.weights.values()) == [1.0, 0.5]


def test_a_reference_reward_scores_each_text_against_its_rows_references(tmp_path, capsys):
    """One reference (a string) or several (a list) per row, best match kept; a row without a reference is
    skipped and counted; without --reference_column the reward is refused in one line."""
    source = tmp_path / "in.jsonl"
    rows = [{"response": "the cat sat", "refs": "the cat sat on the mat"},
            {"response": "the cat sat", "refs": ["a dog", "the cat sat"]},
            {"response": "a dog", "refs": None},
            {"response": "a dog", "refs": ["", " "]}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "out.jsonl"
    argv = ["--reward", "RougeReward", "--input", str(source), "--output", str(output)]
    assert main([*argv, "--reference_column", "refs"]) == 0
    assert ("score: 2 rows scored with 'rougeL', 2 skipped (1 empty text in 'refs', 1 missing text in 'refs')"
            in capsys.readouterr().out)
    assert [round(row["rougeL"], 4) for row in read_jsonl(output)] == [round(2 / 3, 4), 1.0]

    assert main([*argv, "--overwrite", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reward 'rougeL' compares each text with references: pass --reference_column" in err
