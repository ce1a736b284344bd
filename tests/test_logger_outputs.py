"""flan_rlhf.logger_outputs: tables and histograms per logger, the logger-package check; monitors' wiring."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger

from flan_rlhf.logger_outputs import (
    LoggerError,
    check_logger_packages,
    log_histograms,
    log_samples,
    markdown_table,
    takes_histograms,
)
from flan_rlhf.module import PPOModule
from flan_rlhf.policy import LoraSettings
from flan_rlhf.rewards.base import Reward
from flan_rlhf.settings import GenerationSettings, PPOSettings
from tests.conftest import PROMPTS, ListPromptStream, tiny_policy_spec


class ScalarsOnly(Logger):
    """A logger of the user's own that takes scalars and nothing else."""

    name, version = "scalars", 0

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_markdown_table_formats_numbers_and_keeps_cells_on_one_line():
    table = markdown_table(["prompt", "reward"], [["a | b\nc", 0.123456], ["x" * 400, 1]])
    assert table.splitlines() == ["| prompt | reward |", "|---|---|", "| a \\| b c | 0.123 |",
                                  f"| {'x' * 300} | 1 |"]


def test_csv_rows_are_appended_beside_the_metrics_and_unknown_loggers_are_named(tmp_path):
    csv_logger = CSVLogger(str(tmp_path), name="run")
    other = ScalarsOnly()
    assert log_samples([csv_logger, other], ["prompt", "reward"], [["p1", 0.5], ["p2", 1.0]], step=3) == ["ScalarsOnly"]
    assert log_samples([csv_logger], ["prompt", "reward"], [["p3", 0.0]], step=5) == []
    lines = (tmp_path / "run" / "version_0" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "prompt": "p1", "reward": 0.5},
                                                    {"step": 3, "prompt": "p2", "reward": 1.0},
                                                    {"step": 5, "prompt": "p3", "reward": 0.0}]
    assert not takes_histograms([csv_logger, other])


def test_histograms_leave_out_non_finite_values_and_empty_tensors(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    log_histograms([logger], {"a": torch.tensor([1.0, float("nan"), 3.0, float("inf")]), "b": torch.tensor([])}, step=7)
    logger.experiment.flush()
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    accumulator.Reload()
    assert accumulator.Tags()["histograms"] == ["a"]
    (event,) = accumulator.Histograms("a")
    assert (event.step, event.histogram_value.num, event.histogram_value.sum) == (7, 2, 4.0)


def test_logger_packages_are_checked_in_a_list_and_unknown_loggers_pass(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "comet_ml", None)
    check_logger_packages([{"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}, {"class_path": "my.Logger"}])
    check_logger_packages(False)
    with pytest.raises(LoggerError, match=r"the CometLogger asked for in trainer.logger needs the comet_ml package.*"
                                          r"pip install comet-ml"):
        check_logger_packages([{"class_path": "lightning.pytorch.loggers.TensorBoardLogger"},
                               {"class_path": "lightning.pytorch.loggers.CometLogger", "init_args": {}}])


def test_an_mlflow_sqlite_store_gets_its_folder(tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "new" / "runs.db"
    check_logger_packages({"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                           "init_args": {"tracking_uri": f"sqlite:///{store}"}})
    assert store.parent.is_dir() and not store.exists()  # SQLite makes the file itself


class Spy(Reward):
    """A reward that scores each response by its length and remembers every batch of texts it saw."""

    def __init__(self, name: str):
        self.name = name
        self.seen: list[list[str]] = []
        self.prompts: list[list[str]] = []

    def components(self, prompts, responses):
        self.seen.append(list(responses))
        self.prompts.append(list(prompts))
        return {self.name: torch.tensor([float(len(text)) for text in responses])}


def test_monitors_score_the_validation_samples_the_reward_scored_and_are_not_trained_on():
    reward, monitor = Spy("length"), Spy("watched")
    module = PPOModule(policy=tiny_policy_spec(), reward=reward, monitors=[monitor],
                       lora=LoraSettings(r=4, alpha=8, target_modules=["q", "v"]),
                       generation=GenerationSettings(max_new_tokens=8), log_samples_every_n_steps=0,
                       ppo=PPOSettings(learning_rate=1e-3, mini_batch_size=4, ppo_epochs=1))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    data = torch.utils.data.DataLoader(ListPromptStream(PROMPTS, 8), batch_size=None)
    trainer.fit(module, data, data)
    assert len(monitor.seen) == 1 and len(reward.seen) == 3  # 2 training rollouts + 1 validation batch
    assert monitor.seen[0] == reward.seen[-1]  # the very validation responses the reward scored
    lengths = [len(text) for text in monitor.seen[0]]
    assert float(trainer.callback_metrics["val/monitor/watched"]) == pytest.approx(sum(lengths) / len(lengths))
    assert "env/reward/watched_mean" not in trainer.callback_metrics  # logged as a monitor only


def test_only_a_file_store_is_refused_and_lightnings_default_is_one(monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import environment_variables

    from flan_rlhf.logger_outputs import check_mlflow_store

    if getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None) is None:
        pytest.skip("this MLflow takes file stores without an opt-in")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for service in ("databricks", "http://tracking:5000", "postgresql://u@db/mlflow"):
        check_mlflow_store({"tracking_uri": service})
    for store, shown in (({}, "file:./mlruns"), ({"save_dir": "runs"}, "file:runs"), ({"tracking_uri": "./mlruns"}, "./mlruns"),
                         ({"tracking_uri": "/data/mlruns"}, "/data/mlruns")):
        with pytest.raises(LoggerError, match=f"refuses the file store {shown} "):
            check_mlflow_store(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:/elsewhere")
    with pytest.raises(LoggerError, match="refuses the file store file:/elsewhere "):
        check_mlflow_store({})
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_mlflow_store({})
