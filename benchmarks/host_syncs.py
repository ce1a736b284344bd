#!/usr/bin/env python
"""Host synchronisations per PPO minibatch: tensor-to-Python conversions inside the update loop.

On a GPU every ``Tensor.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (also ``if t:``) and
``t.tolist()`` waits for the device to finish its queue, so each one in the minibatch loop of
``PPOModule.ppo_update`` stalls training. This script runs the configuration of
``benchmarks/ppo_throughput.py`` (same flags) through a ``lightning.Trainer`` on CPU, counts
those conversions while the minibatch loop runs (``PPOModule.ppo_epoch``) and, separately, in
the rest of the update (once per iteration), and prints the counts with the package lines that
made them. The same conversions are the syncs on CUDA; there ``torch.cuda.set_sync_debug_mode("warn")``
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

    from flan_rlhf import on_policy as module_lib

    torch.set_num_threads(args.threads)
    model = bench.build_module(args)
    state = {"window": None, "minibatches": 0, "iterations": 0}
    where = {"loop": collections.Counter(), "update": collections.Counter()}

    def counting(name, original):
        def wrapper(self, *a, **kw):
            if state["window"] is not None:
                frame = next((f for f in reversed(traceback.extract_stack()[:-1]) if PACKAGE in f.filename), None)
                site = f"{frame.filename.split(PACKAGE)[-1]}:{frame.lineno}" if frame else "outside flan_rlhf"
                where[state["window"]][f"{site} {name}"] += 1
            return original(self, *a, **kw)
        return wrapper

    def marked(window, function):
        def wrapper(*a, **kw):
            outer, state["window"] = state["window"], window
            try:
                return function(*a, **kw)
            finally:
                state["window"] = outer
        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
    minibatch = module_lib._minibatch

    def counted_minibatch(*a, **kw):
        state["minibatches"] += 1
        return minibatch(*a, **kw)

    def counted_update(*a, **kw):
        state["iterations"] += 1
        return update(*a, **kw)

    update = marked("update", model.ppo_update)

    loader = DataLoader(bench.make_prompts(args.num_prompts, args.seed), batch_size=args.batch_size, shuffle=False,
                        drop_last=True, collate_fn=lambda rows: {"prompt": list(rows)})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=args.steps, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    module_lib._minibatch, model.ppo_update = counted_minibatch, counted_update
    model.ppo_epoch = marked("loop", model.ppo_epoch)
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        module_lib._minibatch = minibatch
    minibatches, iterations = max(state["minibatches"], 1), max(state["iterations"], 1)
    return {
        "minibatches": state["minibatches"],
        "iterations": state["iterations"],
        "syncs_in_minibatch_loop": sum(where["loop"].values()),
        "syncs_per_minibatch": sum(where["loop"].values()) / minibatches,
        "sites": {site: count / minibatches for site, count in where["loop"].most_common()},
        "syncs_per_iteration_outside_loop": sum(where["update"].values()) / iterations,
        "sites_outside_loop": {site: count / iterations for site, count in where["update"].most_common()},
    }


def main(argv=None) -> None:
    args = bench.parse_args(argv)
    result = count_syncs(args)
    print(f"host syncs per minibatch: {result['syncs_per_minibatch']:.1f} "
          f"({result['syncs_in_minibatch_loop']} in {result['minibatches']} minibatches)")
    for site, per_minibatch in result["sites"].items():
        print(f"  {per_minibatch:5.1f}  {site}")
    print(f"host syncs per iteration in the rest of the update: {result['syncs_per_iteration_outside_loop']:.1f}")
    for site, per_iteration in result["sites_outside_loop"].items():
        print(f"  {per_iteration:5.1f}  {site}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
