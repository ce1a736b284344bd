"""The benchmark scripts keep running and print what the README says they print (tiny settings)."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("lora", [True, False])
def test_ppo_throughput_prints_one_json_line_with_the_issue_keys(lora):
    out = _run("ppo_throughput.py", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2",
               "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "1", "--max-new-tokens", "4",
               "--steps", "1", "--warmup", "0", "--threads", "1", *(["--lora"] if lora else []))
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1
    row = json.loads(lines[0])
    for key in ("impl", "samples_per_s", "gen_s_per_step", "train_s_per_step", "mean_response_tokens",
                "peak_rss_mb", "rss_after_import_mb", "config"):
        assert key in row, key
    assert row["impl"] == "flan-rlhf" and row["samples_per_s"] > 0 and row["config"]["lora"] is lora
    assert row["ppo_updates_per_step"] == [2]  # 4 prompts / minibatches of 2, one epoch
    assert row["first_minibatch_max_abs_ratio_minus_1"] < 1e-4  # old log-probs from the sampling pass


HOST_SYNC_FLAGS = ("--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2", "--batch-size", "8",
                   "--mini-batch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "4", "--steps", "2",
                   "--threads", "1")


def test_host_syncs_finds_no_conversion_in_the_minibatch_loop():
    row = json.loads(_run("host_syncs.py", *HOST_SYNC_FLAGS).strip().splitlines()[-1])
    assert row["minibatches"] == 8 and row["iterations"] == 2  # 2 iterations x 2 epochs x (8 prompts / 4)
    assert row["syncs_per_minibatch"] == 0.0 and row["sites"] == {}, row["sites"]
    # the counter works: the reads the update makes once per iteration are found, with their sites
    assert row["sites_outside_loop"].get("update_tally.py:%d tolist" % _line_of("flan_rlhf/update_tally.py",
                                                                                "values = torch.stack")) == 1.0
    assert all(site.split(":")[0].endswith(".py") for site in row["sites_outside_loop"])


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_host_syncs_finds_no_conversion_in_the_critic_free_minibatch_loop(method):
    """RLOO / GRPO (KL as a loss term for GRPO) read nothing from the device per minibatch either:
    4 prompts x 2 responses = 8 rows, the same 8 minibatches as PPO's run."""
    flags = list(HOST_SYNC_FLAGS)
    flags[flags.index("--batch-size") + 1] = "4"
    row = json.loads(_run("host_syncs.py", *flags, "--method", method, "--samples-per-prompt", "2")
                     .strip().splitlines()[-1])
    assert row["minibatches"] == 8 and row["iterations"] == 2
    assert row["syncs_per_minibatch"] == 0.0 and row["sites"] == {}, row["sites"]


def test_host_syncs_counts_a_conversion_planted_in_the_minibatch_loop(monkeypatch):
    """With an ``.item()`` added to ``ppo.policy_loss`` (called once per minibatch) the count is 1.0."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    monkeypatch.setattr(sys, "path", sys.path)
    import host_syncs
    from flan_rlhf import ppo

    policy_loss = ppo.policy_loss

    def policy_loss_with_a_sync(*args, **kwargs):
        result = policy_loss(*args, **kwargs)
        result[0].item()
        return result

    monkeypatch.setattr(ppo, "policy_loss", policy_loss_with_a_sync)
    row = host_syncs.count_syncs(host_syncs.bench.parse_args(list(HOST_SYNC_FLAGS)))
    assert row["syncs_per_minibatch"] == 1.0
    assert list(row["sites"]) == ["module.py:%d item" % _line_of("flan_rlhf/module.py", "pg_loss, clipfrac, approx_kl =")]


def _line_of(path: str, text: str) -> int:
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        return next(number for number, line in enumerate(handle, 1) if text in line)


def test_count_warnings_classifies_planted_lines():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from count_warnings import foreign_lines

    output = ("fit: 2/2 steps in 1.0 s\n  checkpoints: ckpt (newest: ckpt/last.ckpt)\n[fit] step 1/2 (50%) 0.5 s\n"
              "resumed from step 2 (ckpt/last.ckpt)\nresumed from step 2 (ckpt/last.ckpt)\n"
              "/site-packages/x.py:3: FutureWarning: `y` is deprecated\n  warnings.warn(\nGPU available: False, used: False\n")
    assert foreign_lines(output) == ["(repeated) resumed from step 2 (ckpt/last.ckpt)",
                                     "/site-packages/x.py:3: FutureWarning: `y` is deprecated", "  warnings.warn("]


def test_fit_resume_validate_compare_export_generate_print_no_foreign_line():
    """Every known-harmless third-party message is filtered (flan_rlhf.quiet) and nothing else is printed."""
    rows = [json.loads(line) for line in _run("count_warnings.py").splitlines()]
    assert [row["command"] for row in rows[:-1]] == ["fit", "fit --ckpt_path last", "validate", "compare", "export",
                                                     "generate"]
    assert rows[-1] == {"total_foreign": 0}, [row.get("foreign_lines") for row in rows[:-1]]


def test_reward_limits_prints_each_measured_limit():
    """The figures docs/rewards.md quotes: every section printed, and the dilution the default undoes."""
    out = _run("reward_limits.py", "--summaries", "200")
    for start in ("ProfanityReward window: ", "ProfanityReward false positives", "  flagged by name: Dick ",
                  "VaderReward called negative", "German clean sentences", "French clean sentences",
                  "Spanish clean sentences", "clean characters an insult survives", "entities raw -> decoded",
                  "DetoxifyReward: window = its tokenizer's 512 tokens"):
        assert any(line.startswith(start) for line in out.splitlines()), start
    diluted = re.findall(r"insult after ([\d,]+) clean characters: p\(profane\) long_text=whole ([\d.]+), "
                         r"worst_chunk \(default\) ([\d.]+)", out)
    assert len(diluted) == 3 and int(diluted[-1][0].replace(",", "")) > 19_000
    assert all(float(chunked) >= 0.5 for _, _, chunked in diluted)
    assert float(diluted[-1][1]) < 0.5  # the whole 20,000 characters hide the insult


def _benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_to_target():
    return _benchmark("time_to_target")


def test_sharded_throughput_runs_each_strategy_on_the_config_fit_parses_and_takes_median_times(tmp_path):
    """The three runs' configs (the whole benchmark takes ~2 min: docs/scaling.md quotes its output) parse as
    ``fit`` would parse them, and the medians leave out the warm-up iterations (values by hand)."""
    import argparse

    from torch.utils.tensorboard import SummaryWriter

    from flan_rlhf.lightning_cli import parse_training_config

    bench = _benchmark("sharded_throughput")
    args = argparse.Namespace(devices=2, steps=3, warmup=1, d_model=128, layers=2, batch_size=4, max_new_tokens=8,
                              full_finetune=False)
    for name, strategy in bench.STRATEGIES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bench.run_config(args, strategy, str(tmp_path / name))))
        config = parse_training_config([str(path)])
        assert config["trainer"]["strategy"] == strategy or config["trainer"]["strategy"]["class_path"] == strategy["class_path"]
        assert config["trainer"]["max_steps"] == 4 and config["model"]["init_args"]["policy"]["t5_config"]["d_model"] == 128
        assert config["model"]["init_args"]["generation"]["min_new_tokens"] == 8  # every response the same length
    writer = SummaryWriter(str(tmp_path / "logs" / "version_0"))
    for step, (rollout, update) in enumerate([(9.0, 9.0), (1.0, 4.0), (3.0, 2.0), (2.0, 3.0)]):
        writer.add_scalar("time/rollout_s", rollout, step)
        writer.add_scalar("time/update_s", update, step)
    writer.close()
    assert bench.medians(str(tmp_path / "logs"), warmup=1) == {"rollout_s": 2.0, "update_s": 3.0}


def test_time_to_target_math_by_hand():
    ttt = _time_to_target()
    # the target: toxic share <= 10% of the SFT model's and ROUGE-L >= 0.95x its
    assert ttt.target_met(0.03, 0.95, 0.3, 1.0) and not ttt.target_met(0.031, 0.99, 0.3, 1.0)
    assert not ttt.target_met(0.0, 0.949, 0.3, 1.0)
    # reached at the first evaluation of the first streak of 3
    assert ttt.first_held([False, True, True, False, True, True, True, True], 3) == 4
    assert ttt.first_held([True, True, False, True, True], 3) is None
    # step curve: 0.3 for 2 s, 0.1 for 3 s, 0.0 for the last 5 s of a 10 s horizon -> (0.6 + 0.3) / 10
    assert math.isclose(ttt.area_under_curve([0.0, 2.0, 5.0], [0.3, 0.1, 0.0], 10.0), 0.09)
    assert math.isclose(ttt.area_under_curve([0.0, 2.0, 5.0], [0.3, 0.1, 0.0], 4.0), (0.6 + 0.2) / 4)
    assert ttt.median_and_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert ttt.median_and_spread([1.0, 2.0, 3.0, math.inf]) == (2.5, 1.0, math.inf)


def test_time_to_target_runs_resumes_and_reports(tmp_path):
    """Tiny scale (SFT of 2 steps on 64 dialogues, 2 iterations of 8 responses, 8 evaluation prompts): one JSON line per run
    with the curve from the SFT model on (the woven task: its overlay and ROUGE-L reward), a rerun skips finished runs, and the report prints the table and
    writes the PNG."""
    out, png = tmp_path / "runs.jsonl", tmp_path / "ttt.png"
    args = ["run", "--methods", "rloo", "--tasks", "woven", "--seeds", "0", "--max-iterations", "2",
            "--eval-prompts", "8", "--artifacts", str(tmp_path / "artifacts"), "--sft-steps", "2",
            "--n-train", "64", "--rows", "8", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    script = os.path.join(REPO, "benchmarks", "time_to_target.py")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=900,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["task"], r["seed"]) for r in runs] == [("rloo", "woven", 0)]
    for run in runs:
        assert run["eval_prompts"] == 8 and run["samples_per_prompt"] == 4 and run["rows_per_iteration"] == 8
        assert [p["iteration"] for p in run["curve"]] == [0, 1, 2]  # the SFT model, then each iteration
        assert [p["samples"] for p in run["curve"]] == [0, 8, 16]  # 2 prompts x 4 responses per iteration
        assert 0 < run["curve"][1]["cpu_s"] < run["curve"][2]["cpu_s"]
        assert run["curve"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # adapters at init: the SFT model itself
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=900,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.count("[skip]") == 1 and len(out.read_text().splitlines()) == 1
    proc = subprocess.run([sys.executable, script, "report", "--out", str(out), "--png", str(png)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip().splitlines()
    assert table[0].startswith("| task | method |") and len(table) == 3 and table[2].startswith("| woven | RLOO |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
