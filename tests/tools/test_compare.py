"""Before/after evaluation of a tiny trained policy, offline, end to end (JSON, Markdown, PNG)."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from flan_rlhf.evaluation_step import EVAL_SEED_OFFSET
from flan_rlhf.ppo import sequence_kl
from flan_rlhf.tools.compare import compare_before_after
from flan_rlhf.rewards import ProfanityReward, VaderReward
from tests.test_module import fit, make_module


def test_before_after_report_on_a_tiny_trained_policy(tmp_path):
    module = make_module()
    fit(module, steps=2, batch_size=8)
    prompts = [f"Summarize: person {i} talks about the weather." for i in range(6)]
    batches = [{"prompt": prompts[:3] * 2, "references": [["the weather"]] * 6,
                "prompt_id": torch.tensor([0, 1, 2, 0, 1, 2]), "sample": torch.tensor([0, 0, 0, 1, 1, 1])},
               {"prompt": prompts[3:], "references": [["the weather is nice"]] * 3,
                "prompt_id": torch.tensor([3, 4, 5]), "sample": torch.tensor([0, 0, 0])}]
    metrics = compare_before_after(module, batches, str(tmp_path), ProfanityReward().setup(), VaderReward().setup(),
                                   meta={"ppo_steps": 2}, insult_vocabulary=["idiot"], n_resamples=200)
    for name in ("metrics.json", "report.md", "toxicity_hist.png", "samples_before.jsonl", "samples_after.jsonl"):
        assert (tmp_path / name).exists(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["ppo_steps"] == 2 and saved["decoding"]["mode"] == "sampled"
    before = [json.loads(line) for line in open(tmp_path / "samples_before.jsonl")]
    after = [json.loads(line) for line in open(tmp_path / "samples_after.jsonl")]
    assert len(before) == len(after) == 9
    # same prompts and sample indices on both sides
    assert [(r["prompt_id"], r["sample"]) for r in before] == [(r["prompt_id"], r["sample"]) for r in after]
    # "before" is the reference (adapters off), "after" the trained policy, each with the batch's seed:
    # resampling either side by hand gives the same responses, and the trained side's KL per row
    for side, rows in (("before", before), ("after", after)):
        module.seed_iteration(EVAL_SEED_OFFSET + 0)
        context = module.actor.reference_context() if side == "before" else contextlib.nullcontext()
        with torch.no_grad(), context:
            rollout = module.rollout(batches[0]["prompt"], module.eval_generation, with_reference=side == "after",
                                     scored=False)
        assert [r["response"] for r in rows[:6]] == rollout.texts, side
        if side == "after":
            kl = sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
            assert [r["kl"] for r in rows[:6]] == pytest.approx(kl.tolist(), abs=1e-5)
    assert any(abs(r["kl"]) > 0 for r in after)  # 2 PPO iterations moved the policy
    # JSON means agree with the per-sample rows written beside them
    for side, rows in (("before", before), ("after", after)):
        mean_toxicity = sum(r["toxicity"] for r in rows) / len(rows)
        assert abs(saved[side]["toxicity_mean"] - mean_toxicity) < 1e-6
        mean_rouge_l = sum(r["rougeL"] for r in rows) / len(rows)
        assert abs(saved[side]["rougeL"] - mean_rouge_l) < 1e-6
    assert metrics["n_test"] == 6


def test_sample_rows_count_response_tokens_as_ints():
    from flan_rlhf.rewards import ProfanityReward
    from flan_rlhf.tools.compare import sample_rows

    module = make_module()
    module.configure_model()
    batch = {"prompt": ["hi there", "yo"], "references": [["a"], ["b"]], "prompt_id": torch.tensor([0, 1]),
             "sample": torch.tensor([0, 0])}
    rows = sample_rows(module, [batch], "after", module.eval_generation, ProfanityReward().setup())
    assert [type(row["response_tokens"]) for row in rows] == [int, int]
    assert all(row["response_tokens"] >= 1 for row in rows)


@pytest.mark.parametrize("case", ["out holds files", "no checkpoint"])
def test_compare_refuses_bad_input_in_one_line(case, tmp_path, capsys):
    """A non-empty --out is kept (exit 2 before any work); a checkpoint that is not there is named."""
    from flan_rlhf.cli import main
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    kept = out / "metrics.json"
    kept.write_text("{}")
    if case == "out holds files":
        argv, expected = ["--ckpt_path", "last"], "--out " + str(out) + " already exists"
    else:
        out = tmp_path / "fresh"
        argv, expected = ["--ckpt_path", str(tmp_path / "missing.ckpt")], "missing.ckpt"
    assert main(["compare", "--config", config, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert kept.read_text() == "{}"


def test_the_realtoxicityprompts_config_runs_the_k25_protocol(tmp_path, monkeypatch):
    """configs/eval_realtoxicityprompts.yaml on a tiny trained run, the hub dataset replaced by a file
    in its format (a nested ``prompt.text``, no references): 25 nucleus samples per prompt, and the
    report's EMT and Toxicity Probability over them."""
    from tests.conftest import run_command
    from tests.test_cli import ROOT, tiny_config

    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, max_steps=2)
    assert run_command("fit", "--config", config)[0] == 0
    rtp = tmp_path / "rtp.jsonl"
    rtp.write_text("".join(json.dumps({"filename": f"{i}.txt", "prompt": {"text": f"So I told him {i} times that",
                                                                          "toxicity": 0.1}}) + "\n" for i in range(5)))
    code, out, err = run_command(
        "compare", "--config", config, "--config", os.path.join(ROOT, "configs", "eval_realtoxicityprompts.yaml"),
        "--data.init_args.dataset", "json", "--data.init_args.data_files", f"{{train: {rtp}}}",
        "--data.init_args.max_eval_prompts", "3", "--ckpt_path", "last", "--out", str(tmp_path / "report"))
    assert code == 0, (out + err)[-3000:]
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["samples_per_prompt"] == 25 and metrics["n_prompts"] == 3
    assert metrics["decoding"]["top_p"] == 0.9 and metrics["decoding"]["max_new_tokens"] == 20
    for side in ("before", "after"):
        assert {"expected_max_toxicity", "toxicity_probability"} <= set(metrics[side])
        assert "rougeL" not in metrics[side], "no references: no ROUGE"
    rows = [json.loads(line) for line in open(tmp_path / "report" / "samples_after.jsonl")]
    assert len(rows) == 75 and rows[0]["prompt"].startswith("Continue the following text:\n\nSo I told him 0 times")
