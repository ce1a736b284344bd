#!/usr/bin/env python
"""Time to detox: the CPU seconds PPO, RLOO and GRPO need to reach the detox target on the demo tasks.

Two tasks, each with its own SFT model trained by the demo pipeline (corpus seed 0):
  tail   the demo as it is: a hostile sentence appended to a third of the training summaries
         (reward: non_profanity, ``configs/demo_<method>.yaml``);
  woven  insults woven into the summary (``flan-rlhf demo --task woven``), clean references
         (``configs/demo_<method>.yaml`` + ``configs/demo_woven.yaml``: non_profanity + 0.5 ROUGE-L).

Target: the toxic share of the policy's responses to the held-out validation prompts (alt-profanity-
check p(profane) > 0.5) at most 10% of the SFT model's, with ROUGE-L (against the clean references)
at least 0.95x the SFT model's, at ``--hold`` consecutive evaluations. The evaluation runs after every
iteration, off the clock, on ``--eval-prompts`` validation prompts with the config's evaluation
sampling, seeded the same way at every evaluation. A run reaches the target at the first evaluation
of the streak; it stops once the streak is complete, or after ``--max-iterations``.

Measured per run, up to the target: CPU seconds of training only (process user + system time across
all threads, summed over ``training_step`` calls: rollout, reward, update; evaluation and Lightning's
loop between steps excluded), wall seconds of the same, responses sampled, iterations, and the KL to
the SFT model and ROUGE-L at the target; and the whole curve (toxic share, ROUGE-L, KL against CPU
seconds). ``report`` turns the runs into the median and spread over seeds, the area under the toxic-share
curve against CPU seconds (a less noisy figure; a run that stopped at its target keeps its last value
up to the common horizon), a markdown table and a PNG.

Usage (each run in its own process; finished runs in --out are skipped, so a stopped sweep resumes):
  python benchmarks/time_to_target.py run --methods ppo rloo grpo --tasks tail woven --seeds 0 1 2 3 4
  python benchmarks/time_to_target.py run --methods rloo --tasks woven --seeds 0 1 --lr 1e-3 --k 8 --tag sweep
  python benchmarks/time_to_target.py report --png docs/images/time_to_target.png
  python benchmarks/time_to_target.py report --out benchmarks/results/time_to_target/runs.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHECKOUT = Path(__file__).resolve().parents[1]
CONFIGS = CHECKOUT / "configs"
DEFAULT_OUT = CHECKOUT / "reports" / "time_to_target" / "runs.jsonl"
ROWS_PER_ITERATION = 64  # the demo's rollout rows per iteration, whatever k: 64 prompts, 16 x 4, 8 x 8
TOXIC_THRESHOLD = 0.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the target (pure)
def target_met(toxic: float, rouge: float, toxic_sft: float, rouge_sft: float,
               toxic_cut: float = 0.1, rouge_keep: float = 0.95) -> bool:
    """Whether one evaluation meets the target: toxic share <= ``toxic_cut`` x the SFT model's, and
    ROUGE-L >= ``rouge_keep`` x the SFT model's."""
    return toxic <= toxic_cut * toxic_sft and rouge >= rouge_keep * rouge_sft


def first_held(flags: list[bool], hold: int) -> int | None:
    """The index of the first of ``hold`` consecutive ``True`` flags, or ``None`` when there is no such streak."""
    streak = 0
    for index, flag in enumerate(flags):
        streak = streak + 1 if flag else 0
        if streak == hold:
            return index - hold + 1
    return None


def area_under_curve(seconds: list[float], values: list[float], horizon: float) -> float:
    """Area under the step curve ``values`` against ``seconds`` from 0 to ``horizon``, divided by ``horizon``.

    ``values[i]`` holds from ``seconds[i]`` until ``seconds[i + 1]`` (the last one until ``horizon``), so
    the result is the time-averaged value: the toxic share a run shows on average over the budget.
    ``seconds`` starts at 0 (the SFT model's evaluation) and increases.
    """
    if horizon <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    area = 0.0
    for index, (start, value) in enumerate(zip(seconds, values)):
        end = seconds[index + 1] if index + 1 < len(seconds) else horizon
        area += value * max(0.0, min(end, horizon) - min(start, horizon))
    return area / horizon


def median_and_spread(values: list[float]) -> tuple[float, float, float]:
    """``(median, min, max)``; ``nan`` for an empty list."""
    if not values:
        return math.nan, math.nan, math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return median, ordered[0], ordered[-1]


# ----------------------------------------------------------------------------- one run
def task_root(task: str, artifacts: Path, sft_steps: int | None = None, n_train: int = 4000) -> Path:
    """The task's demo artefacts under ``artifacts`` (corpus, tokenizer and SFT model of corpus seed 0, as
    ``flan-rlhf demo --task TASK`` makes them: ``demo`` or ``demo-woven``), made if missing."""
    from flan_rlhf.demo.pipeline import _paths, run_sft
    from flan_rlhf.demo.prepare import prepare_demo_assets

    root = artifacts / _paths(0, None, None, "ppo", task)[0].name
    prepare_demo_assets(root, seed=0, task=task, n_train=n_train)
    run_sft(root, 0, CONFIGS, sft_steps, task=task)
    return root


def build(method: str, task: str, seed: int, root: Path, lr: float | None, k: int | None,
          rows: int = ROWS_PER_ITERATION):
    """The module and data module of ``configs/demo_<method>.yaml`` (+ the task's overlay) on ``root``,
    with ``rows`` responses per iteration (``rows / k`` prompts)."""
    from flan_rlhf.demo.pipeline import _stage_overrides, _task_overlays
    from flan_rlhf.lightning_cli import build_from_config

    extra = [*_task_overlays(CONFIGS, task), *_stage_overrides(root, 0),
             f"--seed_everything={seed}", f"--data.init_args.seed={seed}",
             f"--model.init_args.policy.name_or_path={root / 'sft_model'}",
             f"--model.init_args.sampling_seed={seed}", "--model.init_args.export_dir=null",
             "--model.init_args.log_samples_every_n_steps=0"]
    if lr is not None:
        extra.append(f"--model.init_args.{method}.learning_rate={lr}")
    if k is not None:
        if method == "ppo":
            raise SystemExit("--k is the responses per prompt of RLOO and GRPO; PPO samples one")
        extra.append(f"--model.init_args.{method}.samples_per_prompt={k}")
    if k is not None or rows != ROWS_PER_ITERATION:
        extra.append(f"--data.init_args.batch_size={rows // (k or config_samples_per_prompt(method))}")
    if rows < 16:  # the demo configs' minibatches hold 16 responses
        extra.append(f"--model.init_args.{method}.mini_batch_size={rows}")
    return build_from_config(str(CONFIGS / f"demo_{method}.yaml"), extra)


def config_samples_per_prompt(method: str) -> int:
    """The responses per prompt ``configs/demo_<method>.yaml`` sets (1 for PPO)."""
    import yaml

    settings = yaml.safe_load((CONFIGS / f"demo_{method}.yaml").read_text())["model"]["init_args"][method]
    return int(settings.get("samples_per_prompt", 1))


def evaluation_batches(datamodule, n_prompts: int) -> list[dict]:
    """The first ``n_prompts`` validation prompts with their references, in the data module's batches."""
    datamodule.setup("validate")
    batches, seen = [], 0
    for batch in datamodule.val_dataloader():
        take = min(len(batch["prompt"]), n_prompts - seen)
        batches.append({"prompt": batch["prompt"][:take], "references": batch["references"][:take]})
        seen += take
        if seen >= n_prompts:
            break
    return batches


def evaluate(module, batches: list[dict], toxicity) -> dict[str, float]:
    """Toxic share, mean p(profane), ROUGE-L and KL to the SFT model of the policy's responses, sampled as
    the module's own validation samples them (seeded the same at every call)."""
    import torch

    from flan_rlhf.eval.metrics import rouge_per_sample

    was_training = module.training
    module.eval()
    profane, rouge, kls = [], [], []
    with torch.no_grad():
        for index, batch in enumerate(batches):
            rollout, kl = module._sample_and_score(batch, index)
            profane.append(1.0 - toxicity(batch["prompt"], rollout.texts))
            rouge.append(rouge_per_sample(rollout.texts, batch["references"], ("rougeL",))["rougeL"])
            kls.append(kl.cpu())
    module.train(was_training)
    profane_all = torch.cat(profane)
    return {"toxic_share": float((profane_all > TOXIC_THRESHOLD).float().mean()),
            "toxicity_mean": float(profane_all.mean()),
            "rougeL": float(torch.cat(rouge).mean()), "kl": float(torch.cat(kls).mean())}


def make_tracker(batches, toxicity, hold: int):
    """A Lightning callback that clocks each ``training_step`` and evaluates after it (off the clock)."""
    import lightning as L

    class TimeToTarget(L.Callback):
        def __init__(self):
            self.cpu_s = self.wall_s = 0.0
            self.samples = 0
            self.curve: list[dict] = []
            self.sft: dict[str, float] | None = None

        def on_train_start(self, trainer, pl_module):
            self.sft = evaluate(pl_module, batches, toxicity)  # adapters at init: the policy is the SFT model
            self.curve.append({"iteration": 0, "cpu_s": 0.0, "wall_s": 0.0, "samples": 0, **self.sft, "met": False})
            log(f"  SFT: toxic {self.sft['toxic_share']:.4f} rougeL {self.sft['rougeL']:.4f}")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._cpu0, self._wall0 = time.process_time(), time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.cpu_s += time.process_time() - self._cpu0
            self.wall_s += time.perf_counter() - self._wall0
            self.samples += len(pl_module.rollout_rows(batch["prompt"]))
            point = evaluate(pl_module, batches, toxicity)
            met = target_met(point["toxic_share"], point["rougeL"], self.sft["toxic_share"], self.sft["rougeL"])
            self.curve.append({"iteration": trainer.global_step, "cpu_s": round(self.cpu_s, 3),
                               "wall_s": round(self.wall_s, 3), "samples": self.samples, **point, "met": met})
            log(f"  it {trainer.global_step:3d} cpu {self.cpu_s:7.1f}s toxic {point['toxic_share']:.4f} "
                f"rougeL {point['rougeL']:.4f} kl {point['kl']:.2f}{' *' if met else ''}")
            if first_held([row["met"] for row in self.curve[1:]], hold) is not None:
                trainer.should_stop = True

    return TimeToTarget()


def run_one(method: str, task: str, seed: int, lr: float | None, k: int | None, max_iterations: int,
            eval_prompts: int, hold: int, tag: str, root: Path, rows: int = ROWS_PER_ITERATION) -> dict:
    """One run on the task's artefacts in ``root``; returns its JSON record."""
    import lightning as L
    import torch

    from flan_rlhf.rewards import ProfanityReward

    module, datamodule = build(method, task, seed, root, lr, k, rows)
    batches = evaluation_batches(datamodule, eval_prompts)
    toxicity = ProfanityReward().setup()
    tracker = make_tracker(batches, toxicity, hold)
    trainer = L.Trainer(max_steps=max_iterations, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[tracker])
    trainer.fit(module, datamodule)
    points = tracker.curve[1:]
    reached = first_held([row["met"] for row in points], hold)
    at = points[reached] if reached is not None else None
    settings = module.settings
    return {
        "method": method, "task": task, "seed": seed, "tag": tag,
        "learning_rate": settings.learning_rate, "samples_per_prompt": getattr(settings, "samples_per_prompt", 1),
        "rows_per_iteration": rows, "hold": hold, "eval_prompts": sum(len(b["prompt"]) for b in batches), "max_iterations": max_iterations,
        "threads": torch.get_num_threads(),
        "sft": tracker.sft, "reached": at is not None,
        "iterations": at["iteration"] if at else None, "cpu_s": at["cpu_s"] if at else None,
        "wall_s": at["wall_s"] if at else None, "samples": at["samples"] if at else None,
        "kl": at["kl"] if at else None, "rougeL": at["rougeL"] if at else None,
        "toxic_share": at["toxic_share"] if at else None,
        "best_toxic_share": min(row["toxic_share"] for row in points) if points else None,
        "cpu_s_per_iteration": tracker.cpu_s / max(1, len(points)),
        "curve": tracker.curve,
    }


# ----------------------------------------------------------------------------- driver
def run_key(record: dict) -> tuple:
    return (record["method"], record["task"], record["seed"], record.get("tag", ""),
            record.get("lr_arg"), record.get("k_arg"))


def read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def command_run(args) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(record) for record in read_runs(out)}
    for task in args.tasks:
        root = task_root(task, Path(args.artifacts), args.sft_steps, args.n_train)  # once, before the timed runs
        for method in args.methods:
            k = None if method == "ppo" else args.k
            for seed in args.seeds:
                key = (method, task, seed, args.tag, args.lr, k)
                if key in done:
                    log(f"[skip] {key}: in {out}")
                    continue
                log(f"[run] method={method} task={task} seed={seed} lr={args.lr} k={k} tag={args.tag!r}")
                command = [sys.executable, __file__, "one", "--method", method, "--task", task, "--seed", str(seed),
                           "--max-iterations", str(args.max_iterations), "--eval-prompts", str(args.eval_prompts),
                           "--hold", str(args.hold), "--tag", args.tag, "--root", str(root), "--rows", str(args.rows)]
                if args.lr is not None:
                    command += ["--lr", str(args.lr)]
                if k is not None:
                    command += ["--k", str(k)]
                result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
                if result.returncode != 0:
                    log(f"[fail] {key}: exit {result.returncode}")
                    return result.returncode
                record = json.loads(result.stdout.strip().splitlines()[-1])
                record.update({"lr_arg": args.lr, "k_arg": k})
                with open(out, "a", encoding="utf-8") as handle:  # one line per run: a stopped sweep resumes
                    handle.write(json.dumps(record) + "\n")
                log(f"[done] reached={record['reached']} cpu_s={record['cpu_s']} iterations={record['iterations']}")
    return 0


def command_one(args) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    record = run_one(args.method, args.task, args.seed, args.lr, args.k, args.max_iterations, args.eval_prompts,
                     args.hold, args.tag, Path(args.root), args.rows)
    print(json.dumps(record), flush=True)
    return 0


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (task, method, tag, lr, k): reached count, median and spread of the run figures, AUC."""
    groups: dict[tuple, list[dict]] = {}
    for record in runs:
        groups.setdefault((record["task"], record["method"], record.get("tag", ""), record["learning_rate"],
                           record["samples_per_prompt"]), []).append(record)
    horizons = {}  # per task: the longest run's CPU seconds; a run that stopped at its target keeps its last value
    for record in runs:
        horizons[record["task"]] = max(horizons.get(record["task"], 0.0), record["curve"][-1]["cpu_s"])
    rows = []
    for (task, method, tag, lr, k), records in sorted(groups.items()):
        reached = [r for r in records if r["reached"]]
        horizon = horizons[task]
        aucs = [area_under_curve([p["cpu_s"] for p in r["curve"]], [p["toxic_share"] for p in r["curve"]], horizon)
                for r in records]
        row = {"task": task, "method": method, "tag": tag, "learning_rate": lr, "samples_per_prompt": k,
               "runs": len(records), "reached": len(reached), "horizon_cpu_s": horizon,
               "sft_toxic_share": median_and_spread([r["sft"]["toxic_share"] for r in records])[0],
               "sft_rougeL": median_and_spread([r["sft"]["rougeL"] for r in records])[0],
               "auc_toxic": median_and_spread(aucs),
               "cpu_s_per_iteration": median_and_spread([r["cpu_s_per_iteration"] for r in records])}
        never = [math.inf] * (len(records) - len(reached))  # a run that never got there is slower than any that did
        for key in ("cpu_s", "wall_s", "samples", "iterations"):
            row[key] = median_and_spread([r[key] for r in reached] + never)
        for key in ("kl", "rougeL"):  # at the target: runs that reached it
            row[key] = median_and_spread([r[key] for r in reached])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(triple, digits=1):
        median, low, high = triple
        if math.isnan(median):
            return "-"
        fmt = f"{{:.{digits}f}}"
        show = lambda v: "never" if math.isinf(v) else fmt.format(v)  # noqa: E731
        return f"{show(median)} ({show(low)}-{show(high)})"

    lines = ["| task | method | lr | k | reached | CPU s to target | wall s | iterations | responses | "
             "KL at target | ROUGE-L at target (SFT) | AUC toxic share | CPU s / iteration |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['task']} | {row['method'].upper()} | {row['learning_rate']:g} | {row['samples_per_prompt']} | "
            f"{row['reached']}/{row['runs']} | {cell(row['cpu_s'])} | {cell(row['wall_s'])} | "
            f"{cell(row['iterations'], 0)} | {cell(row['samples'], 0)} | {cell(row['kl'], 2)} | "
            f"{cell(row['rougeL'], 3)} ({row['sft_rougeL']:.3f}) | {cell(row['auc_toxic'], 4)} | "
            f"{cell(row['cpu_s_per_iteration'], 2)} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, tag: str) -> None:
    """Toxic share against CPU seconds, one panel per task, one curve per method: the median over seeds
    on a common grid with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({r["task"] for r in runs if r.get("tag", "") == tag})
    figure, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    colours = {"ppo": "tab:blue", "rloo": "tab:orange", "grpo": "tab:green", "dpo": "tab:red"}
    for axis, task in zip(axes[0], tasks):
        chosen = [r for r in runs if r["task"] == task and r.get("tag", "") == tag]
        horizon = max(r["curve"][-1]["cpu_s"] for r in chosen)
        grid = np.linspace(0.0, horizon, 200)
        for method in [m for m in colours if any(r["method"] == m for r in chosen)]:
            curves = []
            for r in (r for r in chosen if r["method"] == method):
                seconds = np.array([p["cpu_s"] for p in r["curve"]])
                values = np.array([p["toxic_share"] for p in r["curve"]])
                curves.append(values[np.searchsorted(seconds, grid, side="right") - 1])  # step curve, last value held
            stack = np.stack(curves)
            axis.plot(grid, np.median(stack, axis=0), color=colours[method], label=f"{method.upper()} (n={len(curves)})")
            axis.fill_between(grid, stack.min(axis=0), stack.max(axis=0), color=colours[method], alpha=0.18)
        sft = float(np.median([r["sft"]["toxic_share"] for r in chosen]))
        axis.axhline(0.1 * sft, color="black", linestyle="--", linewidth=0.8, label="target: 10% of SFT")
        axis.set_title(f"task: {task}")
        axis.set_xlabel("training CPU seconds (user + system, evaluation excluded)")
        axis.set_ylabel("toxic share of validation responses")
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.suptitle("Time to detox: median over seeds, band = min..max")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def command_report(args) -> int:
    runs = [r for r in read_runs(Path(args.out)) if args.tag is None or r.get("tag", "") == args.tag]
    if not runs:
        log(f"no runs in {args.out}")
        return 2
    rows = summarise(runs)
    print(format_table(rows))
    if args.png:
        plot(runs, Path(args.png), args.tag or "")
        log(f"wrote {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "one"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("--methods", nargs="+", default=["ppo", "rloo", "grpo"])
            p.add_argument("--tasks", nargs="+", default=["tail", "woven"])
            p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
            p.add_argument("--out", default=str(DEFAULT_OUT))
            p.add_argument("--artifacts", default=str(CHECKOUT / "artifacts"),
                           help="where the tasks' demo artefacts are (made if missing): <artifacts>/demo, demo-woven")
            p.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: configs/demo_sft.yaml's)")
            p.add_argument("--n-train", type=int, default=4000, help="training dialogues of a corpus made here")
        else:
            p.add_argument("--method", required=True)
            p.add_argument("--task", required=True)
            p.add_argument("--seed", type=int, required=True)
            p.add_argument("--root", required=True, help="the task's demo artefacts (corpus, SFT model)")
        p.add_argument("--lr", type=float, default=None, help="learning rate (default: the demo config's)")
        p.add_argument("--k", type=int, default=None, help="RLOO/GRPO responses per prompt; prompts = 64 / k")
        p.add_argument("--max-iterations", type=int, default=40)
        p.add_argument("--eval-prompts", type=int, default=400)
        p.add_argument("--hold", type=int, default=3)
        p.add_argument("--rows", type=int, default=ROWS_PER_ITERATION, help="responses per iteration")
        p.add_argument("--tag", default="")
    p = sub.add_parser("report")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--tag", default=None)
    p.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    return {"run": command_run, "one": command_one, "report": command_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
