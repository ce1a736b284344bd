"""Test-only callbacks and readers for the two-process tests (DDP, FSDP2): what each process rolled out,
where each one stopped, what a run exported."""
from __future__ import annotations

import json
import os

import lightning as L
import torch

FSDP2 = {"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}


def recorder(folder) -> dict:
    """The config of a :class:`RankRolloutRecorder` writing into ``folder/ranks``."""
    return {"class_path": "tests.ddp_helpers.RankRolloutRecorder", "init_args": {"out_dir": str(folder / "ranks")}}


def ranks(folder) -> list[dict]:
    """What :class:`RankRolloutRecorder` wrote for processes 0 and 1."""
    return [json.load(open(folder / "ranks" / f"rank{r}.json")) for r in (0, 1)]


def exported(folder) -> dict[str, torch.Tensor]:
    """The end-of-fit export's adapter and value-head tensors (value head: ``value_head.*``)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    if os.path.exists(folder / "adapter" / "value_head.safetensors"):
        tensors |= {f"value_head.{k}": v for k, v in load_file(str(folder / "adapter" / "value_head.safetensors")).items()}
    return tensors


def assert_close_exports(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    """The same tensors, equal (``exact``) or within float rounding, and trained (some ``lora_B`` moved from 0)."""
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:  # reduce-scatter and all-reduce sum in different orders: float rounding only
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert any(float(a[key].abs().max()) > 1e-3 for key in a if "lora_B" in key)


class RankRolloutRecorder(L.Callback):
    """Writes ``<out_dir>/rank<r>.json`` with this process's batch prompts, the prompts and sampled texts
    of its rollouts' rows (RLOO/GRPO: each batch prompt k times; ``texts`` from validation too), its final
    global_step and trainable weights (whole: a sharded weight is gathered), and for each parameter the
    number of elements this process holds and the whole parameter's (``shards``)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.prompts: list[str] = []
        self.rollout_rows: list[list[str]] = []
        self.texts: list[list[str]] = []

    def on_train_start(self, trainer, pl_module):
        sample = pl_module.rollout

        def recorded(prompts, settings, **kwargs):
            rollout = sample(prompts, settings, **kwargs)
            if pl_module.training:
                self.rollout_rows.append(list(rollout.prompts))
            self.texts.append(list(rollout.texts))
            return rollout

        pl_module.rollout = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts.extend(batch["prompt"])

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        whole = {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # collective: every rank runs this hook
                 for k, v in pl_module.actor.trainable_state_dict().items()}
        lora = {k: float(v.float().abs().sum()) for k, v in whole.items()}
        shards = {name: [p.to_local().numel() if hasattr(p, "to_local") else p.numel(), p.numel()]
                  for name, p in pl_module.actor.named_parameters()}
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"prompts": self.prompts, "rollout_rows": self.rollout_rows, "texts": self.texts,
                       "global_step": trainer.global_step, "weights": lora, "shards": shards}, handle)


class RankStopRecorder(L.Callback):
    """Writes ``<out_dir>/rank<r>.json`` with the exception that ended this process's fit and its global_step."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_exception(self, trainer, pl_module, exception):
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump({"exception": type(exception).__name__, "global_step": trainer.global_step}, handle)
