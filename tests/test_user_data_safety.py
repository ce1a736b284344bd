"""Nothing the user owns is lost, and settings come from the command line, not a checkpoint.

One test (or a parametrised group) per numbered point of the issue "Step 1". The tests drive
the real commands through ``flan_rlhf.cli.main`` in-process on ``configs/tiny.yaml`` shrunk to
one tiny iteration; only ``test_5_a_module_...`` calls the module's checkpoint hook directly.
The file runs unchanged against an older commit, where every one of these tests failed.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import yaml

from flan_rlhf.rewards.base import Reward
from tests.conftest import error_lines, run_command as run, shrunk_tiny_config


# ------------------------------------------------------------------ helpers
def tiny_config(folder: Path, **model_updates) -> Path:
    """A one-iteration ``configs/tiny.yaml`` with its checkpoints in ``folder/ckpt`` and its export
    in ``folder/adapter``; written to ``folder/run.yaml``."""
    config = shrunk_tiny_config(folder, max_new_tokens=4, max_steps=1, limit_val_batches=0)
    config["model"]["init_args"].update(model_updates)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    """A finished one-iteration run: ``ckpt/last.ckpt`` and its export ``adapter/``."""
    folder = tmp_path_factory.mktemp("earlier_run")
    code, _, err = run("fit", "--config", str(tiny_config(folder)))
    assert code == 0, err[-3000:]
    assert (folder / "ckpt" / "last.ckpt").is_file() and (folder / "adapter" / "adapter_config.json").is_file()
    return folder


def copy_of(earlier_run: Path, tmp_path: Path) -> Path:
    """A private copy of the earlier run's checkpoints under ``tmp_path/run`` (with its own config)."""
    folder = tmp_path / "run"
    shutil.copytree(earlier_run / "ckpt", folder / "ckpt")
    tiny_config(folder)
    return folder


# ------------------------------------------------------------------ 1. fit and a non-empty export_dir
def test_1_fit_refuses_a_non_empty_export_dir_before_training(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "eval.txt").write_text("x")
    config = tiny_config(tmp_path, export_dir=str(results))

    code, _, err = run("fit", "--config", str(config))

    assert code == 2, err[-3000:]
    assert len(error_lines(err)) == 1 and "overwrite_export_dir" in error_lines(err)[0] and "eval.txt" in error_lines(err)[0]
    assert snapshot(results) == {"eval.txt": b"x"}
    assert not (tmp_path / "ckpt").exists(), "refused before any training step (no checkpoint written)"


def test_1_an_earlier_export_is_replaced_only_with_the_opt_in_flag(earlier_run, tmp_path):
    exported = tmp_path / "adapter"
    shutil.copytree(earlier_run / "adapter", exported)
    before = snapshot(exported)
    config = tiny_config(tmp_path)

    code, _, err = run("fit", "--config", str(config))
    assert code == 2 and "--model.init_args.overwrite_export_dir true" in error_lines(err)[0]
    assert snapshot(exported) == before

    code, _, err = run("fit", "--config", str(config), "--model.init_args.overwrite_export_dir", "true")
    assert code == 0, err[-3000:]
    assert snapshot(exported) != before and (exported / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------ 2. export --overwrite and its own input
@pytest.mark.parametrize("out", ["run", "run/ckpt"])
def test_2_export_overwrite_never_removes_its_input_or_a_checkpoint_folder(earlier_run, tmp_path, out):
    folder = copy_of(earlier_run, tmp_path)
    before = snapshot(folder)

    code, _, err = run("export", "--ckpt_path", str(folder / "ckpt" / "last.ckpt"), "--out", str(tmp_path / out), "--overwrite", "true")

    assert code == 2 and len(error_lines(err)) == 1 and "holds the input" in error_lines(err)[0], err[-2000:]
    assert snapshot(folder) == before


def test_2_export_overwrite_never_removes_a_folder_of_other_checkpoints(earlier_run, tmp_path):
    other = tmp_path / "other_run"
    other.mkdir()
    shutil.copy(earlier_run / "ckpt" / "last.ckpt", other / "step=5.ckpt")

    code, _, err = run("export", "--ckpt_path", str(earlier_run / "ckpt" / "last.ckpt"), "--out", str(other), "--overwrite", "true")

    assert code == 2 and len(error_lines(err)) == 1 and "step=5.ckpt" in error_lines(err)[0]
    assert (other / "step=5.ckpt").read_bytes() == (earlier_run / "ckpt" / "last.ckpt").read_bytes()


# ------------------------------------------------------------------ 3. the user's config.yaml
def test_3_fit_never_writes_over_the_users_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(tiny_config(tmp_path / "run").read_text())
    text = "# my run, my comments\n" + yaml.safe_dump(config)
    Path("config.yaml").write_text(text)

    code, _, err = run("fit", "--config", "config.yaml")

    assert code == 0, err[-3000:]
    assert Path("config.yaml").read_text() == text
    resolved = tmp_path / "run" / "ckpt" / "config.yaml"  # no logger: the run's checkpoint folder
    assert resolved.is_file() and yaml.safe_load(resolved.read_text())["model"]["init_args"]["export_dir"] == config["model"]["init_args"]["export_dir"]
    code, _, err = run("fit", "--config", "config.yaml", "--ckpt_path", "last", "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "ckpt" / "config-2.yaml").is_file()  # a second run never replaces the first's copy
    assert resolved.read_bytes() != b"" and Path("config.yaml").read_text() == text


# ------------------------------------------------------------------ 4. the command line wins over a checkpoint
@pytest.mark.parametrize("ckpt_path", ["file", "last"])
def test_4_resume_takes_settings_from_the_command_line_not_the_checkpoint(earlier_run, tmp_path, ckpt_path):
    folder = copy_of(earlier_run, tmp_path)  # its checkpoint stores export_dir = the earlier run's adapter/
    earlier_export = snapshot(earlier_run / "adapter")
    mine = tmp_path / "mine"

    code, _, err = run("fit", "--config", str(folder / "run.yaml"), "--trainer.max_steps", "2",
                       "--ckpt_path", str(folder / "ckpt" / "last.ckpt") if ckpt_path == "file" else "last",
                       "--model.init_args.export_dir", str(mine), "--model.init_args.ppo.learning_rate", "0.002")

    assert code == 0, err[-3000:]
    assert (mine / "adapter_model.safetensors").is_file(), "the export went where the command line said"
    assert snapshot(earlier_run / "adapter") == earlier_export, "the checkpoint's export_dir was not touched"
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert any(line.startswith("note: export_dir is ") and str(mine) in line for line in notes), err[-2000:]
    assert any(line.startswith("note: ppo.learning_rate is 0.002") for line in notes), err[-2000:]
    newest = max((folder / "ckpt").glob("*.ckpt"), key=lambda p: torch.load(p, weights_only=False, map_location="cpu")["global_step"])
    stored = torch.load(newest, weights_only=False, map_location="cpu")
    assert stored["global_step"] == 2 and stored["hyper_parameters"]["ppo"]["learning_rate"] == 0.002


# ------------------------------------------------------------------ 5. settings the weights depend on
@pytest.mark.parametrize("flag, value, field", [
    ("--model.init_args.lora.r", "4", "lora.r is 8 in the checkpoint but 4"),
    ("--model.init_args.lora.target_modules", "[q,k,v]", "lora.target_modules is ['q', 'v'] in the checkpoint but ['q', 'k', 'v']"),
    ("--model.init_args.policy.t5_config.d_model", "128", "policy.t5_config.d_model is 64 in the checkpoint but 128"),
])
def test_5_resuming_with_another_architecture_is_one_line(earlier_run, tmp_path, flag, value, field):
    folder = copy_of(earlier_run, tmp_path)
    before = snapshot(folder)

    code, _, err = run("fit", "--config", str(folder / "run.yaml"), "--trainer.max_steps", "2", "--ckpt_path", "last",
                       flag, value)

    assert code == 2 and len(error_lines(err)) == 1, err[-3000:]
    assert field in error_lines(err)[0] and "Traceback" not in err
    assert snapshot(folder) == before


def test_5_a_module_loading_a_checkpoint_of_another_rank_says_so(tmp_path):
    """Plain ``Trainer.fit(ckpt_path=...)`` (no CLI settings check): the module's own check."""
    from flan_rlhf.checkpointing import CheckpointError
    from flan_rlhf.module import PPOModule
    from flan_rlhf.policy import LoraSettings
    from tests.conftest import TokenFractionReward, tiny_policy_spec

    saved = PPOModule(policy=tiny_policy_spec(), reward=TokenFractionReward(), lora=LoraSettings(r=8))
    saved.configure_model()
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    other = PPOModule(policy=tiny_policy_spec(), reward=TokenFractionReward(), lora=LoraSettings(r=4))
    with pytest.raises(CheckpointError, match=r"shape \((8, 64|64, 8)\) in the checkpoint but \((4, 64|64, 4)\)"):
        other.on_load_checkpoint(checkpoint)


# ------------------------------------------------------------------ 6. score / generate on bad files
def test_6_score_on_a_missing_or_binary_file_is_one_line_naming_it(tmp_path):
    binary = tmp_path / "texts.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    for source in (tmp_path / "missing.csv", binary):
        code, _, err = run("score", "--reward", "ProfanityReward", "--input", str(source), "--output", str(tmp_path / "o.jsonl"))
        assert code == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
        assert err.startswith("error: ") and str(source) in err
    assert not (tmp_path / "o.jsonl").exists()


def test_6_generate_on_a_binary_file_names_the_file(tmp_path):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\xe3\x00\xff" * 50)
    code, _, err = run("generate", "--model", str(tmp_path / "any_model"), "--input", str(binary), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and len(error_lines(err)) == 1 and str(binary) in error_lines(err)[0], err[-2000:]


# ------------------------------------------------------------------ 7. non-finite scores
class NaNOnSecondText(Reward):
    """Scores 0.5, except NaN for the second text of every call."""

    name = "flaky"

    def components(self, prompts, responses):
        scores = torch.full((len(responses),), 0.5)
        if len(responses) > 1:
            scores[1] = float("nan")
        return {self.name: scores}


def test_7_nan_scores_are_counted_and_fail_unless_accepted(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"response": t}) + "\n" for t in ["one", "two", "three"]))
    output = tmp_path / "scored.jsonl"
    reward = f"{__name__}.NaNOnSecondText"

    code, out, err = run("score", "--reward", reward, "--input", str(source), "--output", str(output))

    assert code == 2, err[-2000:]
    assert "1 not finite" in out.strip().splitlines()[-2] and out.strip().splitlines()[-1] == f"  rows: 3 in {output}"
    assert len(error_lines(err)) == 1 and "--allow_nonfinite true" in error_lines(err)[0] and "rows 1" in error_lines(err)[0]
    assert [json.loads(line)["reward"] for line in output.read_text().splitlines()] == [0.5, None, 0.5]

    code, out, err = run("score", "--reward", reward, "--input", str(source), "--output", str(output), "--overwrite", "true",
                         "--allow_nonfinite", "true")
    assert code == 0 and "1 not finite" in out, err[-2000:]


# ------------------------------------------------------------------ 8. Detoxify offline
def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


@pytest.mark.parametrize("command", ["score", "fit"])
def test_8_detoxify_offline_is_one_line(tmp_path, monkeypatch, command):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached checkpoint
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)  # no network, here or anywhere
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"response": "hello"}) + "\n")
    if command == "score":
        argv = ["score", "--reward", "DetoxifyReward", "--input", str(source), "--output", str(tmp_path / "o.jsonl")]
    else:
        argv = ["fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.reward", "DetoxifyReward"]

    code, out, err = run(*argv)

    assert code == 2, err[-3000:]
    assert len(error_lines(err)) == 1 and "Detoxify 'original'" in error_lines(err)[0] and "Traceback" not in err
    if command == "score":
        assert err.strip() == error_lines(err)[0]
    assert "Downloading" not in out
