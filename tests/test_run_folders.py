"""Runs never mix (issue 23, point 4): one checkpoint folder per run, ``--ckpt_path last`` meaning
that run's newest complete checkpoint, no ``-vN`` files, and a lock that stops a second process.

On afd5cd1 each test here fails: ``--ckpt_path last`` with no ``dirpath`` started from scratch,
a second run in a ``dirpath`` folder wrote ``last-v1.ckpt`` beside the first's with a warning, a
resume over a torn ``last.ckpt`` wrote ``last-v1.ckpt``, and nothing stopped two live runs.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path


from flan_rlhf.checkpointing import read_checkpoint_file
from flan_rlhf.run_folders import (
    claim_fresh_version,
    foreign_checkpoint_problem,
    last_search_folders,
    version_of_checkpoint,
)
from flan_rlhf.run_lock import LOCK_NAME, RunLock, RunLockedError, lock_path_for, run_lock
from tests.conftest import run_command
from tests.test_checkpointing import cut_in_half
from tests.test_cli import tiny_config
from tests.test_log_versions import per_run_config
from tests.test_resume import start_fit, wait_until_training

TENSORBOARD = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "logs", "name": "tiny"}}


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def versioned(folder: Path) -> list[str]:
    """Files Lightning numbered ``-vN`` to dodge a name already taken."""
    return [name for name in all_files(folder) if re.search(r"-v\d+\.ckpt$", name)]


def resumed_step(out: str) -> int | None:
    found = re.findall(r"resumed from step (\d+)", out)
    return int(found[0]) if found else None


# ---------------------------------------------------------------------------------------------- pure
def test_where_last_looks_and_which_run_a_checkpoint_belongs_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run in ("version_0", "version_1", "baseline"):
        (tmp_path / "logs" / "tiny" / run / "checkpoints").mkdir(parents=True)
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {}}
    trainer = {"logger": TENSORBOARD, "callbacks": [checkpoint]}
    root = tmp_path / "logs" / "tiny"
    assert last_search_folders(trainer, None) == [str(root / r / "checkpoints") for r in ("baseline", "version_0", "version_1")]
    assert last_search_folders(trainer, "baseline") == [str(root / "baseline" / "checkpoints")]
    assert last_search_folders(trainer, 1) == [str(root / "version_1" / "checkpoints")]
    explicit = {"logger": TENSORBOARD, "callbacks": [{**checkpoint, "init_args": {"dirpath": "ck"}}]}
    assert last_search_folders(explicit, None) == ["ck"]
    assert last_search_folders({"logger": False, "callbacks": [checkpoint], "default_root_dir": "r"}, None) == ["r/checkpoints"]
    assert last_search_folders({"logger": {"class_path": "my.Logger", "init_args": {}}, "callbacks": [checkpoint]}, None) == []

    assert version_of_checkpoint(str(root / "version_1" / "checkpoints" / "last.ckpt"), TENSORBOARD) == 1
    assert version_of_checkpoint(str(root / "baseline" / "checkpoints" / "x.ckpt"), TENSORBOARD) == "baseline"
    assert version_of_checkpoint(str(tmp_path / "ck" / "last.ckpt"), TENSORBOARD) is None
    assert version_of_checkpoint(str(root / "version_1" / "last.ckpt"), TENSORBOARD) is None


def test_a_folder_is_empty_or_one_runs(tmp_path):
    import torch

    from flan_rlhf.output_dirs import RUN_ID_KEY

    folder = tmp_path / "ck"
    assert foreign_checkpoint_problem(str(folder), None) is None and foreign_checkpoint_problem(None, "a") is None
    folder.mkdir()
    torch.save({"global_step": 1, RUN_ID_KEY: "run-a"}, folder / "epoch=0-step=1.ckpt")
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 torn")  # newer, torn: skipped
    assert foreign_checkpoint_problem(str(folder), "run-a") is None, "a resume of the same run"
    expected = (f"checkpoint folder '{folder}' already holds checkpoints of another run (e.g. epoch=0-step=1.ckpt) - "
                "continue that run with --ckpt_path last, or give this run its own folder (another "
                "--trainer.logger.version, or another ModelCheckpoint dirpath)")
    assert foreign_checkpoint_problem(str(folder), "run-b") == expected, "a resume of another run"
    assert foreign_checkpoint_problem(str(folder), None) == expected, "a fresh run"
    (folder / "epoch=0-step=1.ckpt").unlink()
    assert foreign_checkpoint_problem(str(folder), None) is None, "only a torn file: nothing to mix with"


def test_two_runs_starting_together_claim_two_versions(tmp_path, monkeypatch):
    """Both list the folder before either makes its version: the second ``mkdir`` fails and moves on."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs" / "tiny" / "version_0").mkdir(parents=True)
    stale = os.listdir(tmp_path / "logs" / "tiny")
    monkeypatch.setattr(os, "listdir", lambda path: list(stale))
    first, second = claim_fresh_version(TENSORBOARD), claim_fresh_version(TENSORBOARD)
    assert (first, second) == (1, 2)


def test_a_lock_is_exclusive_and_a_dead_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "ck"
    held = run_lock(str(folder), str(tmp_path / "adapter"), "flan-rlhf fit A").acquire()
    assert (folder / LOCK_NAME).is_file() and Path(lock_path_for(str(tmp_path / "adapter"), "export")).is_file()
    try:
        try:
            run_lock(None, str(tmp_path / "adapter"), "flan-rlhf fit B").acquire()
            raise AssertionError("a second holder got the lock")
        except RunLockedError as err:
            assert str(err) == (f"export folder '{tmp_path / 'adapter'}' is being written by process {os.getpid()} on "
                                f"{socket.gethostname()} (flan-rlhf fit A) - wait for it to finish or stop it; two runs "
                                "must not share a checkpoint or export folder (give this one its own)")
    finally:
        held.release()
    assert not (folder / LOCK_NAME).exists() and not folder.exists(), "the lock and the folder it made are gone"

    folder.mkdir()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "command": "flan-rlhf fit old"}))
    with RunLock([(str(folder), "checkpoints", "checkpoint folder 'ck'")]) as lock:
        assert lock.notes == ["note: took over the lock of checkpoint folder 'ck' from process 999999 on gone "
                              "(flan-rlhf fit old), which is no longer running (it was stopped or killed)"]
    assert folder.is_dir() and not (folder / LOCK_NAME).exists()


# ---------------------------------------------------------------------------------------------- one folder per run
def test_each_run_has_its_own_checkpoint_folder_and_last_continues_the_newest_or_the_named_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = per_run_config(tmp_path)
    runs = tmp_path / "logs" / "tiny"
    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "2")
    assert code == 0, err[-3000:]
    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "2",
                                 "--model.init_args.overwrite_export_dir", "true")  # a second run
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"]
    for run in ("version_0", "version_1"):
        assert sorted(os.listdir(runs / run / "checkpoints")) == ["epoch=0-step=2.ckpt", "last.ckpt"]

    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert resumed_step(out) == 2 and f"({runs / 'version_1' / 'checkpoints' / 'last.ckpt'})" in out
    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "4", "--ckpt_path", "last",
                                 "--trainer.logger.version", "0",
                                 "--model.init_args.overwrite_export_dir", "true")  # the export is version_1's
    assert code == 0, err[-3000:]
    assert resumed_step(out) == 2 and f"({runs / 'version_0' / 'checkpoints' / 'last.ckpt'})" in out
    assert sorted(os.listdir(runs)) == ["version_0", "version_1"], "resumes continue their runs' folders"
    for run in ("version_0", "version_1"):
        assert sorted(os.listdir(runs / run / "checkpoints")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert not versioned(tmp_path)

    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "2", "--trainer.logger.version",
                                 "baseline", "--model.init_args.overwrite_export_dir", "true")  # a run with a name
    assert code == 0 and sorted(os.listdir(runs / "baseline" / "checkpoints")) == ["epoch=0-step=2.ckpt", "last.ckpt"]


def test_a_second_run_in_a_folder_holding_another_runs_checkpoints_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, max_steps=2)  # dirpath: tmp_path/ckpt, one folder the user chose
    assert run_command("fit", "--config", config)[0] == 0
    before = {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")}
    code, out, err = run_command("fit", "--config", config, "--model.init_args.overwrite_export_dir", "true")
    assert code == 2, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: checkpoint folder '{tmp_path / 'ckpt'}' already holds checkpoints of another run (e.g. last.ckpt) - "
        "continue that run with --ckpt_path last, or give this run its own folder (another "
        "--trainer.logger.version, or another ModelCheckpoint dirpath)"]
    assert {name: (tmp_path / "ckpt" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt")} == before
    assert sorted(os.listdir(tmp_path / "logs" / "tiny")) == ["version_0"], "the refused run left no log folder"


def test_a_resume_over_a_torn_last_ckpt_replaces_it_instead_of_writing_last_v1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, max_steps=2)
    assert run_command("fit", "--config", config)[0] == 0
    cut_in_half(tmp_path / "ckpt" / "last.ckpt")
    code, out, err = run_command("fit", "--config", config, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert code == 0 and resumed_step(out) == 2, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt")) == [
        "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"], all_files(tmp_path / "ckpt")
    assert read_checkpoint_file(str(tmp_path / "ckpt" / "last.ckpt"))["global_step"] == 4


# ---------------------------------------------------------------------------------------------- two runs at once
def test_a_second_process_on_the_same_run_stops_at_start_naming_the_first(tmp_path, monkeypatch):
    """A real ``fit`` process runs; the same command started meanwhile stops in one line, exit 2, and
    the first finishes untouched."""
    config = tiny_config(tmp_path, max_steps=60)  # tmp_path/tiny.yaml
    first = start_fit(tmp_path, "first", "tiny.yaml", "--ckpt_path", "last")
    try:
        wait_until_training(first, tmp_path, "first", 60)
        monkeypatch.chdir(tmp_path)
        code, out, err = run_command("fit", "--config", config, "--ckpt_path", "last")
        first_code = first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and re.fullmatch(
        rf"error: checkpoint folder '{re.escape(str(tmp_path / 'ckpt'))}' is being written by process {first.pid} on "
        rf"{re.escape(socket.gethostname())} \(flan-rlhf fit --config {re.escape(config)} --ckpt_path last\) - wait for it "
        r"to finish or stop it; two runs must not share a checkpoint or export folder \(give this one its own\)",
        errors[0]), errors
    assert first_code == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not versioned(tmp_path) and not (tmp_path / "ckpt" / LOCK_NAME).exists()


def test_a_run_sharing_a_live_runs_export_folder_stops_and_a_dead_runs_lock_is_taken_over(tmp_path, monkeypatch):
    """Another config, its own checkpoint folder, the same ``export_dir`` as a live run: stopped at
    start. A lock file a killed run left in the checkpoint folder: taken over, with a note."""
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, max_steps=1)
    with run_lock(None, str(tmp_path / "adapter"), "flan-rlhf fit --config other.yaml"):  # a live holder (this process)
        code, out, err = run_command("fit", "--config", config)
    assert code == 2 and [line for line in err.splitlines() if line.startswith("error")] == [
        f"error: export folder '{tmp_path / 'adapter'}' is being written by process {os.getpid()} on {socket.gethostname()} "
        "(flan-rlhf fit --config other.yaml) - wait for it to finish or stop it; two runs must not share a checkpoint or "
        "export folder (give this one its own)"], err[-3000:]
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "adapter").exists(), "nothing written, no folder left"
    assert not (tmp_path / "logs").exists(), "the log version it claimed is given back"

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "node-3", "command": "flan-rlhf fit"}))
    code, out, err = run_command("fit", "--config", config)
    assert code == 0, err[-3000:]
    assert f"note: took over the lock of checkpoint folder '{tmp_path / 'ckpt'}' from process 999999 on node-3 (flan-rlhf " \
           "fit), which is no longer running (it was stopped or killed)" in err.splitlines()
    assert not (tmp_path / "ckpt" / LOCK_NAME).exists() and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
