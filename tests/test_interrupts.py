"""Preemption and crashes (issue 23, points 1-3): a signal, a kill before the export, a full disk.

* SIGTERM / SIGINT in the middle of an iteration: the iteration finishes, its checkpoint is
  written, one line says where and how to continue, the exit code is 143 / 130, no export.
* A signal before training or during the end of fit: one line, 143, nothing half-written.
* A run killed after its last checkpoint and before its export is finished by ``--ckpt_path last``.
* A disk that fills up during a checkpoint save: one line naming the newest intact checkpoint, exit 2.
"""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flan_rlhf.checkpointing import checkpoint_problem, newest_complete_checkpoint, read_checkpoint_file
from flan_rlhf.interrupts import exit_code_of, resume_command, signal_name
from tests.conftest import run_command, shrunk_tiny_config
from tests.test_resume import fit_env, start_fit, wait_until_training

STEPS = 4


def write_config(run_dir: Path, *callbacks: dict, max_steps: int = STEPS) -> Path:
    """``configs/tiny.yaml`` shrunk (``shrunk_tiny_config``: checkpoint every iteration in ``run_dir/ckpt``,
    adapter in ``run_dir/adapter``) plus ``callbacks`` (``{"class_path", "init_args"}``)."""
    config = shrunk_tiny_config(run_dir, max_new_tokens=8, max_steps=max_steps, val_check_interval=2)
    config["trainer"]["callbacks"] += list(callbacks)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def signal_at(step: int, signum: int, hook: str = "on_train_batch_start", times: int = 1) -> dict:
    return {"class_path": "tests.resume_helpers.SignalAt",
            "init_args": {"step": step, "signum": int(signum), "hook": hook, "times": times}}


def fit(run_dir: Path, monkeypatch, *extra: str) -> tuple[int, str, str]:
    monkeypatch.chdir(run_dir)
    return run_command("fit", "--config", str(run_dir / "tiny.yaml"), *extra)


def steps_on_disk(ckpt_dir: Path) -> list[int]:
    return sorted(read_checkpoint_file(str(p))["global_step"] for p in ckpt_dir.glob("*.ckpt"))


# ---------------------------------------------------------------------------------------------- pure
def test_exit_codes_and_names_follow_the_shell():
    assert exit_code_of(signal.SIGTERM) == 143 and exit_code_of(signal.SIGINT) == 130
    assert signal_name(signal.SIGTERM) == "SIGTERM" and signal_name(999) == "signal 999"


@pytest.mark.parametrize("command, expected", [
    ("flan-rlhf fit --config c.yaml", "flan-rlhf fit --config c.yaml --ckpt_path last"),
    ("flan-rlhf fit --config c.yaml --ckpt_path a.ckpt --seed 1", "flan-rlhf fit --config c.yaml --seed 1 --ckpt_path last"),
    ("flan-rlhf fit --ckpt_path=a.ckpt --config 'my dir/c.yaml'", "flan-rlhf fit --config 'my dir/c.yaml' --ckpt_path last"),
])
def test_resume_command_replaces_any_ckpt_path_with_last(command, expected):
    assert resume_command(command) == expected


# ---------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_iteration_checkpoints_that_iteration_and_exits_128_plus_signal(tmp_path, monkeypatch, signum):
    """On main: SIGTERM exits 0 (Lightning's SIGTERMException is a SystemExit(0)) and SIGINT 1, neither
    writes the iteration's checkpoint on purpose nor says how to continue."""
    write_config(tmp_path, signal_at(1, signum))  # lands during iteration 2
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == exit_code_of(signum), (out + err)[-3000:]
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert checkpoint_problem(str(ckpt)) is None and read_checkpoint_file(str(ckpt))["global_step"] == 2
    assert steps_on_disk(tmp_path / "ckpt")[-1] == 2, "no iteration after the signal's"
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert lines == [f"stopped by {signal_name(signum)} after iteration 2 of {STEPS}, checkpointed in {ckpt} - continue "
                     f"with: flan-rlhf fit --config {tmp_path / 'tiny.yaml'} --ckpt_path last"], err[-3000:]
    assert "Traceback" not in err
    assert not (tmp_path / "adapter").exists(), "a stopped run writes no export"

    code, out, err = fit(tmp_path, monkeypatch, "--ckpt_path", "last")  # the line's command finishes the run
    assert code == 0, (out + err)[-3000:]
    assert f"resumed from step 2 ({ckpt})" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_signal_in_a_run_without_checkpoints_writes_none_and_says_so(tmp_path, monkeypatch):
    path = write_config(tmp_path, signal_at(1, signal.SIGTERM))
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    config["trainer"]["enable_checkpointing"] = False
    path.write_text(yaml.safe_dump(config))
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == 143, (out + err)[-3000:]
    assert [line for line in err.splitlines() if "stopped by" in line] == [
        f"stopped by SIGTERM after iteration 2 of {STEPS}; this run writes no checkpoints (enable_checkpointing: false), "
        "so running it again starts over"]
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "adapter").exists()


def test_a_second_signal_stops_at_once_without_a_new_checkpoint(tmp_path, monkeypatch):
    write_config(tmp_path, signal_at(1, signal.SIGINT, times=2))
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == 130, (out + err)[-3000:]
    assert steps_on_disk(tmp_path / "ckpt") == [1, 1], "step 1 and last.ckpt; iteration 2 was cut short"
    assert [line for line in err.splitlines() if "stopped by" in line] == [
        "stopped by a second SIGINT in the middle of an iteration; the newest complete checkpoint is as it was - "
        "continue from it with --ckpt_path last"]
    assert not list((tmp_path / "ckpt").glob("*.tmp-*"))


def test_a_signal_while_setting_up_is_one_line_and_143(tmp_path):
    """In a subprocess: on main SIGTERM before Lightning installs its handler kills the process
    with no word (and would kill pytest in-process)."""
    write_config(tmp_path, signal_at(0, signal.SIGTERM, hook="setup"))
    result = run_fit_subprocess(tmp_path, timeout=300)
    assert result.returncode == 143, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if "stopped by" in line] == [
        "stopped by SIGTERM; no file was left half-written (writes are atomic) - run the command again to redo it"]
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())


def test_a_signal_after_the_last_iteration_stops_before_the_export_and_resume_finishes(tmp_path, monkeypatch):
    write_config(tmp_path, signal_at(0, signal.SIGTERM, hook="on_train_end"), max_steps=2)
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == 143, (out + err)[-3000:]
    resume = f"flan-rlhf fit --config {tmp_path / 'tiny.yaml'} --ckpt_path last"
    assert [line for line in err.splitlines() if "stopped by" in line] == [
        f"stopped by SIGTERM while finishing the run after its last iteration; no file was left half-written (writes "
        f"are atomic) - continue with: {resume} (it writes the end-of-fit files)"]
    assert not (tmp_path / "adapter").exists()
    code, out, err = fit(tmp_path, monkeypatch, "--ckpt_path", "last")
    assert code == 0 and (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), (out + err)[-3000:]


def run_fit_subprocess(run_dir: Path, timeout: float, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flan_rlhf.cli", "fit", "--config", str(run_dir / "tiny.yaml"), *extra],
                          cwd=run_dir, env=fit_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(600)
def test_sigterm_from_outside_a_real_fit_process(tmp_path):
    """What a scheduler does: SIGTERM to a running ``fit`` from another process, at a moment the
    test does not choose precisely (once the run reports progress)."""
    write_config(tmp_path, max_steps=200)
    process = start_fit(tmp_path, "fit")
    try:
        wait_until_training(process, tmp_path, "fit", 200)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    err = (tmp_path / "fit.err").read_text()
    assert code == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM after iteration ")]
    assert len(lines) == 1, err[-3000:]
    step = int(re.match(r"stopped by SIGTERM after iteration (\d+) of 200", lines[0]).group(1))
    newest, _ = newest_complete_checkpoint(str(tmp_path / "ckpt"))
    assert read_checkpoint_file(newest)["global_step"] == step and step < 200
    assert not (tmp_path / "adapter").exists()


# ---------------------------------------------------------------------------------------------- kill before the export
def test_resuming_a_run_killed_between_its_last_checkpoint_and_its_export_writes_the_export(tmp_path, monkeypatch):
    """On main: ``--ckpt_path last`` printed "max_steps reached", exited 0 and never wrote the adapter."""
    write_config(tmp_path, {"class_path": "tests.resume_helpers.CrashBeforeExport"}, max_steps=2)
    with pytest.raises(Exception, match="before the export"):
        fit(tmp_path, monkeypatch)
    assert steps_on_disk(tmp_path / "ckpt") == [1, 2, 2] and not (tmp_path / "adapter").exists()

    write_config(tmp_path, max_steps=2)  # the same run without the crash
    code, out, err = fit(tmp_path, monkeypatch, "--ckpt_path", "last")
    assert code == 0, (out + err)[-3000:]
    assert re.search(r"resumed from step 2 \(.+\.ckpt\): training was already complete, writing the end-of-fit files", out), out
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "value_head.safetensors").is_file()
    assert (adapter / "README.md").is_file(), "the model card too"
    assert "fit: 2/2 steps in " in out and f"  export: {adapter}" in out, "and the closing lines"
    assert steps_on_disk(tmp_path / "ckpt") == [1, 2, 2], "no iteration was trained again"


# ---------------------------------------------------------------------------------------------- full disk
def test_disk_full_during_a_checkpoint_save_is_one_line_naming_the_newest_intact_checkpoint(tmp_path, monkeypatch):
    """The third checkpoint write (step 2's ``last.ckpt``... whichever comes third) runs out of space
    halfway. On main: a 71-line traceback."""
    write_config(tmp_path)
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == 2, (out + err)[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    newest, rejected = newest_complete_checkpoint(str(tmp_path / "ckpt"))
    assert newest is not None and not rejected
    assert re.fullmatch(rf"error: no space left on device while writing checkpoint \S+\.ckpt \(nothing was half-written; "
                        rf"the newest intact checkpoint is {re.escape(newest)}\) - free space, then continue with: "
                        rf"flan-rlhf fit --config {re.escape(str(tmp_path / 'tiny.yaml'))} --ckpt_path last", errors[0]), errors
    assert not list((tmp_path / "ckpt").glob("*.tmp-*")), "the torn write was removed"
    assert all(checkpoint_problem(str(p)) is None for p in (tmp_path / "ckpt").glob("*.ckpt")), "earlier ones intact"


def test_disk_full_anywhere_else_is_one_line_too(tmp_path, monkeypatch):
    """A full disk while writing the export (safetensors raises its own error type, wrapping the OSError)."""
    write_config(tmp_path, max_steps=1)
    import flan_rlhf.policy as policy

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "adapter_model.safetensors")

    monkeypatch.setattr(policy, "save_adapter", full)
    code, out, err = fit(tmp_path, monkeypatch)
    assert code == 2, (out + err)[-3000:]
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        "error: no space left on device while writing adapter_model.safetensors; no file was left half-written and "
        "nothing already on disk changed (writes are atomic) - free space (or raise the quota) and run the command again"]
    assert not (tmp_path / "adapter").exists() and not list(tmp_path.glob(".adapter.tmp-*"))
