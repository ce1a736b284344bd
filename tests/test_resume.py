"""A tiny ``fit`` killed with SIGKILL and resumed with ``--ckpt_path last`` ends with the same
weights as a run that was never interrupted (issue 7, "Resume"), even when the newest
checkpoints were cut short.

Both runs are real ``python -m flan_rlhf.cli fit`` subprocesses on one CPU thread each. The
uninterrupted run and the run that gets killed start together (two cores); the resume starts
as soon as the kill is done.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flan_rlhf.checkpointing import newest_complete_checkpoint, read_checkpoint_file
from tests.conftest import shrunk_tiny_config

MAX_STEPS = 6
KILL_AFTER_STEP = 3
RUN_TIMEOUT_S = 300


def resume_config(run_dir: Path) -> Path:
    """``configs/tiny.yaml`` shrunk (batch 8, 8 new tokens, 6 iterations), a checkpoint every
    iteration, validation every 3 iterations, and every output under ``run_dir``."""
    config = shrunk_tiny_config(run_dir, max_new_tokens=8, max_steps=MAX_STEPS, val_check_interval=3)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    """``python -m flan_rlhf.cli fit --config run_dir/tiny.yaml ...`` on one thread, output to files."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    tag = "resume" if extra else "first"
    return subprocess.Popen(
        [sys.executable, "-m", "flan_rlhf.cli", "fit", "--config", str(run_dir / "tiny.yaml"), *extra],
        cwd=run_dir, env=env,
        stdout=open(run_dir / f"{tag}.out", "w"), stderr=open(run_dir / f"{tag}.err", "w"),
    )


def finish(process: subprocess.Popen, run_dir: Path, tag: str) -> str:
    """Wait for ``process``; return its stdout, failing the test with its output if it failed."""
    code = process.wait(timeout=RUN_TIMEOUT_S)
    stdout, stderr = (run_dir / f"{tag}.out").read_text(), (run_dir / f"{tag}.err").read_text()
    assert code == 0, f"fit exited with {code}:\n{(stdout + stderr)[-4000:]}"
    return stdout


def kill_after_checkpoint(process: subprocess.Popen, checkpoint: Path) -> None:
    """SIGKILL ``process`` as soon as ``checkpoint`` exists (it appears whole: atomic rename)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not checkpoint.exists():
        assert process.poll() is None, f"fit ended (code {process.returncode}) before writing {checkpoint.name}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {RUN_TIMEOUT_S} s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def read(path: Path) -> dict:
    """The checkpoint at ``path``, loaded the safe way (``weights_only``; numpy arrays allowed)."""
    return read_checkpoint_file(str(path))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.numel())


def optimizer_tensors(checkpoint: dict) -> dict[str, torch.Tensor]:
    """AdamW moments of every parameter, keyed ``param/moment``."""
    state = checkpoint["optimizer_states"][0]["state"]
    return {f"{p}/{k}": v for p, moments in state.items() for k, v in moments.items() if torch.is_tensor(v)}


def cut_in_half(path: Path) -> None:
    """What a non-atomic save killed midway would leave."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.timeout(900)
def test_sigkill_mid_run_then_resume_last_matches_uninterrupted_run(tmp_path):
    """Kill after iteration 3's checkpoint; cut the newest checkpoints in half and leave a partial
    write behind (a kill during a save, had writes not been atomic); ``--ckpt_path last`` must
    report them, resume from the newest complete one, and end bit-for-bit like the straight run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    resume_config(straight), resume_config(killed)
    ckpt_dir = killed / "ckpt"
    uninterrupted = start_fit(straight)
    victim = start_fit(killed)
    try:
        kill_after_checkpoint(victim, ckpt_dir / f"epoch=0-step={KILL_AFTER_STEP}.ckpt")
        assert victim.returncode == -signal.SIGKILL
        assert not (killed / "adapter").exists(), "the killed run must not have finished"
        newest, rejected = newest_complete_checkpoint(str(ckpt_dir))
        assert newest is not None and not rejected, rejected
        newest_step = read(Path(newest))["global_step"]
        assert KILL_AFTER_STEP <= newest_step < MAX_STEPS, "the kill must land mid-run"

        corrupt = [ckpt_dir / "last.ckpt", ckpt_dir / f"epoch=0-step={newest_step}.ckpt"]
        for path in corrupt:
            cut_in_half(path)
        leftover = ckpt_dir / f"epoch=0-step={newest_step + 1}.ckpt.tmp-99999"
        leftover.write_bytes(b"PK\x03\x04 half-written")
        fallback = ckpt_dir / f"epoch=0-step={newest_step - 1}.ckpt"

        resume = start_fit(killed, "--ckpt_path", "last")
        resumed_output = finish(resume, killed, "resume")
        finish(uninterrupted, straight, "first")
    finally:
        for process in (uninterrupted, victim):
            if process.poll() is None:
                process.kill()

    said = re.findall(r"resumed from step (\d+) \((.+?)\)", resumed_output)
    assert said == [(str(newest_step - 1), str(fallback))], resumed_output[-2000:]
    reported = (killed / "resume.err").read_text().splitlines()
    for path in corrupt:
        line = f"checkpoint {path} is incomplete or corrupt (file is truncated or not a torch checkpoint); trying the previous one"
        assert reported.count(line) == 1, reported[:20]
    assert reported.count(f"ignoring {leftover} (an interrupted write; safe to delete)") == 1

    # The exported adapter and value head (safetensors) agree to 1e-6 ...
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        difference = max_abs_difference(load_file(straight / "adapter" / name), load_file(killed / "adapter" / name))
        assert difference <= 1e-6, f"{name}: max abs difference {difference}"
    # ... and so do the final checkpoints: weights, Adam moments, scheduler, KL controller.
    a, b = read(straight / "ckpt" / "last.ckpt"), read(ckpt_dir / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert max_abs_difference(a["state_dict"], b["state_dict"]) <= 1e-6
    assert max_abs_difference(optimizer_tensors(a), optimizer_tensors(b)) <= 1e-6
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == MAX_STEPS
    assert a["flan_rlhf"]["kl_controller"] == b["flan_rlhf"]["kl_controller"]
    assert a["flan_rlhf"]["shaper"] == b["flan_rlhf"]["shaper"]
    # A run that trained at all: the adapter moved away from its initialisation (lora_B starts at 0).
    lora_b = [v for k, v in load_file(killed / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0
