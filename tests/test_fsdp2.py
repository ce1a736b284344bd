"""Fully sharded training (FSDP2 through :class:`flan_rlhf.sharded_strategy.FSDP2Strategy`) on two CPU processes (gloo).

Each run is ``flan-rlhf fit`` of the tiny config in a subprocess (:func:`tests.test_ddp.ddp_fit`). The
sharded run must train what the DDP run of the same seeds trains (the same sampled texts, the same
adapter within float tolerance), hold half of every weight per process, write DDP's single-file
checkpoint, and resume from it exactly, also from a DDP checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.test_ddp import ddp_fit

FSDP2 = {"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}
STEPS = 4  # checkpoints at steps 2 and 4 (tiny_config: every_n_train_steps 2)


def recorder(folder) -> dict:
    return {"class_path": "tests.ddp_helpers.RankRolloutRecorder", "init_args": {"out_dir": str(folder / "ranks")}}


def ranks(folder) -> list[dict]:
    return [json.load(open(folder / "ranks" / f"rank{r}.json")) for r in (0, 1)]


def exported(folder) -> dict[str, torch.Tensor]:
    """The end-of-fit export's adapter and value-head tensors (value head: ``value_head.*``)."""
    tensors = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    if os.path.exists(folder / "adapter" / "value_head.safetensors"):
        tensors |= {f"value_head.{k}": v for k, v in load_file(str(folder / "adapter" / "value_head.safetensors")).items()}
    return tensors


def assert_close_exports(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:  # reduce-scatter and all-reduce sum in different orders: float rounding only
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert any(float(a[key].abs().max()) > 1e-3 for key in a if "lora_B" in key)  # trained (lora_B starts at 0)


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory):
    """The same PPO run under DDP and under FSDP2: ``{"ddp": folder, "fsdp2": folder}``."""
    folders = {}
    for name, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        folder = tmp_path_factory.mktemp(name)
        _, result = ddp_fit(folder, STEPS, recorder(folder), strategy=strategy)
        assert result.returncode == 0, result.stderr[-3000:]
        folders[name] = folder
    return folders


def test_fsdp2_trains_the_adapter_ddp_trains_with_half_of_each_weight_per_process(ppo_runs):
    ddp, fsdp2 = ranks(ppo_runs["ddp"]), ranks(ppo_runs["fsdp2"])
    # the sharded run sampled what DDP sampled, rollout by rollout (training and validation), on each rank:
    # generation under sharding used the whole weights
    for rank in (0, 1):
        assert fsdp2[rank]["prompts"] == ddp[rank]["prompts"]
        assert fsdp2[rank]["texts"] == ddp[rank]["texts"] and len(ddp[rank]["texts"]) > STEPS
    assert fsdp2[0]["texts"] != fsdp2[1]["texts"]  # each process its own prompts
    assert_close_exports(exported(ppo_runs["fsdp2"]), exported(ppo_runs["ddp"]))
    assert fsdp2[0]["weights"] == fsdp2[1]["weights"]  # the gathered adapters agree across processes
    # every parameter - frozen base, LoRA, value head - is split between the two along dim 0
    for name, (local, whole) in fsdp2[0]["shards"].items():
        assert local + fsdp2[1]["shards"][name][0] == whole, name
    held = sum(local for local, _ in fsdp2[0]["shards"].values()) / sum(whole for _, whole in fsdp2[0]["shards"].values())
    assert 0.45 < held < 0.55, held
    assert any("value_head" in name for name in fsdp2[0]["shards"])
    assert all(local == whole for local, whole in ddp[0]["shards"].values())  # DDP: every process holds it all
    # DDP's outputs: one file per checkpoint, written once; the export from process 0
    assert sorted(os.listdir(ppo_runs["fsdp2"] / "ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert all(os.path.isfile(ppo_runs["fsdp2"] / "ckpt" / name) for name in os.listdir(ppo_runs["fsdp2"] / "ckpt"))


def test_fsdp2_checkpoint_resumes_exactly_and_a_ddp_checkpoint_resumes_under_fsdp2(ppo_runs, tmp_path):
    for source, exact in (("fsdp2", True), ("ddp", False)):
        folder = tmp_path / f"from_{source}"
        folder.mkdir()
        ckpt = shutil.copy(ppo_runs[source] / "ckpt" / "epoch=0-step=2.ckpt", folder / "step2.ckpt")
        _, result = ddp_fit(folder, STEPS, strategy=FSDP2, ckpt_path=str(ckpt))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Restored all states from the checkpoint" in result.stdout + result.stderr
        # resumed FSDP2 == uninterrupted FSDP2, bit for bit from its own checkpoint
        assert_close_exports(exported(folder), exported(ppo_runs["fsdp2"]), exact=exact)


@pytest.mark.parametrize("class_name", ["GRPOModule"])
def test_critic_free_fsdp2_trains_what_ddp_trains(tmp_path, class_name):
    """GRPO (RLOO is the same module class with another baseline) has no value head: its units are the blocks
    and the base. Both runs go through transformers' forward (sharded weights never take the fused T5
    kernels): with the tiny reward most groups have no reward spread, so whole minibatches have gradients
    of rounding size, which Adam scales up to learning-rate-sized steps, and the fused kernels' different
    rounding then moves the adapter by ~4e-3 within two iterations."""
    settings = {"learning_rate": 1e-3, "mini_batch_size": 6, "samples_per_prompt": 3}
    runs = {}
    for name, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        folder = tmp_path / name
        folder.mkdir()
        _, result = ddp_fit(folder, 2, recorder(folder), critic_free=(class_name, settings), strategy=strategy,
                            fused_kernels=False)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = folder
    assert [rank["texts"] for rank in ranks(runs["fsdp2"])] == [rank["texts"] for rank in ranks(runs["ddp"])]
    assert_close_exports(exported(runs["fsdp2"]), exported(runs["ddp"]))
    assert not any("value_head" in name for name in ranks(runs["fsdp2"])[0]["shards"])
