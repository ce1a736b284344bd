"""Output folders and resume settings, as pure functions: which folders may be replaced, how a
folder is written, and how a checkpoint's stored settings compare with the run's."""
from __future__ import annotations

import json
import os

import pytest
import torch

from flan_rlhf.checkpointing import state_dict_mismatch
from flan_rlhf.output_dirs import (
    MANIFEST,
    OutputDirError,
    atomic_output_dir,
    folder_files,
    replacement_problem,
)
from flan_rlhf.resume_settings import Difference, is_fixed, setting_differences, split_differences

CHECK = {"opt_in": "--overwrite", "what": "--out 'x'"}


def write_export(folder, files: dict[str, str], run_id: str = "run-a") -> None:
    with atomic_output_dir(folder, {"format": "test", "written_by": "test", "run_id": run_id}, overwrite=True, **CHECK) as tmp:
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)) or tmp, exist_ok=True)
            with open(os.path.join(tmp, name), "w") as handle:
                handle.write(text)


# ------------------------------------------------------------------ replacement_problem
def test_missing_or_empty_folder_is_free(tmp_path):
    assert replacement_problem(tmp_path / "new", overwrite=False, **CHECK) is None
    (tmp_path / "empty").mkdir()
    assert replacement_problem(tmp_path / "empty", overwrite=False, **CHECK) is None


def test_a_users_folder_is_never_replaced_even_with_overwrite(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "eval.txt").write_text("x")
    for overwrite in (False, True):
        problem = replacement_problem(tmp_path / "results", overwrite=overwrite, **CHECK)
        assert problem is not None and "eval.txt" in problem and "did not write" in problem


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file" in replacement_problem(tmp_path / "f", overwrite=True, **CHECK)


def test_earlier_export_needs_opt_in_unless_the_same_run_wrote_it(tmp_path):
    write_export(tmp_path / "out", {"a.bin": "1", "sub/b.json": "2"}, run_id="run-a")
    assert "pass --overwrite" in replacement_problem(tmp_path / "out", overwrite=False, **CHECK)
    assert "pass --overwrite" in replacement_problem(tmp_path / "out", overwrite=False, run_id="run-b", **CHECK)
    assert replacement_problem(tmp_path / "out", overwrite=False, run_id="run-a", **CHECK) is None
    assert replacement_problem(tmp_path / "out", overwrite=True, **CHECK) is None


def test_an_export_with_a_foreign_file_is_refused_even_for_the_same_run(tmp_path):
    write_export(tmp_path / "out", {"a.bin": "1"}, run_id="run-a")
    (tmp_path / "out" / "notes.md").write_text("mine")
    problem = replacement_problem(tmp_path / "out", overwrite=True, run_id="run-a", **CHECK)
    assert problem is not None and "notes.md" in problem


def test_a_folder_holding_an_input_is_refused(tmp_path):
    write_export(tmp_path / "out", {"a.bin": "1"})
    ckpt = tmp_path / "out" / "a.bin"
    problem = replacement_problem(tmp_path / "out", overwrite=True, inputs=[None, str(ckpt)], **CHECK)
    assert problem is not None and "holds the input" in problem
    problem = replacement_problem(tmp_path, overwrite=True, inputs=[str(ckpt)], **CHECK)  # an ancestor too
    assert problem is not None and "holds the input" in problem


# ------------------------------------------------------------------ atomic_output_dir
def test_atomic_write_lists_its_files_and_replaces_only_what_it_wrote(tmp_path):
    write_export(tmp_path / "out", {"a.bin": "1", "sub/b.json": "2"})
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["files"] == ["a.bin", "sub/b.json"] and manifest["run_id"] == "run-a" and manifest["format"] == "test"
    write_export(tmp_path / "out", {"c.bin": "3"})
    assert folder_files(tmp_path / "out") == ["c.bin", MANIFEST]
    assert os.listdir(tmp_path) == ["out"]  # no temporary or .old folder left behind


def test_a_failed_write_leaves_the_old_folder_and_no_leftovers(tmp_path):
    write_export(tmp_path / "out", {"a.bin": "1"})
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out", {}, overwrite=True, **CHECK) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").close()
            raise RuntimeError("disk full")
    assert folder_files(tmp_path / "out") == ["a.bin", MANIFEST]
    assert os.listdir(tmp_path) == ["out"]


def test_a_user_file_that_appears_during_the_write_is_not_lost(tmp_path):
    with pytest.raises(OutputDirError, match="did not write"):
        with atomic_output_dir(tmp_path / "out", {}, overwrite=True, **CHECK) as tmp:
            open(os.path.join(tmp, "a.bin"), "w").close()
            (tmp_path / "out").mkdir()
            (tmp_path / "out" / "theirs.txt").write_text("x")  # another run, or the user, got there first
    assert folder_files(tmp_path / "out") == ["theirs.txt"]


# ------------------------------------------------------------------ resume settings
def test_setting_differences_by_hand():
    stored = {"_class_path": "m.PPO", "lora": {"r": 8, "alpha": 16}, "lr": 1e-3, "export_dir": "a", "old": 1,
              "_instantiator": "x", "policy": {"t5_config": None}}
    given = {"_class_path": "m.PPO", "lora": {"r": 4, "alpha": 16}, "lr": 2e-3, "export_dir": "a", "new": 2,
             "_instantiator": "y", "policy": {"t5_config": {"d_model": 8}}}
    assert setting_differences(stored, given) == [
        Difference("lora.r", 8, 4), Difference("lr", 1e-3, 2e-3), Difference("policy.t5_config", None, {"d_model": 8}),
    ]


def test_fixed_settings_cover_their_children_and_their_group():
    fixed = ("policy.t5_config", "lora.r")
    assert is_fixed("lora.r", fixed) and is_fixed("policy.t5_config.d_model", fixed)
    assert is_fixed("lora", fixed)  # LoRA turned on or off
    assert is_fixed("_class_path", fixed)  # always: another module's checkpoint
    assert not is_fixed("lora.dropout", fixed) and not is_fixed("policy.name_or_path", fixed)
    assert not is_fixed("lora_extra", fixed)


def test_split_differences_separates_conflicts_from_harmless_ones():
    stored = {"lora": {"r": 8, "dropout": 0.0}, "export_dir": "theirs"}
    given = {"lora": {"r": 4, "dropout": 0.1}, "export_dir": "mine"}
    conflicts, harmless = split_differences(stored, given, ("lora.r",))
    assert conflicts == [Difference("lora.r", 8, 4)]
    assert harmless == [Difference("export_dir", "theirs", "mine"), Difference("lora.dropout", 0.0, 0.1)]
    conflicts, _ = split_differences({"lora": {"r": 8}}, {"lora": None}, ("lora.r",))
    assert conflicts == [Difference("lora", {"r": 8}, None)]


def test_state_dict_mismatch_names_shapes_and_keys():
    own = {"a": torch.zeros(4, 8), "b": torch.zeros(2)}
    assert state_dict_mismatch({"a": torch.ones(4, 8), "b": torch.ones(2)}, own) is None
    assert state_dict_mismatch({"a": torch.ones(4, 8)}, own, required={"a"}) is None
    shape = state_dict_mismatch({"a": torch.ones(2, 8), "b": torch.ones(2)}, own)
    assert shape == "'a' has shape (2, 8) in the checkpoint but (4, 8) in this model"
    keys = state_dict_mismatch({"a": torch.ones(4, 8), "k_lora": torch.ones(1)}, own)
    assert "1 checkpoint tensors have no place" in keys and "'k_lora'" in keys and "1 of its trained" in keys
