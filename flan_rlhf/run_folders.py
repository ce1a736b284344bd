"""Where a run's checkpoints live, and which folders ``--ckpt_path last`` searches.

A ``ModelCheckpoint`` with no ``dirpath`` (the configs in ``configs/``) writes into the run's
own log folder, as Lightning does: ``<save_dir>/<name>/<version>/checkpoints/``. So every run has
its own checkpoint folder, named by its log version: ``version_N`` by default, or the name
the user gives it (``--trainer.logger.version baseline``). Then

* ``--ckpt_path last`` with a run named: the newest complete checkpoint of that run;
* ``--ckpt_path last`` with no run named: the newest complete checkpoint of any run under
  ``<save_dir>/<name>/`` (the most recent run), which the resumed run continues (its log
  version is set to that run's, :func:`version_of_checkpoint`);
* a fresh run claims the next free ``version_N`` folder with one ``mkdir`` (atomic: two runs
  started at the same time get two folders, :func:`claim_fresh_version`).

A ``ModelCheckpoint`` with a ``dirpath`` is one folder the user chose; a run refuses to start
in it when it holds another run's checkpoints (:class:`flan_rlhf.lightning_cli.FlanRLHFCLI`). With
no logger (``logger: false``) the folder is ``<default_root_dir>/checkpoints``, like Lightning's;
with a logger that is not a file logger (W&B, MLflow) ``last`` needs a ``dirpath``.

Everything here reads the parsed config (``{"class_path", "init_args"}`` entries), before any
class is built.
"""
from __future__ import annotations

import glob
import importlib
import os
import re
from typing import Any

from flan_rlhf.log_versions import file_logger_args, log_root

CHECKPOINTS = "checkpoints"  # Lightning's sub-folder of a log version


TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


def spell_out_default_logger(trainer_config: Any) -> None:
    """Replace ``trainer.logger: null`` / ``true`` (Lightning's default logger) by the logger it stands
    for, ``TensorBoardLogger(save_dir=<default_root_dir>, name="lightning_logs")``, in the parsed config,
    so that the run's folder is known before the Trainer exists. ``false`` (no logger) stays."""
    from jsonargparse import Namespace

    if trainer_config.get("logger") in (None, True):
        root = trainer_config.get("default_root_dir") or os.getcwd()
        trainer_config["logger"] = Namespace(class_path=TENSORBOARD_LOGGER,
                                             init_args=Namespace(save_dir=str(root), name="lightning_logs"))


def model_checkpoint_configs(callbacks: Any) -> list[Any]:
    """The ``ModelCheckpoint`` (or subclass) entries among parsed ``trainer.callbacks``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    found = []
    for callback in (callbacks if isinstance(callbacks, list) else [callbacks] if callbacks else []):
        if not hasattr(callback, "get"):
            continue
        module_name, _, class_name = str(callback.get("class_path", "")).rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name, None) if module_name else None
        if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
            found.append(callback)
    return found


def explicit_dirpath(callbacks: Any) -> str | None:
    """The ``dirpath`` of the first ``ModelCheckpoint`` among parsed ``trainer.callbacks``, or None."""
    for callback in model_checkpoint_configs(callbacks):
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        return None if dirpath is None else str(dirpath)
    return None


def logger_version(trainer_config: Any) -> int | str | None:
    """The ``version`` a parsed ``trainer`` config gives its file logger (a run name, or one set by the CLI), or None."""
    args = file_logger_args(trainer_config.get("logger"))
    return None if args is None else args.get("version")


def version_folder_name(version: int | str) -> str:
    """The folder of a log version, as Lightning names it: ``3`` -> ``version_3``, ``"baseline"`` -> ``baseline``."""
    return version if isinstance(version, str) else f"version_{version}"


def run_folder_of_version(logger_config: Any, version: int | str) -> str:
    """``<save_dir>/<name>/<version folder>`` of a file logger's parsed config."""
    return os.path.join(log_root(file_logger_args(logger_config)), version_folder_name(version))


def run_checkpoint_folder(trainer_config: Any, version: int | str | None) -> str | None:
    """The checkpoint folder of the run ``trainer_config`` (parsed ``trainer``) describes, whose log
    version is ``version``: the ``ModelCheckpoint``'s ``dirpath``, else ``<log root>/<version>/checkpoints``
    for a file logger, else ``<default_root_dir>/checkpoints`` with no logger; None when unknown
    (no ``ModelCheckpoint``, another logger, or a file logger whose version is not known yet)."""
    callbacks = trainer_config.get("callbacks")
    if not model_checkpoint_configs(callbacks) and trainer_config.get("enable_checkpointing") is False:
        return None
    dirpath = explicit_dirpath(callbacks)
    if dirpath is not None:
        return dirpath
    logger = trainer_config.get("logger")
    if logger is False:
        return os.path.join(str(trainer_config.get("default_root_dir") or os.getcwd()), CHECKPOINTS)
    args = file_logger_args(logger)
    if args is None or version is None:
        return None
    return os.path.join(run_folder_of_version(logger, version), CHECKPOINTS)


def last_search_folders(trainer_config: Any, named_version: int | str | None) -> list[str]:
    """The folders ``--ckpt_path last`` looks in: the run's own folder when it is known (a
    ``dirpath``, no logger, or a run named by ``named_version``), else every run's
    ``checkpoints/`` under the file logger's ``<save_dir>/<name>/``."""
    folder = run_checkpoint_folder(trainer_config, named_version)
    if folder is not None:
        return [folder]
    args = file_logger_args(trainer_config.get("logger"))
    if args is None:
        return []
    root = log_root(args)
    return sorted(glob.glob(os.path.join(glob.escape(root), "*", CHECKPOINTS)))


def version_of_checkpoint(path: str, logger_config: Any) -> int | str | None:
    """The log version of the run whose checkpoint ``path`` is, read from where it lies
    (``<log root>/<version>/checkpoints/<file>``), or None when it lies elsewhere."""
    args = file_logger_args(logger_config)
    if args is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    run, checkpoints = os.path.split(folder)
    if checkpoints != CHECKPOINTS or os.path.dirname(run) != log_root(args):
        return None
    name = os.path.basename(run)
    match = re.fullmatch(r"version_(\d+)", name)
    return int(match.group(1)) if match else name


def claim_fresh_version(logger_config: Any) -> int:
    """Create the next free ``version_N`` folder under the file logger's ``<save_dir>/<name>/`` and return N.

    ``os.mkdir`` fails when the folder exists, so two runs starting at once never share one.
    """
    root = log_root(file_logger_args(logger_config))
    os.makedirs(root, exist_ok=True)
    taken = [int(m.group(1)) for m in (re.fullmatch(r"version_(\d+)", n) for n in os.listdir(root)) if m]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(root, f"version_{version}"))
            return version
        except FileExistsError:
            version += 1


def foreign_checkpoint_problem(folder: str | None, run_id: str | None) -> str | None:
    """Why a run may not write into the checkpoint folder ``folder``, or None.

    A folder is empty or one run's: a fresh run (``run_id`` None) may not start in a folder holding a
    complete checkpoint; a resumed run (``run_id``: the id it took from its checkpoint) may not write
    into a folder whose newest complete checkpoint another run wrote. Torn files do not count (a
    resume skipped them). Costs one CRC pass over the newest complete file.
    """
    from flan_rlhf.checkpointing import newest_complete_checkpoint, read_checkpoint_file
    from flan_rlhf.output_dirs import RUN_ID_KEY

    newest, _ = newest_complete_checkpoint(folder) if folder else (None, [])
    if newest is None:
        return None
    if run_id is not None:
        owner = read_checkpoint_file(newest, mmap=True).get(RUN_ID_KEY)
        if owner is None or owner == run_id:
            return None
    return (f"checkpoint folder '{folder}' already holds checkpoints of another run (e.g. {os.path.basename(newest)}) - "
            "continue that run with --ckpt_path last, or give this run its own folder (another "
            "--trainer.logger.version, or another ModelCheckpoint dirpath)")
