"""Sample tables and histograms in each Lightning logger's own form, and the logger packages a config needs.

Scalars reach every Lightning logger through ``LightningModule.log``. Tables and histograms have
no common Lightning API, so :func:`log_samples` and :func:`log_histograms` write them the way each
logger's own tools read them:

============================  =========================================  ============================
logger                        sample rows                                histograms
============================  =========================================  ============================
``TensorBoardLogger``         text tab, a markdown table per step        ``add_histogram``
``CSVLogger``                 ``samples.jsonl`` beside ``metrics.csv``   none (a CSV has no bins)
``WandbLogger``               a ``wandb.Table`` under ``samples``        ``wandb.Histogram``
``MLFlowLogger``              the run's table artifact ``samples.json``  none (MLflow has no type)
============================  =========================================  ============================

Any other logger gets the scalars only; :func:`log_samples` returns its name so the caller can
say so once.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from flan_rlhf.io import append_jsonl

#: the key of the sample table in every logger (TensorBoard tag, W&B key, stem of the CSV/MLflow file)
SAMPLES_KEY = "samples"
CSV_SAMPLES_FILE = "samples.jsonl"
MLFLOW_SAMPLES_FILE = "samples.json"

#: logger class name -> (the package it imports, how to install it)
LOGGER_PACKAGES = {
    "WandbLogger": ("wandb", "pip install 'flan-rlhf[wandb]'"),
    "MLFlowLogger": ("mlflow", "pip install 'flan-rlhf[mlflow]'"),
    "CometLogger": ("comet_ml", "pip install comet-ml"),
    "NeptuneLogger": ("neptune", "pip install neptune"),
}


class LoggerError(ValueError):
    """A logger the config asks for cannot run here (its package is missing, its store is refused)."""


# ----------------------------------------------------------------------------- config checks
def logger_entries(logger_config: Any) -> list[Any]:
    """The ``{class_path, init_args}`` entries of ``trainer.logger`` (one, a list, or none)."""
    if logger_config is None or isinstance(logger_config, bool):
        return []
    entries = logger_config if isinstance(logger_config, (list, tuple)) else [logger_config]
    return [entry for entry in entries if hasattr(entry, "get")]


def check_logger_packages(logger_config: Any) -> None:
    """Stop with one line when a configured logger's package is missing or refuses its store.

    Raises:
        LoggerError: the logger, the missing package and the pip command that installs it; or, for
            an ``MLFlowLogger`` on a file store that the installed MLflow refuses, both ways on.
    """
    for entry in logger_entries(logger_config):
        class_name = str(entry.get("class_path", "")).rpartition(".")[2]
        if class_name not in LOGGER_PACKAGES:
            continue
        package, install = LOGGER_PACKAGES[class_name]
        if importlib.util.find_spec(package) is None:
            raise LoggerError(f"the {class_name} asked for in trainer.logger needs the {package} package, which is not "
                              f"installed: {install}, or choose another logger")
        if class_name == "MLFlowLogger":
            check_mlflow_store(entry.get("init_args") or {})


def mlflow_tracking_uri(init_args: Any) -> str:
    """The tracking URI ``MLFlowLogger`` will use: its ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
    Lightning's default, the file store ``file:<save_dir>`` (``./mlruns``)."""
    uri = init_args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return str(uri) if uri else f"file:{init_args.get('save_dir') or './mlruns'}"


def check_mlflow_store(init_args: Any) -> None:
    """Refuse a file store that the installed MLflow will refuse mid-start; make a local SQLite file's folder.

    Recent MLflow (3.18 here) raises on file stores unless ``MLFLOW_ALLOW_FILE_STORE=true`` (the store is in
    maintenance mode; SQLite is its default now): one line before the run starts instead.
    """
    uri = mlflow_tracking_uri(init_args)
    # a file store: file:..., or a bare path (not a bare word such as "databricks", which names a service)
    file_store = uri.startswith("file:") or (":" not in uri and ("/" in uri or uri.startswith(".")))
    if file_store:
        from mlflow import environment_variables

        allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
        if allowed is not None and not allowed.get():
            raise LoggerError(
                f"the installed MLflow refuses the file store {uri} (set by trainer.logger.init_args.tracking_uri, "
                "MLFLOW_TRACKING_URI or Lightning's default): use a local database, "
                "--trainer.logger.init_args.tracking_uri sqlite:///lightning_logs/mlflow.db (configs/loggers/mlflow.yaml), "
                "or export MLFLOW_ALLOW_FILE_STORE=true")
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):])
        if folder:
            os.makedirs(folder, exist_ok=True)  # SQLite creates the file, not its folder


# ----------------------------------------------------------------------------- samples
def log_samples(loggers: Sequence[Logger], columns: Sequence[str], rows: Sequence[Sequence[Any]],
                step: int) -> list[str]:
    """Write one table of samples (``rows``, each one value per column) for ``step`` to every logger.

    Returns:
        the class names of the loggers that take no table (they got nothing).
    """
    columns = list(columns)
    rows = [list(row) for row in rows]
    skipped = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(SAMPLES_KEY, markdown_table(columns, rows), step)
        elif isinstance(logger, CSVLogger):
            append_jsonl(os.path.join(logger.log_dir, CSV_SAMPLES_FILE),
                         [{"step": step, **dict(zip(columns, row))} for row in rows])
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=SAMPLES_KEY, columns=columns, data=rows, step=step)
        elif isinstance(logger, MLFlowLogger):
            # MlflowClient.log_table appends to the artifact when it exists: one table for the whole run
            table = {"step": [step] * len(rows), **{name: [row[i] for row in rows] for i, name in enumerate(columns)}}
            logger.experiment.log_table(logger.run_id, data=table, artifact_file=MLFLOW_SAMPLES_FILE)
        else:
            skipped.append(type(logger).__name__)
    return skipped


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table of ``rows`` (floats to 3 decimals, text cut to 300 characters, ``|`` escaped)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:300]


# ----------------------------------------------------------------------------- histograms
def takes_histograms(loggers: Sequence[Logger]) -> bool:
    """Whether any of ``loggers`` draws histograms (TensorBoard, W&B)."""
    return any(isinstance(logger, (TensorBoardLogger, WandbLogger)) for logger in loggers)


def log_histograms(loggers: Sequence[Logger], values: dict[str, torch.Tensor], step: int) -> None:
    """One histogram per tag of ``values`` (1-D tensors, any device; non-finite entries dropped) at ``step``,
    in every logger that draws them; an empty tensor is left out."""
    finite = {tag: tensor.detach().float().cpu().reshape(-1) for tag, tensor in values.items()}
    finite = {tag: tensor[torch.isfinite(tensor)] for tag, tensor in finite.items()}
    finite = {tag: tensor for tag, tensor in finite.items() if tensor.numel()}
    if not finite:
        return
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            for tag, tensor in finite.items():
                logger.experiment.add_histogram(tag, tensor, step)
        elif isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({**{tag: wandb.Histogram(tensor.numpy()) for tag, tensor in finite.items()},
                                   "trainer/global_step": step})
