"""One log version folder per run: fit, its resume and an evaluation of its checkpoint share one;
a run that fails while setting up leaves none."""
from __future__ import annotations

import os

import pytest
import yaml

from flan_rlhf.log_versions import continued_version, remove_start_only_log_dir
from tests.conftest import run_command
from tests.test_cli import read_scalars, tiny_config

TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"


def test_fit_resume_validate_and_predict_of_one_run_log_into_one_version(tmp_path, monkeypatch):
    """With the checkpoints in the run's own folder (no dirpath, as configs/tiny.yaml), a fresh fit is a new run."""
    monkeypatch.chdir(tmp_path)
    config = per_run_config(tmp_path)
    for argv in (["fit", "--trainer.max_steps", "2"], ["fit", "--trainer.max_steps", "4", "--ckpt_path", "last"],
                 ["validate", "--ckpt_path", "last"], ["predict", "--ckpt_path", "last"]):
        code, out, err = run_command(argv[0], "--config", config, *argv[1:])
        assert code == 0, err[-3000:]
        assert out.splitlines()[-1 if argv[0] != "predict" else -2] == f"  logs: {tmp_path / 'logs' / 'tiny' / 'version_0'}"
    assert os.listdir(tmp_path / "logs" / "tiny") == ["version_0"]
    scalars = read_scalars(str(tmp_path / "logs" / "tiny" / "version_0"))
    assert len(scalars["env/reward_mean"]) == 4  # steps 1-2, then 3-4 after the resume, in one folder
    code, _, err = run_command("fit", "--config", config, "--trainer.max_steps", "1",
                               "--model.init_args.overwrite_export_dir", "true")  # a new run: a new version
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(tmp_path / "logs" / "tiny")) == ["version_0", "version_1"]
    assert sorted(os.listdir(tmp_path / "logs" / "tiny" / "version_1" / "checkpoints")) == ["last.ckpt"]


def per_run_config(tmp_path, **trainer) -> str:
    """``tiny_config`` with its ModelCheckpoint's ``dirpath`` removed: each run's checkpoints in its log folder."""
    path = tiny_config(tmp_path, **trainer)
    config = yaml.safe_load(open(path))
    for callback in config["trainer"]["callbacks"]:
        callback["init_args"].pop("dirpath", None)
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def test_a_fit_that_fails_while_setting_up_leaves_no_version_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    (tmp_path / "logs" / "tiny" / "version_0").mkdir(parents=True)  # an earlier run's folder, kept
    (tmp_path / "logs" / "tiny" / "version_0" / "hparams.yaml").write_text("{}\n")
    fails_in_configure_model = ["--model.init_args.policy", f"{{name_or_path: {tmp_path / 'no_model'}}}"]
    code, _, err = run_command("fit", "--config", config, *fails_in_configure_model)  # after the logger made its folder
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: cannot load model"), err[-3000:]
    assert os.listdir(tmp_path / "logs" / "tiny") == ["version_0"]
    code, _, err = run_command("fit", "--config", config, *fails_in_configure_model, "--trainer.logger.init_args.name", "new")
    assert code == 2 and sorted(os.listdir(tmp_path / "logs")) == ["tiny"]  # the name folder it made is gone too


def test_an_error_a_class_raises_while_built_is_one_line(tmp_path):
    """jsonargparse wraps it (a DataConfigError from PromptDataModule.__init__) in a ValueError: the cause is said."""
    code, _, err = run_command("fit", "--config", tiny_config(tmp_path), "--data.init_args.builtin", "null",
                               "--data.init_args.data_files", "x.jsonl")
    lines = [line for line in err.splitlines() if line.startswith(("error", "Traceback", "ValueError"))]
    assert code == 2 and lines == [lines[0]] and lines[0].startswith("error: set exactly one data source"), err[-3000:]


@pytest.mark.parametrize("init_args, stored_dir, expected", [
    ({"save_dir": "logs", "name": "tiny"}, "logs/tiny/version_3", 3),
    ({"save_dir": "logs", "name": "tiny", "version": 7}, "logs/tiny/version_3", None),  # the user's own version
    ({"save_dir": "logs", "name": "other"}, "logs/tiny/version_3", None),  # another run's folder
    ({"save_dir": "logs", "name": "tiny"}, "logs/tiny/version_9", None),  # the folder is gone
    ({"name": "tiny"}, "tiny/version_3", 3),  # save_dir defaults to the working directory
])
def test_continued_version(init_args, stored_dir, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs" / "tiny" / "version_3").mkdir(parents=True)
    (tmp_path / "tiny" / "version_3").mkdir(parents=True)
    stored = {"log_dir": str(tmp_path / stored_dir), "version": int(stored_dir.rsplit("_", 1)[1])}
    assert continued_version({"class_path": TENSORBOARD, "init_args": init_args}, stored) == expected
    assert continued_version({"class_path": "my.Logger", "init_args": init_args}, stored) is None
    assert continued_version({"class_path": TENSORBOARD, "init_args": init_args}, None) is None


def test_only_a_folder_holding_start_files_is_removed(tmp_path):
    start = tmp_path / "version_0"
    start.mkdir()
    for name in ("hparams.yaml", "events.out.tfevents.1.vm.1.0", "config.yaml"):
        (start / name).write_text("")
    kept = tmp_path / "version_1"
    kept.mkdir()
    (kept / "hparams.yaml").write_text("")
    (kept / "notes.md").write_text("mine")
    assert remove_start_only_log_dir(str(start)) and not start.exists()
    assert not remove_start_only_log_dir(str(kept)) and (kept / "notes.md").read_text() == "mine"
    assert not remove_start_only_log_dir(str(tmp_path / "absent")) and not remove_start_only_log_dir(None)
