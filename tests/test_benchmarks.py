"""The benchmark scripts keep running and print what the README says they print (tiny settings)."""
from __future__ import annotations

import json
import os
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


def test_host_syncs_counts_conversions_per_minibatch_with_their_sites():
    out = _run("host_syncs.py", "--d-model", "32", "--d-ff", "64", "--layers", "1", "--heads", "2",
               "--batch-size", "8", "--mini-batch-size", "4", "--ppo-epochs", "2", "--max-new-tokens", "4",
               "--steps", "2", "--threads", "1")
    row = json.loads(out.strip().splitlines()[-1])
    assert row["minibatches"] == 8  # 2 iterations x 2 epochs x (8 prompts / 4)
    assert sum(row["sites"].values()) * row["minibatches"] == pytest.approx(row["syncs_in_minibatch_loop"])
    assert row["syncs_per_minibatch"] == pytest.approx(row["syncs_in_minibatch_loop"] / 8)
    assert all(site.split(":")[0].endswith(".py") for site in row["sites"])
    # per minibatch: one read of the guard decisions (non-finite loss, ratio threshold, target KL);
    # per iteration, shared by the 4 minibatches: the token-id check (2), the statistics and the
    # epoch orders. A conversion that creeps back into the loop raises this count.
    assert row["syncs_per_minibatch"] <= 2.0, row["sites"]
