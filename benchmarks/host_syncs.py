#!/usr/bin/env python
"""Host synchronisations per PPO minibatch: tensor-to-Python conversions inside the update loop.

On a GPU every ``Tensor.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (also ``if t:``) and
``t.tolist()`` waits for the device to finish its queue, so each one in the minibatch loop of
``PPOModule.ppo_update`` stalls training. This script runs the configuration of
``benchmarks/ppo_throughput.py`` (same flags) through a ``lightning.Trainer`` on CPU, counts
those conversions while the minibatch loop runs (from the first ``_minibatch`` call of an
update to its return) and prints the count per minibatch with the package lines that made
them. The same conversions are the syncs on CUDA; there ``torch.cuda.set_sync_debug_mode("warn")``
names them too. Not counted: syncs made inside a single torch call with no Python conversion
(boolean-mask indexing, ``torch.nonzero``); CUDA's debug mode catches those.

    python benchmarks/host_syncs.py --steps 2 --batch-size 8 --mini-batch-size 4
"""
from __future__ import annotations

import collections
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ppo_throughput as bench  # noqa: E402  (the benchmark's flags, prompts and module)

CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
PACKAGE = os.sep + "flan_rlhf" + os.sep


def count_syncs(args) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from flan_rlhf import module as module_lib

    torch.set_num_threads(args.threads)
    model = bench.build_module(args)
    state = {"in_loop": False, "minibatches": 0}
    where: collections.Counter = collections.Counter()

    def counting(name, original):
        def wrapper(self, *a, **kw):
            if state["in_loop"]:
                frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if PACKAGE in f.filename), None)
                site = f"{frame.filename.split(PACKAGE)[-1]}:{frame.lineno}" if frame else "outside flan_rlhf"
                where[f"{site} {name}"] += 1
            return original(self, *a, **kw)
        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
    minibatch, update = module_lib._minibatch, model.ppo_update

    def marked_minibatch(*a, **kw):
        state["in_loop"] = True  # the loop starts at the first minibatch of an update
        state["minibatches"] += 1
        return minibatch(*a, **kw)

    def marked_update(*a, **kw):
        try:
            return update(*a, **kw)
        finally:
            state["in_loop"] = False

    loader = DataLoader(bench.make_prompts(args.num_prompts, args.seed), batch_size=args.batch_size, shuffle=False,
                        drop_last=True, collate_fn=lambda rows: {"prompt": list(rows)})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=args.steps, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    module_lib._minibatch, model.ppo_update = marked_minibatch, marked_update
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        module_lib._minibatch = minibatch
    total = sum(where.values())
    minibatches = max(state["minibatches"], 1)
    return {
        "minibatches": state["minibatches"],
        "syncs_in_minibatch_loop": total,
        "syncs_per_minibatch": total / minibatches,
        "sites": {site: count / minibatches for site, count in where.most_common()},
    }


def main(argv=None) -> None:
    args = bench.parse_args(argv)
    result = count_syncs(args)
    print(f"host syncs per minibatch: {result['syncs_per_minibatch']:.1f} "
          f"({result['syncs_in_minibatch_loop']} in {result['minibatches']} minibatches)")
    for site, per_minibatch in result["sites"].items():
        print(f"  {per_minibatch:5.1f}  {site}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
