"""Two DDP processes on CPU (gloo): both roll out their own prompts, weights stay in sync, one writes."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import as_critic_free
from tests.ddp_helpers import FSDP2, assert_close_exports, exported, ranks, recorder
from tests.test_cli import ROOT, tiny_config


def ddp_fit(tmp_path, max_steps: int, *callbacks: dict, critic_free: tuple[str, dict] | None = None,
            strategy: str | dict = "ddp", ckpt_path: str | None = None, **model_options
            ) -> tuple[dict, subprocess.CompletedProcess]:
    """``flan-rlhf fit`` of the tiny config on two processes (gloo) under ``strategy`` (DDP, or e.g. FSDP2's
    class_path dict), with ``callbacks`` added and, with ``critic_free = (class name, settings)``, RLOO or
    GRPO instead of PPO, ``model_options`` set in the model's init_args, resuming from ``ckpt_path`` if
    given: ``(config, finished process)``; the config is ``tmp_path/ddp.yaml``."""
    config = yaml.safe_load(open(tiny_config(tmp_path)))
    if critic_free is not None:
        as_critic_free(config, *critic_free)
    config["model"]["init_args"].update(model_options)
    config["trainer"].update(devices=2, strategy=strategy, max_steps=max_steps, val_check_interval=3, limit_val_batches=1)
    config["trainer"]["callbacks"] += list(callbacks)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    resume = ["--ckpt_path", ckpt_path] if ckpt_path else []
    return config, subprocess.run([sys.executable, "-m", "flan_rlhf.cli", "fit", "--config", str(config_path), *resume],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


PPO_STEPS = 4  # checkpoints at steps 2 and 4 (tiny_config: every_n_train_steps 2)


def test_tiny_fit_with_two_ddp_processes(ppo_runs):
    config, result, folder = ppo_runs["ddp"]
    rank_files = ranks(folder)
    assert all(rank["global_step"] == PPO_STEPS for rank in rank_files)  # PPO iterations on each process
    batch_size = config["data"]["init_args"]["batch_size"]
    assert all(len(rank["prompts"]) == PPO_STEPS * batch_size for rank in rank_files)  # both rolled out
    assert rank_files[0]["prompts"] != rank_files[1]["prompts"]  # their own (disjoint) slices of each global batch
    # gradients were all-reduced: the adapters are identical on both processes
    assert rank_files[0]["weights"] == rank_files[1]["weights"]
    assert any(value > 0 for key, value in rank_files[0]["weights"].items() if "lora_B" in key)

    # only rank 0 writes: one TensorBoard run, one set of checkpoints, one adapter export
    event_files = glob.glob(str(folder / "logs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(event_files) == 1
    assert sorted(os.listdir(folder / "ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert os.path.exists(folder / "adapter" / "adapter_model.safetensors")
    # one closing summary, from process 0
    assert result.stdout.count(f"fit: {PPO_STEPS}/{PPO_STEPS} steps in ") == 1, result.stdout[-2000:]
    assert f"  checkpoints: {folder / 'ckpt'} (newest: {folder / 'ckpt' / 'last.ckpt'})" in result.stdout


@pytest.mark.parametrize("strategy", ["ddp", FSDP2], ids=["ddp", "fsdp2"])
def test_sigterm_on_one_ddp_process_stops_every_rank_at_the_same_iteration(tmp_path, strategy):
    """Rank 1 alone receives SIGTERM during iteration 2: both ranks finish it, write one checkpoint
    together (under FSDP2 too: its save gathers on every rank), and exit 143; process 0 prints the one line."""
    _, result = ddp_fit(
        tmp_path, 6, {"class_path": "tests.resume_helpers.SignalAt", "init_args": {"step": 1, "signum": 15, "rank": 1}},
        {"class_path": "tests.ddp_helpers.RankStopRecorder", "init_args": {"out_dir": str(tmp_path / "ranks")}},
        strategy=strategy)
    config_path = tmp_path / "ddp.yaml"
    assert result.returncode == 143, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / "ranks" / f"rank{r}.json")) for r in (0, 1)]
    assert ranks == [{"exception": "RunInterrupted", "global_step": 2}] * 2
    stopped = [line for line in result.stderr.splitlines() if line.startswith("stopped by")]
    assert stopped == [f"stopped by SIGTERM after iteration 2 of 6, checkpointed in {tmp_path / 'ckpt' / 'epoch=0-step=2.ckpt'} "
                       f"- continue with: flan-rlhf fit --config {config_path} --ckpt_path last"], result.stderr[-3000:]
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("class_name", ["RLOOModule", "GRPOModule", "DPOModule"])
def test_critic_free_modules_keep_each_group_on_the_rank_that_drew_its_prompt(tmp_path, class_name):
    """RLOO / GRPO / online DPO on two DDP processes: each process samples its own prompts' k responses (its
    rollout rows are its batch prompts, each k times in a row), the groups of the two ranks differ, and the
    all-reduced adapters end identical and trained (DPO: every rank makes the same passes although its
    number of untied groups differs).

    GRPO and DPO (whose one encoder pass per prompt calls the encoder on its own, with gradients) then run
    again under FSDP2 and must sample the same texts and train the same adapter. Both runs go through
    transformers' forward (sharded weights never take the fused T5 kernels): with the tiny reward most
    groups have no reward spread, so whole minibatches have gradients of rounding size, which Adam scales
    up to learning-rate-sized steps, and the fused kernels' other rounding moves the adapter by ~4e-3 in
    two iterations (measured)."""
    k = 3
    settings = {"learning_rate": 1e-3, "mini_batch_size": 6, "samples_per_prompt": k}
    ddp = tmp_path / "ddp"
    ddp.mkdir()
    config, result = ddp_fit(ddp, 2, recorder(ddp), critic_free=(class_name, settings), fused_kernels=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rank_files = ranks(ddp)
    batch_size = config["data"]["init_args"]["batch_size"]
    for rank in rank_files:
        assert rank["global_step"] == 2 and len(rank["rollout_rows"]) == 2
        batches = [rank["prompts"][i * batch_size:(i + 1) * batch_size] for i in range(2)]
        for batch, rows in zip(batches, rank["rollout_rows"]):
            assert rows == [prompt for prompt in batch for _ in range(k)]
    assert rank_files[0]["prompts"] != rank_files[1]["prompts"]
    assert rank_files[0]["weights"] == rank_files[1]["weights"]
    assert any(value > 0 for name, value in rank_files[0]["weights"].items() if "lora_B" in name)
    assert not any("value_head" in name for name in rank_files[0]["weights"])
    assert os.path.exists(ddp / "adapter" / "adapter_model.safetensors")
    assert not os.path.exists(ddp / "adapter" / "value_head.safetensors")
    if class_name == "RLOOModule":  # GRPO's module class with another baseline
        return
    fsdp2 = tmp_path / "fsdp2"
    fsdp2.mkdir()
    _, result = ddp_fit(fsdp2, 2, recorder(fsdp2), critic_free=(class_name, settings), strategy=FSDP2, fused_kernels=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [rank["texts"] for rank in ranks(fsdp2)] == [rank["texts"] for rank in rank_files]
    assert_close_exports(exported(fsdp2), exported(ddp))
    assert not any("value_head" in name for name in ranks(fsdp2)[0]["shards"])
