"""A run killed at any file event of its checkpoints or its export ends, after ``--ckpt_path last``,
exactly like a run that was never interrupted (issue 23, "Must show").

How the kills are made without killing anything: one uninterrupted ``fit`` runs with every rename
that commits a file or folder under its run folder watched (``os.replace``, and the export's
folder exchange). At each such event the run folder is copied twice, which is what a process
killed at that instant leaves on disk:

* ``before``: the kill lands while the file (or the export folder) is being written - the write
  in progress is torn in half and not yet renamed into place;
* ``torn``: the kill lands just after the rename, on a filesystem that had not yet put the new
  file's data on disk - the file in place is torn in half.

Each copy is then resumed with ``flan-rlhf fit --config tiny.yaml --ckpt_path last`` (the config
holds only relative paths, so a copy is a run of its own). Every resume must exit 0 with the
export written, start from the newest complete checkpoint of its copy (never an older one), and
end with an exported adapter and value head byte-identical (sha256) to the uninterrupted run's.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

import flan_rlhf.io as io_module
from flan_rlhf.checkpointing import checkpoint_problem, read_checkpoint_file
from tests.conftest import run_command, shrunk_tiny_config
from tests.test_checkpointing import cut_in_half

STEPS = 3
EXPORTED = ("adapter_model.safetensors", "value_head.safetensors")


def write_relative_config(run_dir: Path) -> None:
    """configs/tiny.yaml shrunk: 3 iterations, a checkpoint (and last.ckpt) after each, validation at
    iteration 2, the checkpoints in ``ckpt/`` and the export in ``adapter/`` relative to the run folder."""
    config = shrunk_tiny_config(run_dir, max_new_tokens=8, max_steps=STEPS, val_check_interval=2)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = "ckpt"
    config["model"]["init_args"]["export_dir"] = "adapter"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tiny.yaml").write_text(yaml.safe_dump(config))


def tear(path: Path) -> None:
    """Cut a file in half; for a folder, cut its largest file."""
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        path = max(files, key=lambda p: p.stat().st_size)
    cut_in_half(path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newest_complete_step(ckpt_dir: Path) -> int:
    """The highest ``global_step`` among the complete checkpoints of ``ckpt_dir`` (0: none)."""
    steps = [read_checkpoint_file(str(p))["global_step"] for p in ckpt_dir.glob("*.ckpt") if checkpoint_problem(str(p)) is None]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def crashed_copies(tmp_path_factory) -> tuple[dict[str, str], list[tuple[str, Path]]]:
    """The uninterrupted run's export hashes, and ``(label, folder)`` of every "killed" copy."""
    root = tmp_path_factory.mktemp("crash")
    run_dir, copies = root / "run", []
    write_relative_config(run_dir)

    def snapshot(label: str, damaged: str) -> None:
        copy = root / label
        shutil.copytree(run_dir, copy, symlinks=True)
        tear(copy / os.path.relpath(damaged, run_dir))
        copies.append((label, copy))

    def watched(rename):
        def commit(src, dst, *args, **kwargs):
            src, dst = os.path.abspath(src), os.path.abspath(dst)
            if not dst.startswith(str(run_dir) + os.sep):
                return rename(src, dst, *args, **kwargs)
            what = os.path.relpath(dst, run_dir).replace(os.sep, "_")
            snapshot(f"{len(copies) // 2:02d}-before-{what}", src)
            result = rename(src, dst, *args, **kwargs)
            snapshot(f"{len(copies) // 2:02d}-torn-{what}", dst if os.path.exists(dst) else src)
            return result
        return commit

    monkeypatch = pytest.MonkeyPatch()
    try:
        monkeypatch.setattr(os, "replace", watched(os.replace))
        monkeypatch.setattr(io_module, "exchange_paths", watched(io_module.exchange_paths))
        monkeypatch.chdir(run_dir)
        code, out, err = run_command("fit", "--config", "tiny.yaml")
    finally:
        monkeypatch.undo()
    assert code == 0, (out + err)[-3000:]
    straight = {name: sha256(run_dir / "adapter" / name) for name in EXPORTED}
    labels = [label for label, _ in copies]
    assert sum("ckpt_last.ckpt" in label for label in labels) == 2 * STEPS, labels
    assert sum(label.endswith("-adapter") for label in labels) >= 2, labels  # the export's own commit
    return straight, copies


def test_every_crash_point_was_made(crashed_copies):
    _, copies = crashed_copies
    assert len(copies) >= 2 * (2 * STEPS + 1)  # step file + last.ckpt per iteration, then the export


def test_every_killed_run_resumes_to_the_same_export(crashed_copies, monkeypatch):
    straight, copies = crashed_copies
    failures = []
    for label, copy in copies:
        expected_step = newest_complete_step(copy / "ckpt")
        monkeypatch.chdir(copy)
        code, out, err = run_command("fit", "--config", "tiny.yaml", "--ckpt_path", "last")
        if code != 0:
            failures.append(f"{label}: exit {code}: {(out + err)[-1500:]}")
            continue
        resumed = re.findall(r"resumed from step (\d+) ", out)
        started = int(resumed[0]) if resumed else 0
        if started != expected_step or (not resumed and "starting from scratch" not in err):
            failures.append(f"{label}: resumed from step {started}, the newest complete checkpoint is at {expected_step}")
        missing = [name for name in EXPORTED if not (copy / "adapter" / name).is_file()]
        if missing:
            failures.append(f"{label}: exited 0 without {missing}")
            continue
        differ = [name for name in EXPORTED if sha256(copy / "adapter" / name) != straight[name]]
        if differ:
            failures.append(f"{label}: {differ} differ from the uninterrupted run's")
    assert not failures, "\n".join(failures)
