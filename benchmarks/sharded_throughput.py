#!/usr/bin/env python
"""Throughput of sharded (FSDP2) against DDP training, measured in one run on 2 processes.

Runs ``flan-rlhf fit`` three times on the same config and seeds, each on ``--devices`` processes
(CPU and gloo here, one thread each): under ``ddp``, under ``flan_rlhf.sharded_strategy.FSDP2Strategy``
with ``rollout_weights: gathered`` (the default: each rollout gathers the weights once), and with
``rollout_weights: sharded`` (each layer gathers its weights at every decoding step). The config is
``configs/tiny.yaml`` with a larger FLAN-T5-architecture model (``--d-model``, ``--layers``) so
that compute, not process start-up, dominates; no checkpoints, validation or export.

Each run logs ``time/rollout_s`` (sampling, reference pass, scoring) and ``time/update_s`` (the
PPO epochs) per iteration to TensorBoard; the medians over the iterations after ``--warmup`` are
compared. ``peak_rss_mib`` is the largest peak resident memory (``VmHWM``) of the run's training
processes, read from ``/proc`` every 0.1 s while they run. ``--full-finetune`` trains every weight
(``lora: null``), whose gradients and Adam moments FSDP2 shards too. Prints a table on stderr and
ONE JSON line on stdout: ``{"config": ..., "runs": {name: {"rollout_s", "update_s", "iteration_s",
"samples_per_s", "peak_rss_mib"}}, "fsdp2_over_ddp": samples/s ratio,
"sharded_rollout_over_gathered": rollout time ratio}``.

    python benchmarks/sharded_throughput.py --steps 6
    python benchmarks/sharded_throughput.py --steps 2 --full-finetune --d-model 512 --layers 6
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = {
    "ddp": "ddp",
    "fsdp2_gathered": {"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy", "init_args": {"rollout_weights": "gathered"}},
    "fsdp2_sharded": {"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy", "init_args": {"rollout_weights": "sharded"}},
}


def run_config(args: argparse.Namespace, strategy, folder: str) -> dict:
    """configs/tiny.yaml as a throughput run under ``strategy``, every output inside ``folder``."""
    config = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))
    trainer = config["trainer"]
    trainer.update(devices=args.devices, strategy=strategy, max_steps=args.warmup + args.steps,
                   val_check_interval=10_000, limit_val_batches=0, enable_checkpointing=False, callbacks=[])
    trainer["logger"]["init_args"]["save_dir"] = os.path.join(folder, "logs")
    init = config["model"]["init_args"]
    init["policy"]["t5_config"] = {"d_model": args.d_model, "d_ff": 2 * args.d_model, "num_layers": args.layers,
                                   "num_heads": max(1, args.d_model // 64)}
    init["generation"].update(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens)
    init["fused_kernels"] = False  # sharded weights never take them: compare the same arithmetic
    init.update(export_dir=None, monitors=None)
    if args.full_finetune:
        init["lora"] = None
    config["data"]["init_args"]["batch_size"] = args.batch_size
    return config


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from ``/proc/<pid>/stat``'s parent ids)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def peak_rss_kib(pid: int) -> int:
    """``VmHWM`` (peak resident set) of a live process in KiB, 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def run_watched(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``command`` and return it with the largest peak RSS (KiB) any of its processes reached."""
    import threading

    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            for pid in descendants(process.pid):
                peaks[pid] = max(peaks.get(pid, 0), peak_rss_kib(pid))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate()
    done.set()
    watcher.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), max(peaks.values(), default=0)


def medians(logdir: str, warmup: int) -> dict[str, float]:
    """Median ``time/rollout_s`` and ``time/update_s`` over the iterations after ``warmup`` (process 0's log,
    read by the report's own reader, :func:`flan_rlhf.eval.report.read_scalar_curves`)."""
    from flan_rlhf.eval.report import read_scalar_curves

    (curves,) = read_scalar_curves(logdir).values()  # one run
    return {tag.split("/")[1]: statistics.median(curves[tag][1][warmup:].tolist())
            for tag in ("time/rollout_s", "time/update_s")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="processes per run")
    parser.add_argument("--steps", type=int, default=6, help="measured PPO iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out of the medians")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per iteration per process")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="every response this long (min = max)")
    parser.add_argument("--full-finetune", action="store_true", help="lora: null (every weight trains)")
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="sharded_throughput_") as scratch:
        for name, strategy in STRATEGIES.items():
            folder = os.path.join(scratch, name)
            os.makedirs(folder)
            path = os.path.join(folder, "run.yaml")
            with open(path, "w") as handle:
                yaml.safe_dump(run_config(args, strategy, folder), handle)
            started = time.perf_counter()
            result, peak = run_watched([sys.executable, "-m", "flan_rlhf.cli", "fit", "--config", path], env)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                print(f"error: the {name} run failed (exit {result.returncode})", file=sys.stderr)
                return 1
            timed = medians(os.path.join(folder, "logs"), args.warmup)
            iteration = timed["rollout_s"] + timed["update_s"]
            runs[name] = {**timed, "iteration_s": iteration, "samples_per_s": args.devices * args.batch_size / iteration,
                          "peak_rss_mib": peak / 1024, "wall_s": time.perf_counter() - started}
            print(f"{name:>15}: rollout {timed['rollout_s']:.3f} s, update {timed['update_s']:.3f} s, "
                  f"{runs[name]['samples_per_s']:.1f} samples/s (median of {args.steps} iterations), "
                  f"peak RSS {peak / 1024:.0f} MiB", file=sys.stderr)
    report = {
        "config": vars(args),
        "runs": runs,
        "fsdp2_over_ddp": runs["fsdp2_gathered"]["samples_per_s"] / runs["ddp"]["samples_per_s"],
        "sharded_rollout_over_gathered": runs["fsdp2_sharded"]["rollout_s"] / runs["fsdp2_gathered"]["rollout_s"],
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
