"""Atomic writes, complete-checkpoint detection, ``--ckpt_path`` resolution, safe loads and
RNG states that survive ``torch.load(weights_only=True)`` (issue 7, "Resume" and "Security")."""
from __future__ import annotations

import datetime
import os
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flan_rlhf.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    capture_rng_states,
    checkpoint_problem,
    newest_complete_checkpoint,
    resolve_ckpt_path,
    restore_rng_states,
)


def save(path: Path, step: int, mtime: float | None = None) -> Path:
    """A small complete checkpoint holding ``step``, with modification time ``mtime``."""
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((64,), float(step))}}, path)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------ atomic writes
def test_save_leaves_no_temporary_file_and_loads_back(tmp_path):
    path = save(tmp_path / "a.ckpt", step=7)
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.full((64,), 7.0))


def test_a_save_that_dies_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save(tmp_path / "last.ckpt", step=1)
    before = path.read_bytes()

    def dies_after_half(obj, handle):  # writes part of the archive, then the "process dies"
        handle.write(b"PK\x03\x04 partial archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_after_half)
    with pytest.raises(KeyboardInterrupt):
        save(path, step=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # the partial temp file was removed


# ------------------------------------------------------------------ detection
def test_checkpoint_problem_finds_truncation_garbage_emptiness_and_bit_rot(tmp_path):
    good = save(tmp_path / "good.ckpt", step=3)
    assert checkpoint_problem(str(good)) is None

    half = save(tmp_path / "half.ckpt", step=3)
    cut_in_half(half)
    assert checkpoint_problem(str(half)) == "file is truncated or not a torch checkpoint"

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    assert checkpoint_problem(str(garbage)) == "file is truncated or not a torch checkpoint"

    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    assert checkpoint_problem(str(empty)) == "file is empty"
    assert checkpoint_problem(str(tmp_path / "absent.ckpt")) == "file does not exist"

    # Flip one byte inside the stored tensor data: same size, valid zip directory, wrong CRC.
    rotten = save(tmp_path / "rotten.ckpt", step=3)
    with zipfile.ZipFile(rotten) as archive:
        member = next(info for info in archive.infolist() if "/data/" in info.filename)
    data = bytearray(rotten.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[member.header_offset + 26: member.header_offset + 30])
    offset = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data[offset] ^= 0xFF
    rotten.write_bytes(bytes(data))
    assert checkpoint_problem(str(rotten)) == f"member {member.filename} fails its CRC check"

    plain_zip = tmp_path / "plain.ckpt"
    with zipfile.ZipFile(plain_zip, "w") as archive:
        archive.writestr("hello.txt", "hi")
    assert checkpoint_problem(str(plain_zip)) == "archive holds no torch checkpoint"


# ------------------------------------------------------------------ --ckpt_path resolution
def test_last_skips_a_truncated_newest_checkpoint_and_ignores_partial_writes(tmp_path):
    save(tmp_path / "epoch=0-step=1.ckpt", step=1, mtime=1_000)
    previous = save(tmp_path / "epoch=0-step=2.ckpt", step=2, mtime=2_000)
    cut = save(tmp_path / "last.ckpt", step=3, mtime=3_000)
    cut_in_half(cut)
    os.utime(cut, (3_000, 3_000))
    leftover = tmp_path / "epoch=0-step=3.ckpt.tmp-4242"  # a save killed before its rename
    leftover.write_bytes(b"PK\x03\x04half")

    resolution = resolve_ckpt_path("last", str(tmp_path), fresh_start_allowed=True)

    assert resolution.path == str(previous)
    assert resolution.messages == [
        f"checkpoint {cut} is incomplete or corrupt (file is truncated or not a torch checkpoint); trying the previous one",
        f"ignoring {leftover} (an interrupted write; safe to delete)",
    ]
    assert torch.load(resolution.path, weights_only=True)["global_step"] == 2


def test_last_with_nothing_usable(tmp_path):
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(b"garbage")
    fresh = resolve_ckpt_path("last", str(tmp_path), fresh_start_allowed=True)
    assert fresh.path is None
    assert fresh.messages[-1] == f"no complete checkpoint in {tmp_path}; starting from scratch"
    with pytest.raises(CheckpointError, match=r"--ckpt_path last found no complete checkpoint in .*; train first"):
        resolve_ckpt_path("last", str(tmp_path), fresh_start_allowed=False)
    assert resolve_ckpt_path("last", str(tmp_path / "never-created"), fresh_start_allowed=True).path is None


def test_an_explicit_path_is_used_as_named_or_refused(tmp_path):
    older = save(tmp_path / "epoch=0-step=1.ckpt", step=1, mtime=1_000)
    named = save(tmp_path / "epoch=0-step=2.ckpt", step=2, mtime=2_000)
    save(tmp_path / "last.ckpt", step=5, mtime=5_000)
    assert resolve_ckpt_path(str(named), str(tmp_path), fresh_start_allowed=False).path == str(named)

    cut_in_half(named)
    os.utime(named, (2_000, 2_000))
    with pytest.raises(CheckpointError) as refused:
        resolve_ckpt_path(str(named), str(tmp_path), fresh_start_allowed=True)
    assert str(refused.value) == (
        f"checkpoint '{named}' is incomplete or corrupt (file is truncated or not a torch checkpoint) - "
        f"pass another checkpoint, e.g. {tmp_path / 'last.ckpt'}, or --ckpt_path last"
    )
    with pytest.raises(CheckpointError, match=r"checkpoint '.*absent.ckpt' does not exist - pass an existing"):
        resolve_ckpt_path(str(tmp_path / "absent.ckpt"), str(tmp_path), fresh_start_allowed=True)
    assert newest_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / "last.ckpt")
    assert older.exists()


@pytest.mark.parametrize("keyword", [None, "best", "hpc", "registry", "s3://bucket/run/last.ckpt"])
def test_lightning_keywords_and_urls_are_left_to_lightning(keyword, tmp_path):
    assert resolve_ckpt_path(keyword, str(tmp_path), fresh_start_allowed=True).path == keyword


# ------------------------------------------------------------------ safe loads
def test_loads_are_weights_only_but_allow_numpy_arrays(tmp_path):
    io = AtomicCheckpointIO()
    numeric = tmp_path / "numpy.ckpt"
    torch.save({"legacy_rng": np.random.RandomState(3).get_state(), "x": np.arange(4, dtype=np.float32)}, numeric)
    loaded = io.load_checkpoint(numeric)
    assert loaded["legacy_rng"][0] == "MT19937" and loaded["x"].tolist() == [0.0, 1.0, 2.0, 3.0]

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "when": datetime.date(2024, 1, 2)}, unsafe)
    with pytest.raises(CheckpointError) as refused:
        io.load_checkpoint(unsafe)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"checkpoint '{unsafe}' holds pickled Python objects that a safe load (weights_only=True) refuses "
        "(datetime.date); if you wrote it yourself or otherwise trust it, add --weights_only false"
    )
    assert io.load_checkpoint(unsafe, weights_only=False)["when"] == datetime.date(2024, 1, 2)


# ------------------------------------------------------------------ RNG states
def draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    np.random.randn()  # leaves a cached Gaussian in numpy's state (has_gauss = 1)
    torch.save({"rng": capture_rng_states()}, tmp_path / "rng.ckpt")
    expected = draws()
    np_gauss_expected = np.random.randn()

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    restore_rng_states(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])  # no allow-list needed
    assert draws() == expected
    assert np.random.randn() == np_gauss_expected


def test_rng_states_in_the_old_tuple_layout_still_restore():
    np.random.seed(5), random.seed(6)
    old = {"torch": torch.random.get_rng_state(), "cuda": [], "numpy": np.random.get_state(), "python": random.getstate()}
    expected = draws()
    restore_rng_states(old)
    assert draws() == expected


def test_ppo_module_checkpoint_needs_no_allow_list(tmp_path):
    """``on_save_checkpoint`` output of :class:`PPOModule` loads with plain ``weights_only=True``."""
    from flan_rlhf.module import PPOModule
    from tests.conftest import TokenFractionReward, tiny_policy_spec

    module = PPOModule(policy=tiny_policy_spec(), reward=TokenFractionReward())
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "ppo.ckpt")
    loaded = torch.load(tmp_path / "ppo.ckpt", weights_only=True)
    assert set(loaded["flan_rlhf"]) == {"kl_controller", "shaper", "guard", "rng", "vocab_size", "reward"}
    assert loaded["flan_rlhf"]["reward"].startswith(type(module.reward).__name__)  # a string: no allow-list needed
    restore_rng_states(loaded["flan_rlhf"]["rng"])


# ------------------------------------------------------------------ security
def test_trust_remote_code_is_off_unless_the_user_turns_it_on():
    import inspect
    import re

    from flan_rlhf.tools.command import tool_parser
    from flan_rlhf.tools.generate import generate
    from flan_rlhf.policy import PolicySpec, load_seq2seq_model, load_tokenizer

    assert PolicySpec().trust_remote_code is False
    for loader in (load_tokenizer, load_seq2seq_model):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False
    assert tool_parser("generate", generate).parse_args(["--model", "m", "--input", "i", "--output", "o"]).trust_remote_code is False
    root = Path(__file__).resolve().parent.parent
    switched_on = [str(p) for p in [*root.joinpath("flan_rlhf").rglob("*.py"), *root.joinpath("configs").rglob("*.yaml")]
                   if re.search(r"trust_remote_code\s*[=:]\s*(True|true)", p.read_text(encoding="utf-8"))]
    assert not switched_on, switched_on


def test_read_checkpoint_file_is_safe_by_default(tmp_path):
    from flan_rlhf.checkpointing import read_checkpoint_file

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"global_step": 4, "when": datetime.date(2024, 1, 2)}, unsafe)
    with pytest.raises(CheckpointError, match=r"\(datetime.date\); if you wrote it yourself"):
        read_checkpoint_file(str(unsafe))
    assert read_checkpoint_file(str(unsafe), trusted=True)["global_step"] == 4
    cut = save(tmp_path / "cut.ckpt", step=2)
    cut_in_half(cut)
    with pytest.raises(CheckpointError, match=r"cannot be used: file is truncated or not a torch checkpoint - pass a"):
        read_checkpoint_file(str(cut))
    assert read_checkpoint_file(str(save(tmp_path / "ok.ckpt", step=9)), mmap=True)["global_step"] == 9
