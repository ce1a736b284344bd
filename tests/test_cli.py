"""Every config parses; every CLI subcommand runs on a tiny model; TensorBoard gets the documented tags."""
from __future__ import annotations

import glob
import json
import os

import pytest
import yaml

from flan_rlhf.cli import COMMANDS, main
from flan_rlhf.lightning_cli import parse_training_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
REWARD_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "rewards", "*.yaml")))
LOGGER_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "loggers", "*.yaml")))  # run by tests/test_loggers.py

TRAINING_TAGS = [
    "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl", "ppo/policy/clipfrac", "ppo/val/clipfrac",
    "ppo/returns/mean", "ppo/val/mean", "tokens/response_len_mean", "time/rollout_s", "time/update_s",
]


def _is_overlay(path: str) -> bool:
    """Strategy configs (ddp, fsdp, deepspeed: only `trainer:`) and evaluation configs (no model class)
    are combined with a model config."""
    return "class_path" not in (yaml.safe_load(open(path)).get("model") or {})


def _assert_overlaid(parsed, overlay, where: str = "") -> None:
    """Every leaf of ``overlay`` (a YAML section) is what the composed config parsed to."""
    for key, value in overlay.items():
        if isinstance(value, dict):
            _assert_overlaid(parsed[key], value, f"{where}.{key}")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):  # e.g. a composite's rewards
            assert len(parsed[key]) == len(value), f"{where}.{key}"
            for index, item in enumerate(value):
                _assert_overlaid(parsed[key][index], item, f"{where}.{key}[{index}]")
        else:
            assert _plain(parsed[key]) == value, f"{where}.{key}"


def _plain(value):
    """Parsed values back to their YAML spelling: enums by name, classes by import path."""
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return getattr(value, "name", value) if not isinstance(value, (str, int, float, bool)) else value


def parse(*configs: str):
    return parse_training_config(list(configs))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=os.path.basename)
def test_every_training_config_parses(path):
    configs = (os.path.join(ROOT, "configs", "flan_t5_base_dialogsum.yaml"), path) if _is_overlay(path) else (path,)
    config = parse(*configs)
    assert config["model"]["class_path"].startswith("flan_rlhf.")
    assert config["data"]["class_path"].startswith("flan_rlhf.")
    if _is_overlay(path):
        _assert_overlaid(config, yaml.safe_load(open(path)))


@pytest.mark.parametrize("path", LOGGER_CONFIGS, ids=os.path.basename)
def test_every_logger_overlay_parses_over_a_training_config(path):
    config = parse(os.path.join(ROOT, "configs", "tiny.yaml"), path)
    _assert_overlaid(config, yaml.safe_load(open(path)))


@pytest.mark.parametrize("path", REWARD_CONFIGS, ids=os.path.basename)
def test_every_reward_config_parses_as_a_reward(path):
    from jsonargparse import ArgumentParser

    from flan_rlhf.rewards.base import Reward

    parser = ArgumentParser()
    parser.add_argument("--reward", type=Reward)
    cfg = parser.parse_args(["--reward", json.dumps(yaml.safe_load(open(path)))])
    assert cfg.reward.class_path.startswith("flan_rlhf.rewards")
    reward = parser.instantiate_classes(cfg).reward  # models load lazily in setup(): cheap here
    assert isinstance(reward, Reward)


def test_unknown_yaml_key_gives_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    config["model"]["init_args"]["ppo"]["learnin_rate"] = 0.1
    bad.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "learnin_rate" in capsys.readouterr().err


def tiny_config(tmp_path, **trainer) -> str:
    """configs/tiny.yaml with every output under tmp_path and a shorter run; the checkpoints in one
    folder, ``tmp_path/ckpt`` (a ``dirpath``; configs/tiny.yaml puts each run's under its log folder)."""
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    config["trainer"].update({"max_steps": 4, "val_check_interval": 2, **trainer})
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    for callback in config["trainer"]["callbacks"]:
        args = callback["init_args"]
        if callback["class_path"].endswith("ModelCheckpoint"):
            args.update(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
        if "output_path" in args:
            args["output_path"] = str(tmp_path / "pred.jsonl")
    init = config["model"]["init_args"]
    init["generation"]["max_new_tokens"] = 8
    init["export_dir"] = str(tmp_path / "adapter")
    init["log_samples_every_n_steps"] = 2
    config["data"]["init_args"].update(batch_size=8, eval_batch_size=8)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def read_scalars(logdir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {}
    for events in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(events)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return values


def test_fit_validate_test_predict_compare_on_tiny_model(tmp_path, capsys):
    """Each Lightning command and compare, on two composed configs (the later wins) and a flag (wins over both)."""
    config = tiny_config(tmp_path)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"max_steps": 6},
                                       "data": {"init_args": {"max_eval_prompts": 6, "samples_per_prompt": 2}}}))
    assert main(["fit", "--config", config, "--config", str(overlay), "--trainer.max_steps", "4"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("[fit]")]
    assert [line.split(" (")[0] for line in progress] == [f"[fit] step {step}/4" for step in (1, 2, 3, 4)]
    summary = captured.out.splitlines()[-4:]  # run_summary: what ran, then each output that exists
    assert summary[0].startswith("fit: 4/4 steps in ")
    assert summary[1:] == [f"  checkpoints: {tmp_path / 'ckpt'} (newest: {tmp_path / 'ckpt' / 'last.ckpt'})",
                           f"  export: {tmp_path / 'adapter'}", f"  logs: {tmp_path / 'logs' / 'tiny' / 'version_0'}"]
    scalars = read_scalars(str(tmp_path / "logs"))
    missing = [tag for tag in TRAINING_TAGS if tag not in scalars]
    assert not missing, missing
    assert len(scalars["env/reward_mean"]) == 4  # one point per PPO iteration
    assert "val/reward_mean" in scalars and "val/rougeL" in scalars
    assert os.path.exists(tmp_path / "ckpt" / "last.ckpt")
    assert os.path.exists(tmp_path / "adapter" / "adapter_model.safetensors")
    from peft import PeftModel  # the exported adapter loads with plain peft

    from flan_rlhf.policy import build_t5_from_config

    base = build_t5_from_config(vocab_size=384, d_model=64, d_ff=128, num_layers=2, num_heads=4)
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))

    composed = ["--config", config, "--config", str(overlay), "--data.max_eval_prompts", "5", "--ckpt_path", "last"]
    for subcommand in ("validate", "test"):
        assert main([subcommand, *composed]) == 0
    capsys.readouterr()
    assert main(["predict", *composed]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[-1] == f"  rows: 10 in {tmp_path / 'pred.jsonl'}"
    assert summary[-2].startswith(f"  logs: {tmp_path / 'logs' / 'tiny' / 'version_'}")
    assert summary[-3].startswith(f"predict: 2 batches from {tmp_path / 'ckpt' / 'last.ckpt'} in ")
    rows = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(rows) == 5 * 2  # max_eval_prompts from the flag, samples_per_prompt from the overlay
    assert {"prompt", "response", "reward", "non_profanity", "kl"} <= set(rows[0])
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # configs/tiny.yaml's monitor, per response

    vader = SentimentIntensityAnalyzer()
    assert [row["monitor/positivity"] for row in rows] == pytest.approx(
        [vader.polarity_scores(row["response"])["compound"] for row in rows], abs=1e-6)
    assert list(rows[0])[:6] == ["prompt_id", "sample", "prompt", "prompt_truncated", "response", "references"]  # rollout.response_rows
    assert len({row["prompt_id"] for row in rows}) == 5

    report = tmp_path / "report"
    capsys.readouterr()
    assert main(["compare", *composed, "--out", str(report)]) == 0
    captured = capsys.readouterr()
    assert "[compare] 4/4 batches (100%)" in captured.err  # 10 rows in batches of 8, reference side then trained side
    summary = captured.out.splitlines()[-4:]
    assert summary[0].startswith(f"compare: 5 prompts x 2 samples on the test split, reference vs {tmp_path / 'ckpt' / 'last.ckpt'}, in ")
    assert summary[1:3] == [f"  report: {report / 'report.md'}", f"  metrics: {report / 'metrics.json'}"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert (metrics["n_prompts"], metrics["samples_per_prompt"]) == (5, 2)
    assert metrics["checkpoint"] == str(tmp_path / "ckpt" / "last.ckpt")
    walk_export_generate_score(tmp_path, [config, str(overlay)], capsys)


@pytest.mark.parametrize("class_name", ["RLOOModule", "GRPOModule"])
def test_critic_free_fit_validate_predict_compare_export_on_tiny_model(tmp_path, capsys, class_name):
    """RLOO and GRPO go through every Lightning command, compare and export like PPO: fit logs the
    shared tags and the group statistics (no value-head tags); evaluation samples one response per
    prompt; the export holds no value head."""
    from tests.conftest import as_critic_free

    config_path = tiny_config(tmp_path, max_steps=2, val_check_interval=2)
    config = as_critic_free(yaml.safe_load(open(config_path)), class_name, {"samples_per_prompt": 2,
                                                                             "mini_batch_size": 8})
    config["data"]["init_args"]["max_eval_prompts"] = 4
    open(config_path, "w").write(yaml.safe_dump(config))
    assert main(["fit", "--config", config_path]) == 0
    scalars = read_scalars(str(tmp_path / "logs"))
    shared = [tag for tag in TRAINING_TAGS if not tag.startswith(("ppo/loss/value", "ppo/val/", "ppo/returns/"))]
    missing = [tag for tag in shared + ["group/reward_std", "group/frac_reward_zero_std", "ppo/loss/kl"]
               if tag not in scalars]
    assert not missing, missing
    assert not [tag for tag in scalars if tag.startswith(("ppo/val/", "ppo/loss/value"))]
    assert len(scalars["env/reward_mean"]) == 2 and "val/rougeL" in scalars
    assert not (tmp_path / "adapter" / "value_head.safetensors").exists()
    assert "(RLHF) with LoRA" in (tmp_path / "adapter" / "README.md").read_text()

    resumed = ["--config", config_path, "--ckpt_path", "last"]
    assert main(["validate", *resumed]) == 0
    assert main(["predict", *resumed]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "pred.jsonl")]
    assert len(rows) == 4 and len({row["prompt_id"] for row in rows}) == 4  # one response per prompt
    assert main(["compare", *resumed, "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["n_prompts"] == 4
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["export", "--ckpt_path", "last", "--run_config", config_path, "--out", str(merged)]) == 0
    assert (merged / "config.json").is_file() and class_name.removesuffix("Module") in (merged / "README.md").read_text()


def _two_configs(tmp_path, name: str, first: dict, second: dict) -> list[str]:
    """``--config A --config B`` with A and B written from ``first`` and ``second``."""
    paths = [tmp_path / f"{name}_{i}.yaml" for i in (1, 2)]
    for path, content in zip(paths, (first, second)):
        path.write_text(yaml.safe_dump(content))
    return ["--config", str(paths[0]), "--config", str(paths[1])]


def walk_export_generate_score(tmp_path, run_config: list[str], capsys) -> None:
    """export (``--ckpt_path last`` of the run ``run_config`` fit) -> generate -> score, each on two
    composed configs (the later wins) and a flag (wins over both); generate's rows pipe into score."""
    from profanity_check import predict_prob

    merged = tmp_path / "merged"
    capsys.readouterr()
    assert main(["export", *_two_configs(tmp_path, "export", {"ckpt_path": "nowhere.ckpt", "out": str(merged)},
                                         {"ckpt_path": "last", "run_config": run_config}), "--dtype", "fp32"]) == 0
    summary = capsys.readouterr().out.splitlines()[-2:]
    assert summary[0].startswith(f"export: merged fp32 model from {tmp_path / 'ckpt' / 'last.ckpt'} in ")
    assert summary[1].startswith(f"  folder: {merged} (") and summary[1].endswith(" MB)")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "text": f"prompt number {i}"}) + "\n" for i in range(5)))
    responses = tmp_path / "responses.jsonl"
    assert main(["generate", *_two_configs(tmp_path, "generate",
                                           {"model": str(merged), "input": str(prompts), "output": str(responses),
                                            "max_new_tokens": 30, "batch_size": 4},
                                           {"prompt_column": "text", "max_new_tokens": 8}), "--batch_size", "2"]) == 0
    captured = capsys.readouterr()
    assert "[generate] 5/5 rows (100%)" in captured.err  # batches of 2 from the flag: lines at 2 and 4 rows, then the end
    assert captured.out.splitlines()[-1] == f"  rows: 5 in {responses}"
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [f"prompt number {i}" for i in range(5)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert max(len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) for row in rows) <= 8

    scored = tmp_path / "scored.jsonl"
    assert main(["score", *_two_configs(tmp_path, "score",
                                        {"reward": "VaderReward", "input": str(responses), "output": str(scored)},
                                        {"reward": "ProfanityReward", "batch_size": 1}), "--batch_size", "2"]) == 0
    captured = capsys.readouterr()
    assert "[score] 5/5 rows (100%)" in captured.err
    assert captured.out.splitlines()[-1] == f"  rows: 5 in {scored}"
    scored_rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert [row["response"] for row in scored_rows] == [row["response"] for row in rows]  # the default columns pipe
    expected = 1.0 - predict_prob([row["response"] for row in rows])
    assert all(abs(row["reward"] - value) < 1e-6 for row, value in zip(scored_rows, expected))


def test_tool_subcommands_are_dispatched(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out.lower()
