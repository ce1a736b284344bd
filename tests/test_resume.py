"""A run that dies and is resumed ends like a run that was never interrupted (issue 7, "Resume").

* In-process: ``lightning.Trainer`` + :class:`flan_rlhf.module.PPOModule`. The run crashes at a
  chosen point (:class:`tests.resume_helpers.CrashAt`, or a reward that raises inside
  ``training_step``), then a fresh module and Trainer resume from the checkpoint and finish.
  Trainable weights, Adam moments, global step, LR scheduler, KL controller, reward-shaper
  moments and every resumed iteration's logged metrics must equal an uninterrupted run's.
* One real kill: a tiny ``python -m flan_rlhf.cli fit`` SIGKILLs itself right after iteration 3's
  checkpoint (:class:`tests.resume_helpers.KillAfterStep` in its YAML: no race with the test
  process), its newest checkpoints are then cut short, and ``--ckpt_path last`` must report
  them, fall back, and end bit-for-bit like an uninterrupted run. The uninterrupted run and the
  resume go through ``cli.main`` in this process; the victim subprocess runs this checkout
  (``PYTHONPATH``), not whatever the virtualenv's editable install points at.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from flan_rlhf.checkpointing import AtomicCheckpointIO, newest_complete_checkpoint, read_checkpoint_file
from flan_rlhf.data import PromptDataModule
from flan_rlhf.critic_free import GRPOModule, RLOOModule
from flan_rlhf.module import PPOModule
from tests.conftest import TokenFractionReward, as_critic_free, run_command, shrunk_tiny_config
from tests.resume_helpers import CrashAt, SimulatedCrash
from tests.test_checkpointing import cut_in_half
from tests.test_critic_free import make as make_critic_free  # what a non-atomic save killed midway would leave
from tests.test_module import MetricsRecorder, make_module, trainable_copy

REPO_ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-6


def read(path: Path) -> dict:
    """The checkpoint at ``path``, loaded the safe way (``weights_only``; numpy arrays allowed)."""
    return read_checkpoint_file(str(path))


def max_abs_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(((x.double() - b[k].double()).abs().max().item() for k, x in a.items() if x.numel()), default=0.0)


def step_files(last_step: int) -> list[str]:
    """The names ``ModelCheckpoint`` writes for iterations ``1..last_step`` (one per iteration) and ``last.ckpt``."""
    return [f"epoch=0-step={step}.ckpt" for step in range(1, last_step + 1)] + ["last.ckpt"]


# ====================================================================== in-process
STEPS = 4  # PPO iterations of the in-process runs
CRASH_STEP = 2  # they crash right after this iteration's checkpoint, or inside the next iteration


class Recorder(MetricsRecorder):
    """:class:`MetricsRecorder` that also notes ``global_step`` when training starts (after a restore)."""

    start_step: int | None = None

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step


class CrashingReward(TokenFractionReward):
    """Raises :class:`SimulatedCrash` on call number ``crash_on_call`` (1-based; one call per PPO
    iteration, in its rollout: mid-``training_step``, before any of the iteration's updates)."""

    def __init__(self, crash_on_call: int):
        super().__init__()
        self.crash_on_call, self.calls = crash_on_call, 0

    def components(self, prompts, responses):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise SimulatedCrash(f"reward crashed on call {self.calls}")
        return super().components(prompts, responses)


def train(ckpt_dir: Path, callbacks=(), reward=None, ckpt_path: str | None = None, build=make_module,
          ) -> tuple[PPOModule, L.Trainer, Recorder]:
    """``STEPS`` iterations of a fresh module from ``build`` (``make_module``: PPO) on the builtin prompts
    (batches of 8; the stream restarts at batch ``global_step`` on resume) with a checkpoint every
    iteration in ``ckpt_dir`` (atomic writes, as the CLI's); ``ckpt_path`` resumes. Adaptive KL with a
    short horizon and reward normalisation make the KL coefficient and the shaper's moments move
    every iteration, so losing either on resume changes them (and the weights)."""
    module = build(reward=reward, truncate_prompt_tokens=64, adaptive_kl=True, kl_horizon=200, score_normalize=True)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        plugins=[AtomicCheckpointIO()], callbacks=[*callbacks, recorder, checkpoint])
    data = PromptDataModule(builtin="tiny", template="summarize_dialogue", batch_size=8)
    L.seed_everything(0, verbose=False)  # LoRA / value-head init; a resumed run's is replaced by the checkpoint's
    # weights_only=False: a module built in Python keeps its settings dataclasses in its hyper-parameters
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=False)
    return module, trainer, recorder


def optimizer_tensors(optimizer_state: dict) -> dict[str, torch.Tensor]:
    """AdamW moments and step counts of every parameter, keyed ``param/moment``, from an optimiser
    ``state_dict()`` (live, or a checkpoint's ``optimizer_states[i]``)."""
    state = optimizer_state["state"]
    return {f"{p}/{k}": v.clone() for p, moments in state.items() for k, v in moments.items() if torch.is_tensor(v)}


def final_state(module: PPOModule, trainer: L.Trainer) -> dict:
    """What a resume must carry over, read from the live objects after ``fit``."""
    return {
        "global_step": trainer.global_step,
        "weights": trainable_copy(module),
        "adam": optimizer_tensors(trainer.optimizers[0].state_dict()),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "kl_controller": module.kl_controller.state_dict(),
        "shaper": module.shaper.state_dict(),
    }


def iteration_metrics(recorder: Recorder) -> list[dict[str, float]]:
    """The metrics each iteration logged, without its wall-clock timings."""
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in recorder.rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[dict[str, float]]]:
    """The final state and per-iteration metrics of a run that was never interrupted."""
    module, trainer, recorder = train(tmp_path_factory.mktemp("uninterrupted") / "ckpt")
    assert recorder.start_step == 0 and len(recorder.rows) == STEPS
    return final_state(module, trainer), iteration_metrics(recorder)


def assert_resumed_like_uninterrupted(module: PPOModule, trainer: L.Trainer, recorder: Recorder, uninterrupted) -> None:
    """The resumed run started at ``CRASH_STEP``, each of its iterations logged what the
    uninterrupted run's did, and it ended in the same state."""
    straight, straight_metrics = uninterrupted
    assert recorder.start_step == CRASH_STEP, "global_step restored"
    resumed_metrics = iteration_metrics(recorder)
    assert len(resumed_metrics) == STEPS - CRASH_STEP
    for iteration, (row, expected) in enumerate(zip(resumed_metrics, straight_metrics[CRASH_STEP:]), CRASH_STEP + 1):
        assert row == pytest.approx(expected, abs=TOLERANCE), f"iteration {iteration}'s metrics"

    resumed = final_state(module, trainer)
    assert resumed["global_step"] == straight["global_step"] == STEPS
    difference = max_abs_difference(resumed["weights"], straight["weights"])
    assert difference <= TOLERANCE, f"trainable weights: max abs difference {difference}"
    assert straight["adam"] and resumed["adam"].keys() == straight["adam"].keys()
    difference = max_abs_difference(resumed["adam"], straight["adam"])
    assert difference <= TOLERANCE, f"Adam moments and step counts: max abs difference {difference}"
    assert resumed["scheduler"] == straight["scheduler"]
    assert resumed["kl_controller"] == pytest.approx(straight["kl_controller"], abs=TOLERANCE)
    shaper, expected = resumed["shaper"], straight["shaper"]
    assert shaper["moments"] == pytest.approx(expected["moments"], abs=TOLERANCE), "reward-shaper moments"
    assert shaper["pending"] == expected["pending"]


def test_crash_right_after_a_checkpoint_then_resume_last_matches_uninterrupted_run(tmp_path, uninterrupted):
    """Crash as iteration 3 starts, right after iteration 2's checkpoint; ``ckpt_path="last"``
    resumes at step 2 and the run ends like the uninterrupted one."""
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(SimulatedCrash, match="on_train_batch_start at global_step 2"):
        train(ckpt_dir, callbacks=[CrashAt(CRASH_STEP, "on_train_batch_start")])
    assert sorted(os.listdir(ckpt_dir)) == step_files(CRASH_STEP)

    assert_resumed_like_uninterrupted(*train(ckpt_dir, ckpt_path="last"), uninterrupted)


@pytest.mark.parametrize("where", ["after_its_update", "in_its_rollout"])
def test_crash_inside_an_iteration_before_its_checkpoint_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted, where):
    """Crash inside iteration 3, before its checkpoint: after its update, in ``on_train_batch_end``
    (which runs before ``ModelCheckpoint``'s, so the weights, Adam and the KL controller have moved
    past the newest checkpoint), or in its rollout (the reward raises inside ``training_step``).
    Resuming from iteration 2's checkpoint redoes iteration 3 and ends like the uninterrupted run."""
    ckpt_dir = tmp_path / "ckpt"
    if where == "after_its_update":
        crash_run, message = {"callbacks": [CrashAt(CRASH_STEP + 1, "on_train_batch_end")]}, "global_step 3"
    else:
        crash_run, message = {"reward": CrashingReward(crash_on_call=CRASH_STEP + 1)}, "reward crashed on call 3"
    with pytest.raises(SimulatedCrash, match=message):
        train(ckpt_dir, **crash_run)
    assert sorted(os.listdir(ckpt_dir)) == step_files(CRASH_STEP)  # no step-3 file, no partial write

    assert_resumed_like_uninterrupted(*train(ckpt_dir, ckpt_path=str(ckpt_dir / f"epoch=0-step={CRASH_STEP}.ckpt")),
                                      uninterrupted)


@pytest.mark.parametrize("cls", [RLOOModule, GRPOModule])
def test_critic_free_modules_resume_exactly_after_a_crash_inside_an_iteration(tmp_path, cls):
    """RLOO and GRPO (4 responses per prompt, KL as a loss for GRPO) crash inside iteration 3 after
    its update; resuming from iteration 2's checkpoint ends like their uninterrupted run: weights,
    Adam, scheduler, KL controller, shaper and every resumed iteration's metrics."""
    def build(**kwargs):
        return make_critic_free(cls, **kwargs)

    crash_inside_an_iteration_then_resume(tmp_path, build, "group/reward_std")  # the group statistics compared too


def crash_inside_an_iteration_then_resume(tmp_path: Path, build, logged_key: str) -> None:
    """A run of ``build``'s module crashes inside iteration 3 after its update; resumed from iteration 2's
    checkpoint it must end like its uninterrupted run (whose metrics include ``logged_key``)."""
    straight_run = train(tmp_path / "straight", build=build)
    uninterrupted = final_state(*straight_run[:2]), iteration_metrics(straight_run[2])
    assert logged_key in uninterrupted[1][-1]
    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(SimulatedCrash, match="global_step 3"):
        train(ckpt_dir, callbacks=[CrashAt(CRASH_STEP + 1, "on_train_batch_end")], build=build)
    assert_resumed_like_uninterrupted(*train(ckpt_dir, ckpt_path=str(ckpt_dir / f"epoch=0-step={CRASH_STEP}.ckpt"),
                                             build=build), uninterrupted)


# ====================================================================== one real kill
MAX_STEPS = 6
KILL_AFTER_STEP = 3
RUN_TIMEOUT_S = 300


def resume_config(run_dir: Path, kill_after_step: int | None = None, critic_free: tuple[str, dict] | None = None,
                  config: dict | None = None) -> Path:
    """``configs/tiny.yaml`` shrunk (batch 8, 8 new tokens, 6 iterations), a checkpoint every
    iteration, validation every 3 iterations, and every output under ``run_dir``, written to
    ``run_dir/tiny.yaml`` (``critic_free = (class name, settings)``: RLOO or GRPO instead of PPO; ``config``:
    this training config instead, already shrunk).
    With ``kill_after_step``, also a copy that SIGKILLs itself right after that iteration's
    checkpoint, ``run_dir/victim.yaml`` (returned)."""
    if config is None:
        config = shrunk_tiny_config(run_dir, max_new_tokens=8, max_steps=MAX_STEPS, val_check_interval=3)
    if critic_free is not None:
        as_critic_free(config, *critic_free)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    if kill_after_step is not None:
        config["trainer"]["callbacks"].append(
            {"class_path": "tests.resume_helpers.KillAfterStep", "init_args": {"step": kill_after_step}})
        path = run_dir / "victim.yaml"
        path.write_text(yaml.safe_dump(config))
    return path


def fit_env() -> dict[str, str]:
    """The environment of a ``fit`` subprocess: one thread, offline, unbuffered, with this checkout's
    ``flan_rlhf`` and ``tests`` importable (not whatever the virtualenv's editable install points at)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def start_fit(run_dir: Path, tag: str, config: str = "tiny.yaml", *extra: str) -> subprocess.Popen:
    """``python -m flan_rlhf.cli fit --config run_dir/<config> ...`` in a subprocess (:func:`fit_env`), output
    to ``run_dir/<tag>.out`` and ``.err``."""
    return subprocess.Popen(
        [sys.executable, "-m", "flan_rlhf.cli", "fit", "--config", str(run_dir / config), *extra],
        cwd=run_dir, env=fit_env(),
        stdout=open(run_dir / f"{tag}.out", "w"), stderr=open(run_dir / f"{tag}.err", "w"),
    )


def wait_until_training(process: subprocess.Popen, run_dir: Path, tag: str, max_steps: int, timeout_s: float = 300) -> None:
    """Block until the ``fit`` of :func:`start_fit` reports a finished step (``step N/max_steps`` on its
    stderr), failing the test if it ends or takes longer than ``timeout_s`` first."""
    err_path, deadline = run_dir / f"{tag}.err", time.monotonic() + timeout_s
    while not re.search(rf"step [1-9]\d*/{max_steps}\b", err_path.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, err_path.read_text()[-3000:]
        time.sleep(0.2)


def output_of(run_dir: Path, tag: str) -> str:
    return (run_dir / f"{tag}.out").read_text() + (run_dir / f"{tag}.err").read_text()


def fit_in_process(run_dir: Path, monkeypatch, *extra: str) -> tuple[str, str]:
    """``flan-rlhf fit --config run_dir/tiny.yaml ...`` in this process (``cli.main``, from ``run_dir``):
    ``(stdout, stderr)``, failing the test with them if it failed."""
    monkeypatch.chdir(run_dir)
    code, out, err = run_command("fit", "--config", str(run_dir / "tiny.yaml"), *extra)
    assert code == 0, f"fit {' '.join(extra)} exited with {code}:\n{(out + err)[-4000:]}"
    return out, err


def straight_and_killed_runs(tmp_path: Path, monkeypatch, critic_free: tuple[str, dict] | None = None,
                             make_config=None) -> tuple[Path, Path]:
    """An uninterrupted run (in this process) beside a victim ``fit`` subprocess that SIGKILLs itself
    right after iteration ``KILL_AFTER_STEP``'s checkpoint; returns their folders once both ended.
    ``make_config(run_dir)``: the training config of each run (default: the shrunk tiny PPO config)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    resume_config(straight, critic_free=critic_free, config=make_config and make_config(straight))
    resume_config(killed, kill_after_step=KILL_AFTER_STEP, critic_free=critic_free,
                  config=make_config and make_config(killed))
    victim = start_fit(killed, "victim", "victim.yaml")
    try:
        fit_in_process(straight, monkeypatch)
        code = victim.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert code == -signal.SIGKILL, f"fit exited with {code}, not by its SIGKILL:\n{output_of(killed, 'victim')[-4000:]}"
    assert not (killed / "adapter").exists(), "the killed run must not have finished"
    return straight, killed


def assert_same_end(straight: Path, killed: Path, exported: tuple[str, ...]) -> None:
    """The two runs' ``exported`` files agree to ``TOLERANCE``, and so do their final checkpoints:
    weights, Adam moments, scheduler, KL controller, reward shaper; the adapter trained."""
    for name in exported:
        difference = max_abs_difference(load_file(straight / "adapter" / name), load_file(killed / "adapter" / name))
        assert difference <= TOLERANCE, f"{name}: max abs difference {difference}"
    a, b = read(straight / "ckpt" / "last.ckpt"), read(killed / "ckpt" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert max_abs_difference(a["state_dict"], b["state_dict"]) <= TOLERANCE
    assert max_abs_difference(optimizer_tensors(a["optimizer_states"][0]), optimizer_tensors(b["optimizer_states"][0])) <= TOLERANCE
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == MAX_STEPS
    assert a["flan_rlhf"]["kl_controller"] == b["flan_rlhf"]["kl_controller"]
    assert a["flan_rlhf"]["shaper"] == b["flan_rlhf"]["shaper"]
    # A run that trained at all: the adapter moved away from its initialisation (lora_B starts at 0).
    lora_b = [v for k, v in load_file(killed / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and max(v.abs().max().item() for v in lora_b) > 0


@pytest.mark.timeout(900)
def test_sigkill_mid_run_then_resume_last_matches_uninterrupted_run(tmp_path, monkeypatch):
    """The victim, a real ``fit`` process, SIGKILLs itself right after iteration 3's checkpoint; cut
    the newest checkpoints in half and leave a partial write behind (a kill during a save, had
    writes not been atomic); ``--ckpt_path last`` must report them, resume from the newest
    complete one, and end bit-for-bit like an uninterrupted run.

    The uninterrupted run and the resume go through the same entry point (``cli.main``) in this
    process: the first while the victim runs (two cores), the second from nothing but the files
    the victim left. That saves two interpreter start-ups (~8 s of imports each) over subprocesses."""
    straight, killed = straight_and_killed_runs(tmp_path, monkeypatch)
    ckpt_dir = killed / "ckpt"
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == step_files(KILL_AFTER_STEP)
    newest, rejected = newest_complete_checkpoint(str(ckpt_dir))
    assert newest is not None and not rejected, rejected
    assert read(Path(newest))["global_step"] == KILL_AFTER_STEP, newest

    corrupt = [ckpt_dir / "last.ckpt", ckpt_dir / f"epoch=0-step={KILL_AFTER_STEP}.ckpt"]
    for path in corrupt:
        cut_in_half(path)
    leftover = ckpt_dir / f"epoch=0-step={KILL_AFTER_STEP + 1}.ckpt.tmp-99999"
    leftover.write_bytes(b"PK\x03\x04 half-written")
    fallback = ckpt_dir / f"epoch=0-step={KILL_AFTER_STEP - 1}.ckpt"
    resumed_output, resumed_err = fit_in_process(killed, monkeypatch, "--ckpt_path", "last")

    said = re.findall(r"resumed from step (\d+) \((.+?)\)", resumed_output + resumed_err)  # once, on either stream
    assert said == [(str(KILL_AFTER_STEP - 1), str(fallback))], resumed_output[-2000:]
    reported = resumed_err.splitlines()
    for path in corrupt:
        line = f"checkpoint {path} is incomplete or corrupt (file is truncated or not a torch checkpoint); trying the previous one"
        assert reported.count(line) == 1, reported[:20]
    assert reported.count(f"ignoring {leftover} (an interrupted write; safe to delete)") == 1

    assert_same_end(straight, killed, ("adapter_model.safetensors", "value_head.safetensors"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("class_name", ["RLOOModule", "GRPOModule"])
def test_critic_free_sigkill_then_resume_last_matches_uninterrupted_run(tmp_path, monkeypatch, class_name):
    """RLOO / GRPO (3 responses per prompt, adaptive KL, reward normalisation): a real ``fit`` process
    SIGKILLs itself right after iteration 3's checkpoint; ``--ckpt_path last`` resumes from it and the
    run ends like an uninterrupted one: adapter, weights, Adam, scheduler, KL controller, shaper.
    (Corrupt checkpoints and partial writes are the shared code's, tested above on PPO.)"""
    settings = {"samples_per_prompt": 3, "learning_rate": 1e-3, "mini_batch_size": 8, "ppo_epochs": 2,
                "adaptive_kl": True, "kl_horizon": 200, "score_normalize": True}
    straight, killed = straight_and_killed_runs(tmp_path, monkeypatch, critic_free=(class_name, settings))
    resumed_output, resumed_err = fit_in_process(killed, monkeypatch, "--ckpt_path", "last")
    said = re.findall(r"resumed from step (\d+)", resumed_output + resumed_err)
    assert said == [str(KILL_AFTER_STEP)], resumed_output[-2000:]

    assert not (killed / "adapter" / "value_head.safetensors").exists()
    assert_same_end(straight, killed, ("adapter_model.safetensors",))


# ====================================================================== DPO
def test_online_dpo_resumes_exactly_after_a_crash_inside_an_iteration(tmp_path):
    """Online DPO (4 samples per prompt, two passes in minibatches of 4 pairs) crashes inside iteration 3
    after its update; resuming from iteration 2's checkpoint ends like its uninterrupted run."""
    from tests.test_dpo_module import make as make_dpo

    def build(reward=None, truncate_prompt_tokens=512, adaptive_kl=None, kl_horizon=None, score_normalize=None):
        # DPO has no adaptive KL or reward shaping (its KL strength is beta; rewards only rank samples)
        return make_dpo(reward or TokenFractionReward(), truncate_prompt_tokens=truncate_prompt_tokens,
                        ppo_epochs=2, mini_batch_size=4)

    crash_inside_an_iteration_then_resume(tmp_path, build, "rewards/margins")  # the DPO statistics compared too


def stored_pairs_config(run_dir: Path) -> dict:
    """``configs/dpo_tiny.yaml`` on a preference file written here (batches of 16 of ~86 training pairs), no
    logger, ``MAX_STEPS`` steps, validation every 3, a checkpoint every step in ``run_dir/ckpt``, the adapter
    exported to ``run_dir/adapter``."""
    import json

    from flan_rlhf.reward_model.synthetic import make_preference_pairs

    run_dir.mkdir(parents=True, exist_ok=True)
    pairs = run_dir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in make_preference_pairs(96, seed=3)))
    config = yaml.safe_load((REPO_ROOT / "configs" / "dpo_tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, max_steps=MAX_STEPS, val_check_interval=3, limit_val_batches=1)
    checkpoint = trainer["callbacks"][0]
    checkpoint["init_args"].update(dirpath=str(run_dir / "ckpt"), every_n_train_steps=1)
    config["model"]["init_args"]["export_dir"] = str(run_dir / "adapter")
    config["data"] = {"class_path": "flan_rlhf.reward_model.PreferenceDataModule",
                      "init_args": {"dataset": str(pairs), "prompt_column": "prompt", "val_split": None,
                                    "val_fraction": 0.1, "batch_size": 16, "stream": True}}
    return config


@pytest.mark.timeout(900)
def test_dpo_on_stored_pairs_sigkill_then_resume_last_matches_uninterrupted_run(tmp_path, monkeypatch):
    """DPO on a preference file (configs/dpo_tiny.yaml with PreferenceDataModule's endless stream): a real
    ``fit`` process SIGKILLs itself right after step 3's checkpoint; ``--ckpt_path last`` resumes at step 3
    of the pair stream and the run ends bit-for-bit like an uninterrupted one: adapter, weights, Adam,
    scheduler (6 steps of 16 pairs cross into the stream's second shuffled pass)."""
    straight, killed = straight_and_killed_runs(tmp_path, monkeypatch, make_config=stored_pairs_config)
    resumed_output, resumed_err = fit_in_process(killed, monkeypatch, "--ckpt_path", "last")
    said = re.findall(r"resumed from step (\d+)", resumed_output + resumed_err)
    assert said == [str(KILL_AFTER_STEP)], resumed_output[-2000:]
    assert not (killed / "adapter" / "value_head.safetensors").exists()
    assert_same_end(straight, killed, ("adapter_model.safetensors",))
