"""Progress of the Lightning commands: the step bar, the step lines, and which one a command gets."""
from __future__ import annotations

import io
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

from flan_rlhf.progress import seconds
from flan_rlhf.progress_callbacks import ProgressLines, StepProgressBar, choose_progress, step_line
from tests.conftest import PROMPTS, ListPromptStream
from tests.test_module import make_module


@pytest.mark.parametrize("elapsed, expected", [(0.44, "0.4 s"), (9.94, "9.9 s"), (18.2, "18 s"), (441.0, "441 s")])
def test_seconds(elapsed, expected):
    assert seconds(elapsed) == expected


@pytest.mark.parametrize("args, expected", [
    ((21, 70, 18.0, 21), "[fit] step 21/70 (30%) 18 s, ~42 s left"),  # 18 s / 21 steps x 49 steps left
    ((21, 70, 9.0, 1), "[fit] step 21/70 (30%) 9.0 s, ~441 s left"),  # resumed at 20: 9 s for its one step
    ((4, 4, 2.0, 4), "[fit] step 4/4 (100%) 2.0 s"),
    ((5, None, 3.0, 5), "[fit] step 5 3.0 s"),
])
def test_step_line_by_hand(args, expected):
    assert step_line(*args) == expected


OWN_BAR = TQDMProgressBar(refresh_rate=5)


@pytest.mark.parametrize("setting, interactive, given, callbacks, enable", [
    (None, True, [], [StepProgressBar], True),
    (None, False, [], [ProgressLines], False),
    (True, True, [], [StepProgressBar], True),
    (True, False, [], [StepProgressBar], True),
    (False, True, [], [], False),
    (False, False, [], [], False),
    (None, True, [OWN_BAR], [], None),
    (None, False, [OWN_BAR], [], None),
    (True, False, [OWN_BAR], [], True),
    (False, True, [OWN_BAR], [], False),  # the user's conflict: Lightning names it
])
def test_choose_progress_table(setting, interactive, given, callbacks, enable):
    choice = choose_progress(setting, interactive, given)
    assert [type(callback) for callback in choice.callbacks] == callbacks
    assert choice.enable_progress_bar is enable


def fit_tiny(steps: int, callbacks, tmp_path, ckpt_path: str | None = None, **trainer) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", enable_model_summary=False,
                        callbacks=list(callbacks), default_root_dir=str(tmp_path), **{"logger": False, **trainer})
    data = torch.utils.data.DataLoader(ListPromptStream(PROMPTS, 4), batch_size=None)  # infinite, no length
    trainer.fit(make_module(mini_batch_size=4, ppo_epochs=1), data, ckpt_path=ckpt_path, weights_only=False)
    return trainer


def test_the_step_bar_counts_ppo_steps_out_of_max_steps(tmp_path, capsys):
    bar = StepProgressBar()
    fit_tiny(4, [bar], tmp_path, enable_checkpointing=False)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (4, 4)
    text = capsys.readouterr().out
    first_frame = text.lstrip("\r").split("\r")[0]
    assert first_frame.startswith("fit:   0%") and "| 0/4 [" in first_frame
    assert "| 4/4 [" in text and "/?" not in text and "Epoch" not in text
    assert not re.search(r"\d/-\d", text), "no negative total (a metric such as objective/kl=-2e-7 may be negative)"


def test_a_resumed_run_starts_the_bar_at_its_step(tmp_path, capsys):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    fit_tiny(2, [checkpoint], tmp_path, enable_progress_bar=False)
    bar = StepProgressBar()
    fit_tiny(4, [bar], tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), enable_checkpointing=False)
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (2, 4, 4)
    text = capsys.readouterr().out
    first_frame = text.lstrip("\r").split("\r")[0]
    assert first_frame.startswith("fit:  50%") and "| 2/4 [" in first_frame
    assert "0/4" not in text and "/?" not in text


def test_progress_lines_every_n_steps_and_one_per_validation(tmp_path):
    stream = io.StringIO()
    fit_tiny(4, [ProgressLines(every=2, stream=stream)], tmp_path, enable_progress_bar=False,
             enable_checkpointing=False, limit_val_batches=0)
    lines = stream.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[fit] step 2/4", "[fit] step 4/4"]
    assert lines[0].endswith(" left") and not lines[1].endswith(" left")


def test_progress_lines_count_validation_batches_and_skip_the_sanity_check(tmp_path):
    """Validation inside fit: ~10 lines over its batches (every line_interval(total)), none for the sanity check."""
    stream = io.StringIO()
    val = torch.utils.data.DataLoader(ListPromptStream(PROMPTS, 2), batch_size=None)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_model_summary=False, enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[ProgressLines(stream=stream)], limit_val_batches=12,
                        val_check_interval=2, num_sanity_val_steps=2, default_root_dir=str(tmp_path))
    train = torch.utils.data.DataLoader(ListPromptStream(PROMPTS, 4), batch_size=None)
    trainer.fit(make_module(mini_batch_size=4, ppo_epochs=1), train, val)
    lines = [line.split(" (")[0] for line in stream.getvalue().splitlines() if line.startswith("[validate]")]
    assert lines == [f"[validate] {n}/12 batches" for n in (2, 4, 6, 8, 10, 12)]  # line_interval(12) == 2


@pytest.mark.parametrize("interactive, flags, expected", [
    (False, [], [ProgressLines]),
    (True, [], [StepProgressBar]),
    (True, ["--trainer.enable_progress_bar", "false"], []),
])
def test_the_cli_gives_each_command_its_progress(interactive, flags, expected, tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ProgressBar

    from flan_rlhf import lightning_cli
    from tests.test_cli import tiny_config

    monkeypatch.setattr(lightning_cli, "interactive_terminal", lambda stream=None: interactive)
    cli = lightning_cli.run_lightning_cli(["--config", tiny_config(tmp_path), *flags], run=False)
    progress_types = (ProgressBar, ProgressLines)
    assert [type(c) for c in cli.trainer.callbacks if isinstance(c, progress_types)] == expected
    assert (cli.trainer.progress_bar_callback is not None) == (expected == [StepProgressBar])
