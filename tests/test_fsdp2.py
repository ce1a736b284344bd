"""Fully sharded training (FSDP2 through :class:`flan_rlhf.sharded_strategy.FSDP2Strategy`) on two CPU processes (gloo).

Each run is ``flan-rlhf fit`` of the tiny config in a subprocess (:func:`tests.test_ddp.ddp_fit`). The
sharded PPO run must train what the DDP run of the same seeds trains (the same sampled texts, the same
adapter and value head within float tolerance), hold half of every weight per process, write DDP's
single-file checkpoint, and resume from it exactly. GRPO and online DPO under FSDP2 are compared with
their DDP runs in tests/test_ddp.py.
"""
from __future__ import annotations

import os
import shutil

import torch

from tests.ddp_helpers import FSDP2, assert_close_exports, exported, ranks
from tests.test_ddp import PPO_STEPS, ddp_fit


def test_fsdp2_trains_the_adapter_ddp_trains_with_half_of_each_weight_per_process(ppo_runs):
    folders = {name: folder for name, (_, _, folder) in ppo_runs.items()}
    ddp, fsdp2 = ranks(folders["ddp"]), ranks(folders["fsdp2"])
    # the sharded run sampled what DDP sampled, rollout by rollout (training and validation), on each rank:
    # generation under sharding used the whole weights
    for rank in (0, 1):
        assert fsdp2[rank]["prompts"] == ddp[rank]["prompts"]
        assert fsdp2[rank]["texts"] == ddp[rank]["texts"] and len(ddp[rank]["texts"]) > PPO_STEPS
    assert fsdp2[0]["texts"] != fsdp2[1]["texts"]  # each process its own prompts
    assert_close_exports(exported(folders["fsdp2"]), exported(folders["ddp"]))
    assert fsdp2[0]["weights"] == fsdp2[1]["weights"]  # the gathered adapters agree across processes
    # every parameter - frozen base, LoRA, value head - is split between the two along dim 0
    for name, (local, whole) in fsdp2[0]["shards"].items():
        assert local + fsdp2[1]["shards"][name][0] == whole, name
    held = sum(local for local, _ in fsdp2[0]["shards"].values()) / sum(whole for _, whole in fsdp2[0]["shards"].values())
    assert 0.45 < held < 0.55, held
    assert any("value_head" in name for name in fsdp2[0]["shards"])
    assert all(local == whole for local, whole in ddp[0]["shards"].values())  # DDP: every process holds it all
    # DDP's outputs: one file per checkpoint, written once; the export from process 0
    assert sorted(os.listdir(folders["fsdp2"] / "ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "last.ckpt"]
    assert all(os.path.isfile(folders["fsdp2"] / "ckpt" / name) for name in os.listdir(folders["fsdp2"] / "ckpt"))


def test_fsdp2_checkpoint_is_ddps_format_and_resumes_exactly(ppo_runs, tmp_path):
    folders = {name: folder for name, (_, _, folder) in ppo_runs.items()}
    sharded, plain = (torch.load(folders[name] / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
                      for name in ("fsdp2", "ddp"))
    # the same tensors under the same names and shapes, the optimizer state keyed by the same positions
    assert {k: v.shape for k, v in sharded["state_dict"].items()} == {k: v.shape for k, v in plain["state_dict"].items()}
    for saved in (sharded, plain):
        assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())  # whole tensors, not shards
    optimizers = [saved["optimizer_states"][0] for saved in (sharded, plain)]
    assert optimizers[0]["param_groups"][0]["params"] == optimizers[1]["param_groups"][0]["params"]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in optimizers[0]["state"].items()} == \
           {i: {k: v.shape for k, v in s.items()} for i, s in optimizers[1]["state"].items()}
    torch.testing.assert_close(optimizers[0]["state"][0]["exp_avg"], optimizers[1]["state"][0]["exp_avg"],
                               rtol=1e-3, atol=1e-6)
    # resumed FSDP2 == uninterrupted FSDP2, bit for bit
    ckpt = shutil.copy(folders["fsdp2"] / "ckpt" / "epoch=0-step=2.ckpt", tmp_path / "step2.ckpt")
    _, result = ddp_fit(tmp_path, PPO_STEPS, strategy=FSDP2, ckpt_path=str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    assert_close_exports(exported(tmp_path), exported(folders["fsdp2"]), exact=True)
