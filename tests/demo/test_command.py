"""``flan-rlhf demo`` end to end on a tiny corpus: it runs, reruns over its own artefacts, and
never replaces a folder it cannot tell is its own unless ``--rebuild`` says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flan_rlhf.demo.pipeline import DEMO_CHECKPOINTS_MARK, METHODS, _configs_dir, _paths, _task_overlays
from flan_rlhf.output_dirs import MANIFEST
from tests.conftest import error_lines, run_command

TINY = ["--sft_steps", "2", "--ppo_steps", "1", "--n_train", "64", "--n_test", "8"]


def test_demo_runs_reruns_and_refuses_a_folder_it_did_not_write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its logger writes to ./lightning_logs, as `make demo` does
    root, out = tmp_path / "artifacts", tmp_path / "reports"
    argv = ["demo", "--root", str(root), "--out", str(out), "--method", "ppo", *TINY]
    first, second = tmp_path / "demo_1.yaml", tmp_path / "demo_2.yaml"  # two composed configs, then a flag
    first.write_text(yaml.safe_dump({"root": str(root), "out": str(out), "sft_steps": 2, "ppo_steps": 3, "n_test": 16,
                                     "method": "ppo"}))
    second.write_text(yaml.safe_dump({"ppo_steps": 1, "n_train": 64}))

    code, stdout, err = run_command("demo", "--config", str(first), "--config", str(second), "--n_test", "8")
    assert code == 0, err[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 8 and metrics["ppo_steps"] == 1 and (out / "report.md").is_file()
    summary = stdout.strip().splitlines()[-7:]  # the closing summary names every output
    assert summary[0].startswith("demo: n_test=8 ppo_steps=1 wall_s=")
    assert summary[1:4] == [f"  report: {out / 'report.md'}", f"  metrics: {out / 'metrics.json'}",
                            f"  adapter: {root / 'ppo_adapter'}"]
    assert summary[5] == f"  checkpoints: {root / 'ppo_checkpoints'} (newest: {root / 'ppo_checkpoints' / 'last.ckpt'})"
    assert summary[6].startswith("  logs: ") and "demo_ppo_seed0" in summary[6]
    first_adapter = json.loads((root / "ppo_adapter" / MANIFEST).read_text())

    code, stdout, err = run_command(*argv)  # the SFT cache is reused, the demo's own adapter replaced
    assert code == 0, err[-3000:]
    assert "SFT model cached" in stdout
    assert json.loads((root / "ppo_adapter" / MANIFEST).read_text())["run_id"] != first_adapter["run_id"]

    (root / "ppo_adapter" / MANIFEST).unlink()  # as an older flan-rlhf (no manifest) left it
    before = {p.name: p.read_bytes() for p in (root / "ppo_adapter").iterdir()}
    code, _, err = run_command(*argv)
    assert code == 2 and len(error_lines(err)) == 1 and "--rebuild true" in error_lines(err)[0], err[-3000:]
    assert {p.name: p.read_bytes() for p in (root / "ppo_adapter").iterdir()} == before

    code, _, err = run_command(*argv, "--rebuild", "true")
    assert code == 0, err[-3000:]
    assert (root / "ppo_adapter" / MANIFEST).is_file()


def test_demo_runs_rloo_and_grpo_beside_ppo_on_the_cached_sft_model(tmp_path, monkeypatch):
    """``--method rloo`` / ``grpo``: the RL stage is configs/demo_<method>.yaml, the SFT model
    of an earlier run is reused, and each writes its own adapter (no value head), checkpoints and
    default report folder (``reports/demo-<method>``), leaving PPO's untouched."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "artifacts"
    code, _, err = run_command("demo", "--root", str(root), "--out", str(tmp_path / "reports" / "demo"),
                               "--method", "ppo", *TINY)
    assert code == 0, err[-3000:]
    ppo_adapter = {p.name: p.read_bytes() for p in (root / "ppo_adapter").iterdir()}
    for method in ("rloo", "grpo"):
        code, stdout, err = run_command("demo", "--root", str(root), "--method", method, *TINY)
        assert code == 0, err[-3000:]
        assert "SFT model cached" in stdout and f"3/4 {method.upper()} with LoRA" in stdout
        metrics = json.loads((tmp_path / "reports" / f"demo-{method}" / "metrics.json").read_text())
        assert metrics["method"] == method.upper() and metrics["ppo_steps"] == 1
        adapter = root / f"{method}_adapter"
        assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "value_head.safetensors").exists()
        assert (root / f"{method}_checkpoints" / "last.ckpt").is_file()
    assert {p.name: p.read_bytes() for p in (root / "ppo_adapter").iterdir()} == ppo_adapter

    # checkpoints the demo cannot tell are its own (no mark, no matching export) are kept: one line, exit 2
    ckpt_dir = root / "grpo_checkpoints"
    (ckpt_dir / DEMO_CHECKPOINTS_MARK).unlink()
    (root / "grpo_adapter" / MANIFEST).unlink()
    kept = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    code, _, err = run_command("demo", "--root", str(root), "--method", "grpo", *TINY)
    assert code == 2 and len(error_lines(err)) == 1 and "did not write" in error_lines(err)[0], err[-3000:]
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == kept
    # --rebuild names them for replacing; it replaces GRPO's folders and the SFT model, not the other methods'
    rloo_adapter = {p.name: p.read_bytes() for p in (root / "rloo_adapter").iterdir()}
    code, _, err = run_command("demo", "--root", str(root), "--method", "grpo", "--rebuild", "true", *TINY)
    assert code == 0, err[-3000:]
    assert (ckpt_dir / DEMO_CHECKPOINTS_MARK).is_file() and (root / "grpo_adapter" / MANIFEST).is_file()
    assert {p.name: p.read_bytes() for p in (root / "rloo_adapter").iterdir()} == rloo_adapter
    assert {p.name: p.read_bytes() for p in (root / "ppo_adapter").iterdir()} == ppo_adapter


@pytest.mark.parametrize("seed, method, task, root, out", [
    (0, "ppo", "tail", "artifacts/demo", "reports/demo"),  # the tail task keeps its folders
    (2, "rloo", "tail", "artifacts/demo-seed2", "reports/demo-rloo-seed2"),
    (0, "ppo", "woven", "artifacts/demo-woven", "reports/demo-woven"),
    (0, "rloo", "woven", "artifacts/demo-woven", "reports/demo-woven-rloo"),
    (3, "grpo", "woven", "artifacts/demo-woven-seed3", "reports/demo-woven-grpo-seed3"),
])
def test_default_folders_per_task_method_and_seed(seed, method, task, root, out):
    assert _paths(seed, None, None, method, task) == (Path(root), Path(out))
    assert _paths(seed, "r", "o", method, task) == (Path("r"), Path("o"))  # --root and --out win


@pytest.mark.parametrize("method", METHODS)
def test_woven_overlay_makes_the_clean_summary_the_reference_of_every_method(method):
    """``--task woven`` adds configs/demo_woven.yaml after configs/demo_<method>.yaml: jsonargparse merges its
    ``data.init_args`` and ``model.init_args`` into the method's (no class_path repeated): the clean summary
    becomes the reference and the reward non_profanity + 0.5 ROUGE-L against it; nothing else changes."""
    from flan_rlhf.lightning_cli import parse_training_config

    configs = _configs_dir()
    assert _task_overlays(configs, "tail") == []
    overlay = _task_overlays(configs, "woven")
    assert overlay == ["--config", str(configs / "demo_woven.yaml")]
    alone = parse_training_config([str(configs / f"demo_{method}.yaml")], ["--seed_everything=false"])
    woven = parse_training_config([str(configs / f"demo_{method}.yaml"), overlay[1]], ["--seed_everything=false"])
    assert alone.data.init_args.reference_columns == ["summary"]
    assert woven.data.init_args.reference_columns == ["clean_summary"]
    assert woven.model.class_path == alone.model.class_path and woven.data.class_path == alone.data.class_path
    reward = woven.model.init_args.reward
    assert reward.class_path == "flan_rlhf.rewards.CompositeReward" and reward.init_args.weights == [1.0, 0.5]
    assert [part.class_path for part in reward.init_args.rewards] == ["flan_rlhf.rewards.ProfanityReward",
                                                                       "flan_rlhf.rewards.RougeReward"]
    changed = {key for key, value in woven.items() if alone.get(key) != value}
    # `config`: the files read
    assert changed == {"config", "data.init_args.reference_columns", "model.init_args.reward.class_path",
                       "model.init_args.reward.init_args.rewards", "model.init_args.reward.init_args.weights",
                       "model.init_args.reward.init_args.name"}, changed


def test_demo_woven_task_runs_to_its_own_folders_with_the_overlay(tmp_path, monkeypatch):
    """``--task woven`` with the default method (RLOO: docs/time-to-detox.md): the woven corpus, SFT on it,
    the RL stage and report with configs/demo_woven.yaml (clean summaries as references), all under
    artifacts/demo-woven and reports/demo-woven-rloo."""
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_command("demo", "--task", "woven", *TINY)
    assert code == 0, err[-3000:]
    root, out = tmp_path / "artifacts" / "demo-woven", tmp_path / "reports" / "demo-woven-rloo"
    assert "1/4 corpus (woven task) and tokenizer -> artifacts/demo-woven" in stdout
    assert json.loads((root / "corpus" / "manifest.json").read_text())["task"] == "woven"
    assert any(row["toxic"] and not row["summary"].startswith(row["clean_summary"][:-1])
               for row in map(json.loads, (root / "corpus" / "train.jsonl").read_text().splitlines()))
    output = stdout + err
    assert "data[train <- 'train']: 64 loaded; 64 kept; references from: summary" in output  # SFT: the woven text
    assert "data[train <- 'train']: 64 loaded; 64 kept; references from: clean_summary" in output  # RL: the overlay
    assert "data[test <- 'test']: 8 loaded; 8 kept; references from: clean_summary" in output  # the report too
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "woven" and metrics["method"] == "RLOO" and metrics["n_test"] == 8
    assert (root / "rloo_adapter" / MANIFEST).is_file() and (root / "sft_model" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["demo_woven_rloo_seed0",
                                                                               "demo_woven_sft_seed0"]
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["demo-woven"]
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["demo-woven-rloo"]
