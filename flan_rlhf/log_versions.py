"""One log version folder per run.

Lightning's file loggers (``TensorBoardLogger``, ``CSVLogger``) take a fresh ``version_N`` on
every run, so a resumed fit, or a validate/test/predict of a checkpoint, would split one run's
curves over several folders, and a run that fails while setting up would leave an empty one.
Here:

* every checkpoint records the log folder of the run that wrote it (:class:`RunLogVersion`,
  under :data:`LOG_KEY`);
* a run given that checkpoint (``--ckpt_path``) logs into the same version, when its logger is
  a file logger with no version of its own whose ``save_dir``/``name`` lead to the same folder
  (:func:`continued_version`, applied to the config by :class:`flan_rlhf.lightning_cli.FlanRLHFCLI`);
* a run that took a fresh version and fails before its first step (or, for an evaluation, its
  first batch) removes that folder if it holds only what a logger writes at start
  (:func:`remove_start_only_log_dir`).
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from typing import Any

import lightning as L

from flan_rlhf.io import remove_empty_folders
from flan_rlhf.run_lock import LOCK_NAME

LOG_KEY = "flan_rlhf_log"
FILE_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger",
                "lightning.pytorch.loggers.tensorboard.TensorBoardLogger", "lightning.pytorch.loggers.csv_logs.CSVLogger")
# What a file logger writes when a run starts, before any step: hyper-parameters and empty logs.
START_FILES = ("hparams.yaml", "events.out.tfevents.*", "metrics.csv", "config.yaml")



def run_logger(logger_config: Any) -> Any:
    """The entry of a parsed ``trainer.logger`` whose folder is the run's: the logger itself, or the first
    of a list (Lightning puts the checkpoints in the first logger's ``save_dir/name/version``)."""
    if isinstance(logger_config, (list, tuple)):
        return logger_config[0] if logger_config else None
    return logger_config


def file_logger_args(logger_config: Any) -> dict[str, Any] | None:
    """The ``init_args`` of a parsed ``trainer.logger`` (or the first of a list) that is a file logger
    (:data:`FILE_LOGGERS`), else None."""
    logger_config = run_logger(logger_config)
    if not hasattr(logger_config, "get") or str(logger_config.get("class_path")) not in FILE_LOGGERS:
        return None
    return logger_config.get("init_args") or {}


def log_root(init_args: dict[str, Any]) -> str:
    """``save_dir/name`` of a file logger's ``init_args``, absolute (Lightning's defaults: ``.`` and ``lightning_logs``)."""
    name = init_args.get("name")
    return os.path.abspath(os.path.join(str(init_args.get("save_dir", ".")), "lightning_logs" if name is None else str(name)))


def takes_fresh_version(logger_config: Any) -> bool:
    """Whether the file logger of ``logger_config`` picks a new ``version_N`` (it sets no ``version`` of its own)."""
    init_args = file_logger_args(logger_config)
    return init_args is not None and init_args.get("version") is None


def continued_version(logger_config: Any, stored: dict[str, Any] | None) -> int | str | None:
    """The ``version`` to give the logger of ``logger_config`` (``{"class_path", "init_args"}``) so that it
    logs into ``stored["log_dir"]`` (from a checkpoint), or None to leave it alone.

    None unless the logger is a file logger (:data:`FILE_LOGGERS`) with no version of its own and
    ``save_dir/name`` is the stored folder's parent, and that folder still exists.

    Example: save_dir ``logs``, name ``tiny``, stored ``{"log_dir": "/abs/logs/tiny/version_0", "version": 0}``
    with the run in ``/abs`` -> ``0``.
    """
    if not stored or not takes_fresh_version(logger_config) or not os.path.isdir(str(stored.get("log_dir", ""))):
        return None
    root = log_root(file_logger_args(logger_config))
    return stored.get("version") if os.path.dirname(os.path.abspath(stored["log_dir"])) == root else None


def _start_only(folder: str, entry: str) -> bool:
    path = os.path.join(folder, entry)
    if os.path.isdir(path) and not os.path.islink(path):  # the run's checkpoints/ holding at most its lock
        return entry == "checkpoints" and set(os.listdir(path)) <= {LOCK_NAME}
    return os.path.isfile(path) and any(fnmatch.fnmatch(entry, pattern) for pattern in START_FILES)


def remove_start_only_log_dir(folder: str | None) -> bool:
    """Remove ``folder`` if it holds nothing but :data:`START_FILES` and a ``checkpoints/`` folder
    holding at most the run's lock; returns whether it did."""
    if not folder or not os.path.isdir(folder):
        return False
    if not all(_start_only(folder, entry) for entry in os.listdir(folder)):
        return False
    shutil.rmtree(folder)
    return True


class RunLogVersion(L.Callback):
    """Records the run's log folder in every checkpoint; removes a fresh one a failed start leaves.

    Args:
        fresh: this run's logger takes a new version folder (no version given or continued).
        new_folders: the logger's parent folders (``save_dir/name``, ``save_dir``) that did not exist
            before this run, deepest first: removed too after a failed start, if left empty.
    """

    def __init__(self, fresh: bool, new_folders: tuple[str, ...] = ()) -> None:
        self.fresh = fresh
        self.new_folders = tuple(new_folders)
        self.progressed = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if log_dir:
            checkpoint[LOG_KEY] = {"log_dir": os.path.abspath(log_dir), "version": logger.version}

    def _progress(self, trainer: L.Trainer, *_: Any) -> None:
        if not trainer.sanity_checking:
            self.progressed = True

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _progress

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        logger = trainer.logger
        if self.fresh and not self.progressed and trainer.is_global_zero and logger is not None:
            if remove_start_only_log_dir(getattr(logger, "log_dir", None)):
                remove_empty_folders(self.new_folders)


def new_log_folders(logger_config: Any) -> tuple[str, ...]:
    """The parents a file logger of ``logger_config`` would create (``save_dir/name``, then ``save_dir``)
    that do not exist yet, deepest first."""
    init_args = file_logger_args(logger_config)
    if init_args is None:
        return ()
    root = log_root(init_args)
    return tuple(folder for folder in (root, os.path.dirname(root)) if not os.path.exists(folder))
