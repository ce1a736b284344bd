#!/usr/bin/env python
"""Where the time of one flan-rlhf PPO iteration goes, as a table.

Runs the same configuration as ``benchmarks/ppo_throughput.py`` (same flags; the model, prompts,
reward and settings are built by that script's helpers) through a ``lightning.Trainer`` and
times each phase of ``PPOModule.training_step`` with manual timers around the package's own
functions (nothing in the package is changed):

  generation          sampling (``sample_with_statistics``), which also
                      yields old log-probs and values when the module uses ``collect_experience``
  policy forward      no-grad teacher-forced policy pass for old log-probs / values
                      (``evaluate_responses`` minus its reference part; 0 when they come from
                      generation)
  reference forward   no-grad reference pass (``rollout.reference_logprobs`` or
                      ``ActorCritic.reference_logits``)
  scoring             ``PPOModule.score_rollout`` (reward on decoded texts)
  minibatch forward   ``ActorCritic.forward`` (encoder included)
                      inside ``ppo_update``
  backward            ``manual_backward``
  optimiser step      ``_optimizer_step`` (gradient clipping + AdamW)
  other               the rest: losses, GAE, whitening, statistics, Lightning hooks

Wall time and process CPU time are both shown (CPU time is steadier on a shared machine;
with ``--threads 2`` it counts both threads). ``--flops`` adds a second pass that counts the
floating-point operations of each phase with ``torch.utils.flop_counter``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ppo_throughput as bench  # noqa: E402  (the benchmark's flags, prompts and reward)

PHASES = ("generation", "policy forward", "reference forward", "scoring", "minibatch forward", "backward",
          "optimiser step", "other")


class PhaseTimer:
    """Accumulates wall and CPU seconds (and optionally FLOPs) per phase; nested phases are
    subtracted from their parent so every second (and FLOP) is counted once."""

    def __init__(self, count_flops: bool = False):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.stack: list[list] = []
        self.counter = None
        if count_flops:  # one counter for the whole run, read at phase boundaries
            from torch.utils.flop_counter import FlopCounterMode
            self.counter = FlopCounterMode(display=False)

    def _flops_so_far(self) -> int:
        return self.counter.get_total_flops() if self.counter is not None else 0

    @contextlib.contextmanager
    def phase(self, name: str):
        # [name, wall0, cpu0, flops0, child wall, child cpu, child flops]
        frame = [name, time.perf_counter(), time.process_time(), self._flops_so_far(), 0.0, 0.0, 0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            wall = time.perf_counter() - frame[1]
            cpu = time.process_time() - frame[2]
            flops = self._flops_so_far() - frame[3]
            self.wall[name] = self.wall.get(name, 0.0) + wall - frame[4]
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - frame[5]
            if self.counter is not None:
                self.flops[name] = self.flops.get(name, 0) + flops - frame[6]
            if self.stack:
                self.stack[-1][4] += wall
                self.stack[-1][5] += cpu
                self.stack[-1][6] += flops

    def wrap(self, fn, name: str):
        def wrapper(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return wrapper

    def reset(self) -> None:
        self.wall.clear()
        self.cpu.clear()
        self.flops.clear()


def instrument(model, module_lib, rollout_lib, timer: PhaseTimer) -> list[tuple[object, str, object]]:
    """Put timers around the package's functions used by ``training_step``.

    Returns the ``(object, attribute, original)`` triples to restore with :func:`restore`
    (module-level functions are shared by every run in this process).
    """
    state = {"in_update": False}
    originals = []

    def replace(owner, name, new):
        originals.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    # nested phases of one name count once (the inner time is subtracted from the outer)
    for lib in (module_lib, rollout_lib):
        for name, phase in (("sample_with_statistics", "generation"),
                            ("evaluate_responses", "policy forward")):
            if hasattr(lib, name):
                replace(lib, name, timer.wrap(getattr(lib, name), phase))
    actor = model.actor
    forward = actor.forward

    def timed_forward(*args, **kwargs):
        with timer.phase("minibatch forward" if state["in_update"] else "policy forward"):
            return forward(*args, **kwargs)

    actor.forward = timed_forward
    actor.reference_logits = timer.wrap(actor.reference_logits, "reference forward")
    if hasattr(rollout_lib, "reference_logprobs"):
        replace(rollout_lib, "reference_logprobs", timer.wrap(rollout_lib.reference_logprobs, "reference forward"))
    model.score_rollout = timer.wrap(model.score_rollout, "scoring")
    model.manual_backward = timer.wrap(model.manual_backward, "backward")
    model._optimizer_step = timer.wrap(model._optimizer_step, "optimiser step")
    ppo_update = model.ppo_update

    def flagged_update(*args, **kwargs):
        state["in_update"] = True
        try:
            return ppo_update(*args, **kwargs)
        finally:
            state["in_update"] = False

    model.ppo_update = flagged_update
    training_step = model.training_step

    def timed_training_step(*args, **kwargs):
        with timer.phase("other"):
            return training_step(*args, **kwargs)

    model.training_step = timed_training_step
    return originals


def restore(originals: list[tuple[object, str, object]]) -> None:
    for owner, name, original in reversed(originals):
        setattr(owner, name, original)


def run(args, count_flops: bool) -> tuple[PhaseTimer, int]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from flan_rlhf import module as module_lib
    from flan_rlhf import rollout as rollout_lib

    torch.set_num_threads(args.threads)
    model = bench.build_module(args)
    timer = PhaseTimer(count_flops)
    originals = instrument(model, module_lib, rollout_lib, timer)
    steps_done = {"n": 0}

    class ResetAfterWarmup(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps_done["n"] += 1
            if steps_done["n"] == args.warmup:
                timer.reset()

    loader = DataLoader(bench.make_prompts(args.num_prompts, args.seed), batch_size=args.batch_size, shuffle=False,
                        drop_last=True, collate_fn=lambda rows: {"prompt": list(rows)})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=args.warmup + args.steps, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[ResetAfterWarmup()])
    try:
        if timer.counter is not None:
            with timer.counter:
                trainer.fit(model, train_dataloaders=loader)
        else:
            trainer.fit(model, train_dataloaders=loader)
    finally:
        restore(originals)
    return timer, args.steps


def table(timer: PhaseTimer, steps: int) -> str:
    total_wall = sum(timer.wall.values())
    total_cpu = sum(timer.cpu.values())
    rows = ["| phase | wall s/step | share | CPU s/step | GFLOP/step |", "|---|---|---|---|---|"]
    for name in PHASES:
        wall, cpu = timer.wall.get(name, 0.0), timer.cpu.get(name, 0.0)
        flops = f"{timer.flops[name] / steps / 1e9:.1f}" if name in timer.flops else "-"
        rows.append(f"| {name} | {wall / steps:.3f} | {wall / max(total_wall, 1e-12):.1%} | {cpu / steps:.3f} | {flops} |")
    total_flops = f"{sum(timer.flops.values()) / steps / 1e9:.1f}" if timer.flops else "-"
    rows.append(f"| total | {total_wall / steps:.3f} | 100% | {total_cpu / steps:.3f} | {total_flops} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    import argparse

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--flops", action="store_true", help="also count FLOPs per phase (a second, slower pass)")
    extra.add_argument("--json", action="store_true", help="print the timings as one JSON line after the table")
    known, rest = extra.parse_known_args(argv)
    args = bench.parse_args(rest)
    timer, steps = run(args, count_flops=False)
    if known.flops:
        flop_timer, _ = run(args, count_flops=True)
        timer.flops = flop_timer.flops
    mode = "LoRA r=%d q,v" % args.lora_r if args.lora else "full fine-tune"
    print(f"flan-rlhf PPO iteration, {mode}, batch {args.batch_size}, {args.ppo_epochs} epochs x "
          f"{args.batch_size // args.mini_batch_size} minibatches, {args.threads} threads, mean of {steps} steps after "
          f"{args.warmup} warm-up")
    print(table(timer, steps))
    if known.json:
        print(json.dumps({"wall_s_per_step": {k: v / steps for k, v in timer.wall.items()},
                          "cpu_s_per_step": {k: v / steps for k, v in timer.cpu.items()},
                          "gflop_per_step": {k: v / steps / 1e9 for k, v in timer.flops.items()}}))


if __name__ == "__main__":
    main()
