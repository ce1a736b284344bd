"""write_report end to end on a tiny before/after run, checked by hand and against its own JSONL rows."""
import json
from collections import defaultdict

import numpy as np
import pytest

from flan_rlhf.eval.report import format_table, read_scalar_curves, write_report

VOCABULARY = ["idiot", "moron"]
REFS = {0: ["the cat sat on the mat"], 1: ["a dog ran home", "the dog went home"], 2: ["nice weather today"]}
# (prompt_id, sample, response, toxicity, positivity)
BEFORE = [
    (0, 0, "the cat sat on the mat", 0.9, 0.2), (0, 1, "you idiot cat", 0.7, 0.1),
    (1, 0, "a dog ran home", 0.2, 0.5), (1, 1, "the dog idio home", 0.55, 0.3),
    (2, 0, "nice weather today", 0.1, 0.9), (2, 1, "nice day", 0.3, 0.8),
]
AFTER = [
    (0, 0, "the cat sat on the mat", 0.1, 0.6), (0, 1, "the cat sat", 0.2, 0.7),
    (1, 0, "a dog ran home", 0.1, 0.8), (1, 1, "the dog went home", 0.05, 0.9),
    (2, 0, "nice weather today", 0.1, 0.9), (2, 1, "nice weather", 0.6, 0.4),
]
META = {"decoding": {"mode": "sampled", "seed": 7, "temperature": 1.0}, "ppo_steps": 3, "wall_s": 1.5}


def _rows(spec, with_kl=False):
    return [
        {"prompt_id": p, "sample": s, "prompt": f"dialogue {p}", "response": r, "references": REFS[p],
         "toxicity": t, "positivity": pos, **({"kl": 0.1 * (s + 1)} if with_kl else {})}
        for p, s, r, t, pos in spec
    ]


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    metrics = write_report(_rows(BEFORE), _rows(AFTER, with_kl=True), out, META, insult_vocabulary=VOCABULARY,
                           n_resamples=200, seed=0)
    return out, metrics


def test_files_and_hand_computed_values(tiny_report):
    out, metrics = tiny_report
    for name in ("metrics.json", "report.md", "samples_before.jsonl", "samples_after.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "toxicity_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    before, after = metrics["before"], metrics["after"]
    # before: scores .9 .7 | .2 .55 | .1 .3 -> toxic .9 .7 .55; maxima .9 .55 .3
    assert before["toxicity_mean"] == pytest.approx(2.75 / 6)
    assert before["toxic_fraction"] == pytest.approx(3 / 6)
    assert before["expected_max_toxicity"] == pytest.approx(1.75 / 3)
    assert before["toxicity_probability"] == pytest.approx(2 / 3)
    assert before["insult_fraction"] == pytest.approx(2 / 6)  # "idiot" and the half-written "idio"
    # after: maxima .2 .1 .6 -> EMT 0.3, TP 1/3
    assert after["expected_max_toxicity"] == pytest.approx(0.3)
    assert after["toxicity_probability"] == pytest.approx(1 / 3)
    assert after["insult_fraction"] == 0.0
    # ROUGE-1 after: 1, 2/3 (P 1, R 1/2), 1, 1 (best of two references), 1, 0.8 (P 1, R 2/3)
    assert after["rouge1"] == pytest.approx((4 + 2 / 3 + 0.8) / 6, abs=1e-6)
    for key in ("toxicity_mean", "toxic_fraction", "expected_max_toxicity", "toxicity_probability", "rouge1",
                "rouge2", "rougeL", "bleu", "sacrebleu", "distinct1", "distinct2", "response_len_mean",
                "insult_fraction", "positivity_mean"):
        assert key in before and key in after, key
        assert 0.0 <= before[key] <= (1.0 if key != "response_len_mean" else 100.0)
        delta = metrics["delta"][key]
        assert delta["value"] == pytest.approx(after[key] - before[key], abs=1e-9), key
        if key.startswith("distinct"):  # corpus-level ratio: point difference only, no bootstrap interval
            assert delta["ci_low"] is None and delta["ci_high"] is None
            continue
        assert delta["ci_low"] <= delta["value"] + 1e-12 and delta["value"] <= delta["ci_high"] + 1e-12, key
    assert "kl_mean" in after and "kl_mean" not in before and "kl_mean" not in metrics["delta"]
    assert metrics["n_test"] == 3 and metrics["ppo_steps"] == 3 and metrics["wall_s"] == 1.5
    assert metrics["samples_per_prompt"] == 2


def test_json_agrees_with_the_per_sample_rows_beside_it(tiny_report):
    out, metrics = tiny_report
    for side in ("before", "after"):
        rows = _read_jsonl(out / f"samples_{side}.jsonl")
        values = metrics[side]
        assert len(rows) == 6
        for key, column in (("toxicity_mean", "toxicity"), ("toxic_fraction", "toxic"), ("rouge1", "rouge1"),
                            ("rouge2", "rouge2"), ("rougeL", "rougeL"), ("insult_fraction", "insult"),
                            ("positivity_mean", "positivity")):
            recomputed = np.mean([row[column] for row in rows])
            assert values[key] == pytest.approx(recomputed, abs=1e-12), (side, key)
        assert all(row["toxic"] == int(row["toxicity"] >= 0.5) for row in rows)
        per_prompt = defaultdict(list)
        for row in rows:
            per_prompt[row["prompt_id"]].append(row["toxicity"])
        maxima = [max(scores) for scores in per_prompt.values()]
        assert values["expected_max_toxicity"] == pytest.approx(np.mean(maxima))
        assert values["toxicity_probability"] == pytest.approx(np.mean([m >= 0.5 for m in maxima]))


def test_with_one_sample_per_prompt_the_k_sample_figures_are_not_shown_twice(tmp_path):
    """At k = 1, Expected Maximum Toxicity is toxicity_mean and Toxicity Probability is toxic_fraction:
    the report printed each figure twice under two names (issue 24, point 6)."""
    first = [spec for spec in BEFORE if spec[1] == 0], [spec for spec in AFTER if spec[1] == 0]
    metrics = write_report(_rows(first[0]), _rows(first[1]), tmp_path, META, n_resamples=50, seed=0)
    for key in ("expected_max_toxicity", "toxicity_probability"):
        assert key not in metrics["before"] and key not in metrics["after"] and key not in metrics["delta"], key
        assert key not in (tmp_path / "report.md").read_text() and key not in format_table(metrics)
    assert metrics["before"]["toxicity_mean"] == pytest.approx((0.9 + 0.2 + 0.1) / 3)
    assert metrics["before"]["toxic_fraction"] == pytest.approx(1 / 3)


def test_markdown_and_console_table(tiny_report):
    out, metrics = tiny_report
    text = (out / "report.md").read_text()
    assert "Decoding: sampled with seed 7 (temperature=1.0); k = 2 samples per prompt." in text
    assert "| metric | before | after | delta (after - before) [95% CI] |" in text
    assert "| toxic_fraction ↓ | 0.5000 | 0.1667 |" in text
    assert "![toxicity histogram](toxicity_hist.png)" in text
    table = format_table(metrics)
    assert "expected_max_toxicity" in table and "0.5833" in table  # 1.75 / 3
    # SacreBLEU (13a tokens, what papers report) is the headline BLEU: listed first, and the notes say why
    names = [line.split()[0] for line in table.splitlines()[2:]]
    assert names.index("sacrebleu") == names.index("bleu") - 1
    assert any(note.startswith("BLEU is corpus-level") and "sacrebleu (13a tokens" in note for note in metrics["notes"])


def _write_tb(log_dir, tags):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for step in range(5):
        for tag in tags:
            writer.add_scalar(tag, 1.0 - 0.1 * step if "toxic" in tag else 0.5 * step, step)
    writer.close()


def test_training_curves_from_tensorboard_logs(tmp_path):
    tags = ["env/reward_mean", "objective/kl", "env/toxicity_mean"]
    _write_tb(tmp_path / "tb" / "version_0", tags)
    curves = read_scalar_curves(tmp_path / "tb")
    steps, values = curves["version_0"]["env/toxicity_mean"]
    assert steps.tolist() == [0, 1, 2, 3, 4] and values == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    metrics = write_report(_rows(BEFORE), _rows(AFTER), tmp_path / "out", META, tb_logdir=tmp_path / "tb",
                           n_resamples=50)
    assert (tmp_path / "out" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert metrics["files"]["training_curves"] == "training_curves.png"
    assert not [note for note in metrics["notes"] if "training curves" in note]
    assert "![training curves](training_curves.png)" in (tmp_path / "out" / "report.md").read_text()


def test_missing_tensorboard_tags_are_skipped_with_a_note(tmp_path):
    _write_tb(tmp_path / "tb", ["env/reward_mean"])
    metrics = write_report(_rows(BEFORE), _rows(AFTER), tmp_path / "out", {}, tb_logdir=tmp_path / "tb",
                           n_resamples=50)
    notes = " ".join(metrics["notes"])
    assert "'objective/kl' (KL) not found" in notes
    assert "toxic" not in notes  # the toxicity panel is optional: absent tags are not a problem to report
    assert (tmp_path / "out" / "training_curves.png").is_file()  # the reward panel is still drawn
    (tmp_path / "empty").mkdir()
    metrics = write_report(_rows(BEFORE), _rows(AFTER), tmp_path / "out2", {}, tb_logdir=tmp_path / "empty",
                           n_resamples=50)
    assert "training_curves" not in metrics["files"]
    assert "no TensorBoard event files" in " ".join(metrics["notes"])
    assert "Decoding: not recorded" in (tmp_path / "out2" / "report.md").read_text()


def test_bad_input_fails_with_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="different prompts"):
        write_report(_rows(BEFORE), _rows(AFTER)[:4], tmp_path, {})
    rows = _rows(BEFORE)
    del rows[0]["toxicity"]
    with pytest.raises(ValueError, match=r"before_rows\[0\] lacks \['toxicity'\]"):
        write_report(rows, _rows(AFTER), tmp_path, {})
    with pytest.raises(FileNotFoundError, match="tb_logdir"):
        write_report(_rows(BEFORE), _rows(AFTER), tmp_path, {}, tb_logdir=tmp_path / "nope")
    with pytest.raises(ValueError, match="clash"):
        write_report(_rows(BEFORE), _rows(AFTER), tmp_path, {"before": 1})


def test_a_report_that_fails_midway_keeps_the_earlier_files_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    write_report(_rows(BEFORE), _rows(AFTER), tmp_path, META, n_resamples=50, seed=0)
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def disk_fills_while_drawing(self, target, **kwargs):
        if hasattr(target, "write"):
            target.write(b"\x89PNG half")
        else:
            with open(target, "wb") as handle:
                handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_fills_while_drawing)
    with pytest.raises(OSError):
        write_report(_rows(AFTER), _rows(BEFORE), tmp_path, META, n_resamples=50, seed=0)
    assert (tmp_path / "toxicity_hist.png").read_bytes() == earlier["toxicity_hist.png"]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(earlier)  # no *.tmp-* leftovers


def test_rows_without_references_skip_quality_and_mixed_rows_are_refused(tmp_path):
    """A toxicity-only protocol (RealToxicityPrompts) has no references: ROUGE/BLEU are skipped and
    said so; a side where only some rows have references is one clear error."""
    def no_refs(spec):
        return [{**row, "references": []} for row in _rows(spec)]

    metrics = write_report(no_refs(BEFORE), no_refs(AFTER), tmp_path / "a", META, n_resamples=50, seed=0)
    assert not {"rouge1", "rougeL", "bleu", "sacrebleu"} & set(metrics["before"]) and "toxicity_mean" in metrics["after"]
    assert "No references: ROUGE and BLEU are not computed." in metrics["notes"]
    mixed = no_refs(BEFORE)[:3] + _rows(BEFORE)[3:]
    with pytest.raises(ValueError, match=r"before_rows\[0\] has no references but other rows do"):
        write_report(mixed, _rows(AFTER), tmp_path / "b", META, n_resamples=50, seed=0)


def test_validation_rouge_and_monitors_get_panels_of_their_own():
    from flan_rlhf.eval.report import curve_panels

    logged = ["env/reward_mean", "objective/kl", "env/reward/nontoxic_mean", "val/rougeL", "val/rouge1",
              "val/monitor/positivity", "val/monitor/non_toxic", "val/reward_mean"]
    panels, notes = curve_panels(sorted(logged))
    assert panels == [("reward", ["env/reward_mean"]), ("KL", ["objective/kl"]),
                      ("toxicity", ["env/reward/nontoxic_mean"]),  # a monitor named *toxic* stays a monitor
                      ("validation ROUGE-L", ["val/rougeL"]),
                      ("monitors (validation)", ["val/monitor/non_toxic", "val/monitor/positivity"])]
    assert notes == []
    panels, notes = curve_panels(["env/reward_mean"], where="logs/")
    assert panels == [("reward", ["env/reward_mean"])]  # no validation logged: no validation panels, no note
    assert notes == ["training curves: tag 'objective/kl' (KL) not found under logs/; panel skipped"]
