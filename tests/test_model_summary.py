"""The one model line ``fit`` prints, and which commands get it."""
from __future__ import annotations

import logging

import pytest
import yaml
from lightning.pytorch.callbacks import ModelSummary

from flan_rlhf.lightning_cli import run_lightning_cli
from flan_rlhf.model_summary import ParameterSummary, parameter_line
from tests.test_cli import tiny_config


def test_parameter_line_by_hand():
    assert parameter_line(259_000, 12_400, 1.037) == "model: 259 K parameters, 12.4 K trainable (4.8%), 1.0 MB"
    assert parameter_line(247_577_856, 884_736, 990.3) == "model: 247 M parameters, 884 K trainable (0.4%), 990.3 MB"
    assert parameter_line(0, 0, 0.0) == "model: 0 parameters, 0 trainable, 0.0 MB"


def summaries(cli) -> list[ModelSummary]:
    return [callback for callback in cli.trainer.callbacks if isinstance(callback, ModelSummary)]


def test_the_cli_prints_the_parameter_line_instead_of_lightnings_table(tmp_path):
    cli = run_lightning_cli(["--config", tiny_config(tmp_path)], run=False)
    assert [type(callback) for callback in summaries(cli)] == [ParameterSummary]
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        summaries(cli)[0].on_fit_start(cli.trainer, cli.model)
    finally:
        logger.removeHandler(handler)
    trainable = sum(p.numel() for p in cli.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in cli.model.parameters())
    assert [record.getMessage() for record in records] == [parameter_line(total, trainable, total * 4 / 1e6)]


@pytest.mark.parametrize("setting, expected", [
    (["--trainer.enable_model_summary", "false"], []),
    ("own", [ModelSummary]),
])
def test_a_summary_the_user_turned_off_or_gave_is_theirs(setting, expected, tmp_path):
    config = tiny_config(tmp_path)
    if setting == "own":
        loaded = yaml.safe_load(open(config))
        loaded["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelSummary",
                                               "init_args": {"max_depth": 2}})
        open(config, "w").write(yaml.safe_dump(loaded))
        setting = []
    cli = run_lightning_cli(["--config", config, *setting], run=False)
    assert [type(callback) for callback in summaries(cli)] == expected
