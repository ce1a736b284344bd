"""Every Lightning logger gets the scalars, the sample table and (where it draws them) the histograms of a
tiny fit, read back with each logger's own reader; validation monitors; missing logger packages."""
from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from flan_rlhf.cli import main
from flan_rlhf.logger_outputs import SAMPLES_KEY
from tests.conftest import error_lines, run_command
from tests.test_cli import ROOT, tiny_config

HISTOGRAM_TAGS = {"env/reward_dist", "objective/kl_dist", "tokens/responses_dist", "ppo/policy/ratio"}
SAMPLE_COLUMNS = ["prompt", "response", "reward", "kl"]
NUM_SAMPLES = 4  # configs/tiny.yaml's num_log_samples default
PPO_EPOCHS = 4  # configs/tiny.yaml
BATCH = 8  # tiny_config's batch_size


def logged_config(folder, logger, **model_updates) -> str:
    """``configs/tiny.yaml`` for a 4-iteration fit in ``folder`` with ``logger`` (the ``trainer.logger`` entry or
    list), samples and histograms every 2 iterations, validation after iterations 2 and 4; its path."""
    path = tiny_config(folder)
    config = yaml.safe_load(open(path))
    config["trainer"]["logger"] = logger
    config["model"]["init_args"].update({"log_histograms_every_n_steps": 2, **model_updates})
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    return path


def check_sample_rows(rows: list[dict]) -> None:
    """4 rows per logged iteration (0 and 2), each with a prompt, a response, a reward in [0, 1] and a KL."""
    assert [row["step"] for row in rows] == [0] * NUM_SAMPLES + [2] * NUM_SAMPLES
    for row in rows:
        assert row["prompt"].startswith("Summarize the following conversation.")
        assert isinstance(row["response"], str)
        assert 0.0 <= row["reward"] <= 1.0 and isinstance(row["kl"], float)
    assert all(abs(row["kl"]) < 1e-4 for row in rows[:NUM_SAMPLES])  # before the first update the policy is the reference


@pytest.fixture(scope="module")
def file_loggers_run(tmp_path_factory):
    """configs/loggers/csv.yaml (TensorBoard, then CSV) on the tiny config with no checkpoint ``dirpath``:
    2 iterations, then ``--ckpt_path last`` to 4. Returns ``(folder, resume stdout)``."""
    folder = tmp_path_factory.mktemp("file_loggers")
    overlay = yaml.safe_load(open(os.path.join(ROOT, "configs", "loggers", "csv.yaml")))
    for entry in overlay["trainer"]["logger"]:
        entry["init_args"]["save_dir"] = str(folder / "logs")
    path = logged_config(folder, overlay["trainer"]["logger"])
    config = yaml.safe_load(open(path))
    checkpoint = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    del checkpoint["init_args"]["dirpath"]  # the run's own folder: the first logger's
    checkpoint["init_args"]["every_n_train_steps"] = 1
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["fit", "--config", path, "--trainer.max_steps", "2"]) == 0
    resumed = io.StringIO()
    with contextlib.redirect_stdout(resumed), contextlib.redirect_stderr(io.StringIO()):
        assert main(["fit", "--config", path, "--ckpt_path", "last"]) == 0
    return folder, resumed.getvalue()


def test_tensorboard_gets_scalars_samples_histograms_and_monitors(file_loggers_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = file_loggers_run
    scalars, histograms, texts = {}, {}, []
    for events in sorted(glob.glob(str(folder / "logs" / "run" / "version_0" / "events.out.tfevents.*"))):  # 1 per process
        accumulator = EventAccumulator(events, size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        for tag in tags["scalars"]:
            scalars.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
        for tag in tags["histograms"]:
            histograms.setdefault(tag, []).extend(accumulator.Histograms(tag))
        if f"{SAMPLES_KEY}/text_summary" in tags["tensors"]:
            texts += accumulator.Tensors(f"{SAMPLES_KEY}/text_summary")
    assert set(histograms) == HISTOGRAM_TAGS
    values = {tag: [value for _, value in points] for tag, points in scalars.items()}
    assert [step for step, _ in scalars["env/reward_mean"]] == [0, 1, 2, 3]
    assert len(values["val/monitor/positivity"]) == 2  # configs/tiny.yaml's VADER monitor, at both validations
    assert all(-1.0 <= value <= 1.0 for value in values["val/monitor/positivity"])
    # TRL's ppo/mean_non_score_reward: -kl_coef * mean per-response KL, the coefficient the rewards used
    assert values["ppo/mean_non_score_reward"] == pytest.approx(
        [-coef * kl for coef, kl in zip(values["objective/kl_coef"], values["objective/kl"])], rel=1e-5, abs=1e-7)
    for tag in HISTOGRAM_TAGS:
        assert [event.step for event in histograms[tag]] == [0, 2], tag  # one before the resume, one after
    lengths = values["tokens/response_len_mean"]
    for event in histograms["env/reward_dist"]:
        assert event.histogram_value.num == BATCH
    for event in histograms["tokens/responses_dist"]:
        assert event.histogram_value.sum == pytest.approx(BATCH * lengths[event.step])
    for event in histograms["ppo/policy/ratio"]:  # every response token of every epoch's passes
        assert event.histogram_value.num == pytest.approx(PPO_EPOCHS * BATCH * lengths[event.step])
    assert [event.step for event in texts] == [0, 2]
    table = texts[0].tensor_proto.string_val[0].decode().splitlines()
    assert table[0] == "| " + " | ".join(SAMPLE_COLUMNS) + " |" and len(table) == 2 + NUM_SAMPLES


def test_csv_beside_tensorboard_gets_metrics_and_sample_rows(file_loggers_run):
    folder, _ = file_loggers_run
    runs = sorted(os.listdir(folder / "logs" / "run_csv"))  # a resumed run's second logger starts a version of its own
    assert runs == ["version_0", "version_1"]
    metrics, rows = [], []
    for run in runs:
        with open(folder / "logs" / "run_csv" / run / "metrics.csv") as handle:
            metrics += list(csv.DictReader(handle))
        with open(folder / "logs" / "run_csv" / run / "samples.jsonl") as handle:
            rows += [json.loads(line) for line in handle]
    assert [int(row["step"]) for row in metrics if row.get("env/reward_mean")] == [0, 1, 2, 3]
    assert len([row for row in metrics if row.get("val/monitor/positivity")]) == 2
    assert list(rows[0]) == ["step", *SAMPLE_COLUMNS]
    check_sample_rows(rows)


def test_a_logger_list_keeps_the_run_in_the_first_loggers_folder_and_resumes_there(file_loggers_run):
    folder, resumed = file_loggers_run
    first = folder / "logs" / "run" / "version_0"
    assert f"resumed from step 2 ({first / 'checkpoints' / 'last.ckpt'})" in resumed
    assert sorted(os.listdir(folder / "logs" / "run")) == ["version_0"]  # the run kept its folder
    assert (first / "checkpoints" / "epoch=0-step=4.ckpt").is_file()


@pytest.fixture(scope="module")
def tracker_run(tmp_path_factory):
    """configs/loggers/wandb.yaml and configs/loggers/mlflow.yaml together on the tiny config (in its folder, the
    MLflow overlay's relative paths too). Returns the folder."""
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("trackers")
    loggers = [yaml.safe_load(open(os.path.join(ROOT, "configs", "loggers", f"{name}.yaml")))["trainer"]["logger"]
               for name in ("wandb", "mlflow")]
    loggers[0]["init_args"]["save_dir"] = str(folder / "logs")
    path = logged_config(folder, loggers)
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            patch.setenv(variable, str(folder / "wandb-home"))
        patch.setenv("WANDB_SILENT", "true")
        patch.chdir(folder)
        assert main(["fit", "--config", path]) == 0
        wandb.finish()  # the CLI's process ends the run at exit; in-process, the test does
    return folder


def test_wandb_offline_run_read_back_with_wandbs_own_reader(tracker_run):
    (run,) = glob.glob(str(tracker_run / "logs" / "wandb" / "offline-run-*"))
    inspect = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "leet", "inspect", "--json", run],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    history = [json.loads(line)["history"]["item"] for line in inspect.stdout.splitlines()
               if json.loads(line).get("type") == "history"]
    steps_of = lambda key: [item["trainer/global_step"] for item in history if key in item]  # noqa: E731
    assert steps_of("env/reward_mean") == [0, 1, 2, 3]
    assert len(steps_of("val/monitor/positivity")) == 2
    for tag in HISTOGRAM_TAGS:
        assert steps_of(f"{tag}._type") == [0, 2], tag
        assert {item[f"{tag}._type"] for item in history if f"{tag}._type" in item} == {"histogram"}
    tables = [item for item in history if item.get(f"{SAMPLES_KEY}._type") == "table-file"]
    assert [item["trainer/global_step"] for item in tables] == [0, 2]
    rows = []
    for item in tables:
        with open(os.path.join(run, "files", item[f"{SAMPLES_KEY}.path"])) as handle:
            table = json.load(handle)
        assert table["columns"] == SAMPLE_COLUMNS
        rows += [{"step": item["trainer/global_step"], **dict(zip(table["columns"], row))} for row in table["data"]]
    check_sample_rows(rows)


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, runs


def test_mlflow_local_store_read_back_with_the_mlflow_client(tracker_run, monkeypatch):
    monkeypatch.chdir(tracker_run)  # the shipped overlay's store and artifacts are relative: lightning_logs/...
    assert os.path.isfile(tracker_run / "lightning_logs" / "mlflow.db")
    overlay = yaml.safe_load(open(os.path.join(ROOT, "configs", "loggers", "mlflow.yaml")))
    client, (run,) = mlflow_runs(overlay["trainer"]["logger"]["init_args"]["tracking_uri"], "flan-rlhf")
    history = client.get_metric_history(run.info.run_id, "env/reward_mean")
    assert [point.step for point in history] == [0, 1, 2, 3]
    assert len(client.get_metric_history(run.info.run_id, "val/monitor/positivity")) == 2
    assert "ppo/mean_non_score_reward" in run.data.metrics
    local = client.download_artifacts(run.info.run_id, "samples.json", str(tracker_run / "download"))
    assert local.startswith(str(tracker_run))
    with open(local) as handle:
        table = json.load(handle)
    assert table["columns"] == ["step", *SAMPLE_COLUMNS]
    check_sample_rows([dict(zip(table["columns"], row)) for row in table["data"]])
    assert glob.glob(str(tracker_run / "lightning_logs" / "mlflow-artifacts" / "*" / "artifacts" / "samples.json"))


def test_mlflow_file_store_one_line_when_refused_and_a_table_when_allowed(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import environment_variables

    from flan_rlhf.logger_outputs import log_samples

    store = f"file:{tmp_path / 'mlruns'}"
    if getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None) is not None:
        # MLflow 3.7+: the file store needs an opt-in; without it, one line before anything is built
        monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        logger = {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
                  "init_args": {"experiment_name": "tiny", "tracking_uri": store}}
        code, _, err = run_command("fit", "--config", tiny_config(tmp_path), "--trainer.logger", json.dumps(logger))
        assert code == 2
        (line,) = error_lines(err)
        assert "MLFLOW_ALLOW_FILE_STORE=true" in line and "sqlite:///" in line and store in line
        assert not os.path.exists(tmp_path / "mlruns") and not os.path.exists(tmp_path / "ckpt")
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    logger = MLFlowLogger(experiment_name="tiny", tracking_uri=store)
    assert log_samples([logger], ["prompt", "reward"], [["a", 0.5], ["b", 1.0]], step=0) == []
    assert log_samples([logger], ["prompt", "reward"], [["c", 0.0]], step=10) == []  # appended to the run's table
    client, (run,) = mlflow_runs(store, "tiny")
    with open(client.download_artifacts(run.info.run_id, "samples.json", str(tmp_path / "download"))) as handle:
        table = json.load(handle)
    assert table == {"columns": ["step", "prompt", "reward"], "data": [[0, "a", 0.5], [0, "b", 1.0], [10, "c", 0.0]]}


@pytest.mark.parametrize("class_name, package", [("WandbLogger", "wandb"), ("MLFlowLogger", "mlflow")])
def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, class_name, package):
    monkeypatch.setitem(sys.modules, package, None)  # importlib.util.find_spec now finds nothing, as when missing
    logger = {"class_path": f"lightning.pytorch.loggers.{class_name}", "init_args": {"save_dir": str(tmp_path / "logs")}}
    code, _, err = run_command("fit", "--config", tiny_config(tmp_path), "--trainer.logger", json.dumps(logger))
    assert code == 2
    (line,) = error_lines(err)
    assert f"pip install 'flan-rlhf[{package}]'" in line and class_name in line
    assert not os.path.exists(tmp_path / "logs") and not os.path.exists(tmp_path / "ckpt")


def test_a_monitor_named_like_the_training_reward_is_one_line(tmp_path):
    monitors = json.dumps([{"class_path": "flan_rlhf.rewards.ProfanityReward"}])  # the reward itself, watched
    code, _, err = run_command("fit", "--config", tiny_config(tmp_path), "--model.init_args.monitors", monitors)
    assert code == 2
    (line,) = error_lines(err)
    assert "monitor 'non_profanity' has the name of the training reward" in line
    assert not os.path.exists(tmp_path / "logs") and not os.path.exists(tmp_path / "ckpt")
