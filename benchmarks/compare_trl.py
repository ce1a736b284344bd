#!/usr/bin/env python
"""flan-rlhf vs TRL 0.11.4 PPO throughput: interleaved runs, medians and ratios.

For each mode (LoRA, full fine-tuning) and each of ``--runs`` rounds it runs the TRL anchor
(``/work/shared/anchor/run.sh``, which builds its own venv on first use, ~2 min) and then
``benchmarks/ppo_throughput.py``, one after the other, so both see the same machine load;
then it prints every JSON line, the medians and the ratios (ours / TRL) as a Markdown table.

Machine noise on shared 2-core machines can make one run 2-3x slower than the next, so only
medians of interleaved runs mean anything. ``--clock cpu`` times both with process CPU
seconds instead of wall seconds: each script runs under this file's ``--run-with-cpu-clock``
mode, which replaces ``time.perf_counter`` (what both scripts time with) by
``time.process_time``. Use it with ``--threads 1`` (with more threads it also counts OpenMP
threads spinning); it is much steadier when other jobs load the machine.

Usage:
  python benchmarks/compare_trl.py [--runs 3] [--steps 5] [--threads 2] [--modes lora full]
                                   [--clock wall|cpu] [--out FILE.jsonl]
Working memory is ``peak_rss_mb - rss_after_import_mb`` (both from ``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANCHOR_DIR = os.environ.get("TRL_ANCHOR_DIR", "/work/shared/anchor")
ANCHOR_VENV = os.environ.get("TRL_ANCHOR_VENV", os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                                                              "flan-rlhf-trl-anchor"))
OURS_PYTHON = os.environ.get("FLAN_RLHF_PYTHON", os.path.join(REPO, ".venv", "bin", "python"))
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds per mode")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: as the scripts measure it; cpu: process CPU seconds (steadier; use --threads 1)")
    p.add_argument("--out", default=None, help="also append every JSON line (with mode and round) to this file")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before one run is abandoned")
    args = p.parse_args(argv)
    if args.runs < 1 or args.steps < 1:
        raise SystemExit("error: --runs and --steps must be >= 1")
    return args


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run ``cmd``; return the JSON object on the last stdout line (stderr passes through)."""
    env = dict(os.environ, **ENV)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def commands(mode: str, args: argparse.Namespace) -> dict[str, list[str]]:
    flags = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if mode == "lora":
        flags.append("--lora")
    ours = os.path.join(HERE, "ppo_throughput.py")
    anchor = os.path.join(ANCHOR_DIR, "ppo_throughput.py")
    if args.clock == "cpu":
        wrapper = [os.path.abspath(__file__), "--run-with-cpu-clock"]
        return {"trl": [os.path.join(ANCHOR_VENV, "bin", "python"), *wrapper, anchor, *flags],
                "flan-rlhf": [OURS_PYTHON, *wrapper, ours, *flags]}
    return {"trl": [os.path.join(ANCHOR_DIR, "run.sh"), *flags], "flan-rlhf": [OURS_PYTHON, ours, *flags]}


def summarise(results: dict[str, dict[str, list[dict]]]) -> str:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    lines = ["| mode | impl | runs | samples/s (median) | samples/s (all) | gen s/step | train s/step | "
             "resp. tokens | peak RSS MB | RSS after imports MB | working MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for mode, by_impl in results.items():
        for impl, rows in by_impl.items():
            working = statistics.median(r["peak_rss_mb"] - r["rss_after_import_mb"] for r in rows)
            lines.append(
                f"| {mode} | {impl} | {len(rows)} | {med(rows, 'samples_per_s'):.2f} | "
                f"{', '.join('%.2f' % r['samples_per_s'] for r in rows)} | {med(rows, 'gen_s_per_step'):.3f} | "
                f"{med(rows, 'train_s_per_step'):.3f} | {med(rows, 'mean_response_tokens'):.2f} | "
                f"{med(rows, 'peak_rss_mb'):.0f} | {med(rows, 'rss_after_import_mb'):.0f} | {working:.0f} |")
        if "trl" in by_impl and "flan-rlhf" in by_impl:
            trl, ours = by_impl["trl"], by_impl["flan-rlhf"]
            paired = [o["samples_per_s"] / t["samples_per_s"] for o, t in zip(ours, trl)]
            ratios.append(
                f"{mode}: samples/s ratio of medians {med(ours, 'samples_per_s') / med(trl, 'samples_per_s'):.2f}x "
                f"(paired per round: {', '.join(f'{x:.2f}' for x in paired)}; median {statistics.median(paired):.2f}x); "
                f"working memory {statistics.median(o['peak_rss_mb'] - o['rss_after_import_mb'] for o in ours):.0f} vs "
                f"{statistics.median(t['peak_rss_mb'] - t['rss_after_import_mb'] for t in trl):.0f} MB; "
                f"mean response tokens {med(ours, 'mean_response_tokens'):.2f} vs {med(trl, 'mean_response_tokens'):.2f} "
                f"({100 * (med(ours, 'mean_response_tokens') / med(trl, 'mean_response_tokens') - 1):+.1f}%)")
    return "\n".join(lines + [""] + ratios)


def run_with_cpu_clock(argv: list[str]) -> None:
    """Run the script ``argv[0]`` (args ``argv[1:]``) as ``__main__`` with ``time.perf_counter``
    replaced by ``time.process_time``, so the intervals it measures are process CPU seconds."""
    import runpy

    if not argv or not os.path.isfile(argv[0]):
        raise SystemExit("error: --run-with-cpu-clock needs the path of a benchmark script, then its arguments")
    time.perf_counter = time.process_time
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--run-with-cpu-clock":
        run_with_cpu_clock(argv[1:])
        return
    args = parse_args(argv)
    setup = subprocess.run([os.path.join(ANCHOR_DIR, "run.sh"), "--setup-only"], stdout=sys.stderr,
                           env=dict(os.environ, **ENV))
    if setup.returncode != 0:
        raise SystemExit("error: could not set up the TRL anchor venv (run.sh --setup-only failed); see the output above")
    results: dict[str, dict[str, list[dict]]] = {}
    for mode in args.modes:
        results[mode] = {"trl": [], "flan-rlhf": []}
        for round_ in range(args.runs):
            for impl, cmd in commands(mode, args).items():
                start = time.time()
                row = run_json(cmd, args.timeout)
                row.update({"mode": mode, "round": round_, "clock": args.clock, "elapsed_s": round(time.time() - start, 1)})
                results[mode][impl].append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    print()
    print(f"clock: {args.clock}, threads: {args.threads}, steps: {args.steps} after {args.warmup} warm-up, "
          f"{args.runs} interleaved rounds per mode")
    print(summarise(results))


if __name__ == "__main__":
    main()
