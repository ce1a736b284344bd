"""The benchmark scripts keep running and print what the README says they print (tiny settings)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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
