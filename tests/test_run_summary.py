"""The closing lines of the Lightning commands name what ran and only outputs that exist."""
from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from flan_rlhf.run_summary import run_summary
from tests.test_progress_callbacks import fit_tiny


def test_fit_names_its_checkpoints_and_log_version(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True)
    trainer = fit_tiny(2, [checkpoint], tmp_path, enable_progress_bar=False,
                       logger=TensorBoardLogger(save_dir=str(tmp_path / "logs"), name="run"))
    lines = run_summary(trainer, trainer.lightning_module, "fit", 3.04)
    assert lines == ["fit: 2/2 steps in 3.0 s",
                     f"  checkpoints: {tmp_path / 'ckpt'} (newest: {tmp_path / 'ckpt' / 'last.ckpt'})",
                     f"  logs: {tmp_path / 'logs' / 'run' / 'version_0'}"]


def test_a_run_without_checkpoints_or_logger_names_nothing_else(tmp_path):
    trainer = fit_tiny(1, [], tmp_path, enable_progress_bar=False, enable_checkpointing=False)
    assert run_summary(trainer, trainer.lightning_module, "fit", 12.0) == ["fit: 1/1 steps in 12 s"]
    assert not (tmp_path / "lightning_logs").exists()
