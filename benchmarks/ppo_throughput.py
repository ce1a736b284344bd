#!/usr/bin/env python
"""PPO throughput of flan-rlhf's own training step, comparable with the TRL anchor.

Same flags, model, prompts, sampling, reward and PPO hyperparameters as
``/work/shared/anchor/ppo_throughput.py`` (TRL 0.11.4 seq2seq PPOTrainer). The work is done
by the package: a :class:`flan_rlhf.module.PPOModule` (built from ``PolicySpec`` /
``LoraSettings`` / ``GenerationSettings`` / ``PPOSettings``) is fitted by a
``lightning.Trainer`` (cpu, ``logger=False``) for ``warmup + steps`` PPO iterations, exactly
the ``training_step`` that ``flan-rlhf fit`` runs.

Prints exactly ONE JSON line on stdout (everything else goes to stderr).

Timing (per measured iteration, averaged over ``--steps`` after ``--warmup`` iterations):
  gen_s_per_step    wall time of sampling the responses (``flan_rlhf.rollout.sample_with_statistics``,
                    which also yields the old log-probs, values and entropies)
  reward_s_per_step wall time of ``PPOModule.score_rollout`` (decoded texts -> vowel fraction)
  train_s_per_step  the rest of ``training_step``: the reference forward, KL-penalised rewards, GAE, ppo_epochs x minibatch forward/backward/AdamW, statistics,
                    LR scheduler. With logger=False ``self.log_dict`` writes nothing.
  samples_per_s     responses * steps / sum(whole training_step time) over measured iterations
                    (responses = batch_size, or batch_size x samples_per_prompt for RLOO/GRPO)

``--method rloo`` / ``grpo`` fits :class:`flan_rlhf.critic_free.RLOOModule` / ``GRPOModule``
instead (``--samples-per-prompt`` responses to each of the ``--batch-size`` prompts, no value
head; the other hyperparameters as for PPO), for ``benchmarks/host_syncs.py`` and comparisons
inside the package (the TRL anchor is PPO only).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

import lightning as L
import transformers
from torch.utils.data import DataLoader

from flan_rlhf import module as module_lib
from flan_rlhf import ppo as ppo_lib
from flan_rlhf import rollout as rollout_lib
from flan_rlhf.critic_free import GRPOModule, RLOOModule
from flan_rlhf.module import PPOModule
from flan_rlhf.on_policy import OnPolicyModule
from flan_rlhf.policy import LoraSettings, PolicySpec
from flan_rlhf.rewards.base import Reward
from flan_rlhf.settings import GenerationSettings, GRPOSettings, PPOSettings, RLOOSettings

#: --method -> (module class, its settings class, the settings' argument name)
METHODS = {"ppo": (PPOModule, PPOSettings, "ppo"), "rloo": (RLOOModule, RLOOSettings, "rloo"),
              "grpo": (GRPOModule, GRPOSettings, "grpo")}

# The anchor's word list and prompt sampler, verbatim (same prompts for the same seed).
WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu "
    "red green blue yellow orange purple black white river mountain forest desert ocean "
    "cloud storm rain snow wind fire stone iron gold silver quick slow happy sad bright "
    "dark cold warm small large ancient modern city village road bridge tower garden "
    "summarize translate describe explain the a of to and in is was for on with"
).split()
VOWELS = set("aeiouAEIOU")


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def make_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts of 4-10 words from ``WORDS`` (the anchor's ``make_prompts``)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        k = rng.randint(4, 10)
        prompts.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    return prompts


def vowel_fraction(text: str) -> float:
    """Fraction of vowels among the letters of ``text``; 0 when it has no letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(c in VOWELS for c in letters) / len(letters)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0, help="T5 dropout_rate (the package sets dropout to 0 anyway)")
    p.add_argument("--lora", action="store_true", help="LoRA r=8 alpha=16 on q,v; reference = adapter-disabled policy")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--method", choices=sorted(METHODS), default="ppo",
                   help="ppo (the anchor's), or the critic-free rloo / grpo on the same workload")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="k responses per prompt (rloo, grpo only)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="the package's default (TRL 0.11 default: none); a negative value disables clipping")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "threads", "num_prompts"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if responses_per_step(args) % args.mini_batch_size:
        raise SystemExit(f"error: {responses_per_step(args)} responses per step (--batch-size x --samples-per-prompt for "
                         f"rloo/grpo) are not a multiple of --mini-batch-size {args.mini_batch_size}")
    if args.num_prompts < args.batch_size:
        raise SystemExit(f"error: --num-prompts {args.num_prompts} is smaller than --batch-size {args.batch_size}")
    return args


class VowelFractionReward(Reward):
    """Fraction of vowels among the letters of each response (free to compute)."""

    name = "vowel_fraction"

    def components(self, prompts, responses):
        return {self.name: torch.tensor([vowel_fraction(t) for t in responses], dtype=torch.float32)}


def build_module(args: argparse.Namespace) -> OnPolicyModule:
    """The package's module for the benchmark configuration (PPO unless ``--method`` says otherwise),
    model built (``configure_model``)."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=0.0, target_modules=["q", "v"]) if args.lora else None
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=0, temperature=1.0,
                                    top_k=0, top_p=1.0, do_sample=True)
    module_class, settings_class, settings_name = METHODS[args.method]
    group = {} if args.method == "ppo" else {"samples_per_prompt": args.samples_per_prompt}
    ppo_settings = settings_class(learning_rate=1.41e-5, ppo_epochs=args.ppo_epochs, mini_batch_size=args.mini_batch_size,
                                  adaptive_kl=True, init_kl_coef=0.2,
                                  max_grad_norm=args.max_grad_norm if args.max_grad_norm >= 0 else None, **group)
    policy = PolicySpec(tokenizer="byt5", t5_config={
        "d_model": args.d_model, "d_ff": args.d_ff, "num_layers": args.layers, "num_heads": args.heads,
        "dropout_rate": args.dropout, "seed": args.seed,
    })
    model = module_class(policy=policy, reward=VowelFractionReward(), lora=lora, generation=generation,
                         sampling_seed=args.seed, log_samples_every_n_steps=0, **{settings_name: ppo_settings})
    model.configure_model()
    return model


def responses_per_step(args: argparse.Namespace) -> int:
    """Responses sampled per iteration: one per prompt for PPO, ``samples_per_prompt`` for RLOO/GRPO."""
    return args.batch_size * (1 if args.method == "ppo" else args.samples_per_prompt)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning")
    # resident memory after the imports, before any model exists (the anchor's method: ru_maxrss)
    rss_after_import_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)

    model = build_module(args)
    n_params = sum(p.numel() for p in model.actor.parameters())
    n_train = sum(p.numel() for p in model.actor.parameters() if p.requires_grad)
    ppo_settings, generation = model.settings, model.generation

    # ---- timers around the package's own functions (nothing in the package is changed)
    timings: list[dict[str, float]] = []
    current: dict[str, float] = {}

    depth: dict[str, int] = {}

    def timed(fn, key):
        """``fn`` with its wall time added to ``current[key]`` (outermost call only, so a timed
        function calling another timed one is not counted twice)."""
        def wrapper(*a, **kw):
            depth[key] = depth.get(key, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[key] -= 1
                if depth[key] == 0:
                    current[key] = current.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    # generation = sampling, wherever the module calls it from
    for lib in (module_lib, rollout_lib):
        for name in ("sample_with_statistics",):
            if hasattr(lib, name):
                setattr(lib, name, timed(getattr(lib, name), "gen"))
    model.score_rollout = timed(model.score_rollout, "reward")

    # The first minibatch of each iteration sees the rollout's own weights: its importance
    # ratio exp(new - old) must be 1 up to float rounding, whether the old log-probs came from
    # a teacher-forced forward or from the sampling pass. Record max |ratio - 1| there.
    masked_ratio_mean = ppo_lib.masked_ratio_mean

    def recording_ratio_mean(logprobs, old_logprobs, mask, **kwargs):
        if "first_ratio_dev" not in current:
            keep = mask.bool()
            current["first_ratio_dev"] = float((torch.exp(logprobs - old_logprobs)[keep] - 1).abs().max())
        return masked_ratio_mean(logprobs, old_logprobs, mask, **kwargs)

    ppo_lib.masked_ratio_mean = recording_ratio_mean
    iteration_stats: list[dict[str, float]] = []
    ppo_iteration = model.ppo_iteration

    def recording_ppo_iteration(prompts, optimizer, references=None):
        stats = ppo_iteration(prompts, optimizer, references)
        iteration_stats.append(dict(stats))
        return stats

    model.ppo_iteration = recording_ppo_iteration
    training_step = model.training_step

    def timed_training_step(batch, batch_idx):
        current.clear()
        t0 = time.perf_counter()
        training_step(batch, batch_idx)
        current["total"] = time.perf_counter() - t0
        timings.append(dict(current))
        s = iteration_stats[-1]
        it = len(timings) - 1
        log(f"step {it} ({'warmup' if it < args.warmup else 'measured'}): gen {current.get('gen', 0):.2f}s "
            f"reward {current.get('reward', 0):.4f}s train {current['total'] - current.get('gen', 0) - current.get('reward', 0):.2f}s "
            f"mean_resp_len {s['tokens/response_len_mean']:.1f} score {s['env/reward_mean']:.3f} "
            f"kl {s.get('objective/kl', float('nan')):.4f} kl_coef {s['objective/kl_coef']:.4f} "
            f"updates {s.get('ppo/updates', 0):.0f} first-minibatch max|ratio-1| {current.get('first_ratio_dev', float('nan')):.2e}")

    model.training_step = timed_training_step

    prompts = make_prompts(args.num_prompts, args.seed)
    loader = DataLoader(prompts, batch_size=args.batch_size, shuffle=False, drop_last=True,
                        collate_fn=lambda rows: {"prompt": list(rows)})
    total = args.warmup + args.steps
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=total, max_epochs=-1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    if len(timings) != total:
        raise SystemExit(f"error: expected {total} PPO iterations, ran {len(timings)}")

    measured = timings[args.warmup:]
    stats = iteration_stats[args.warmup:]
    gen = [t.get("gen", 0.0) for t in measured]
    reward = [t.get("reward", 0.0) for t in measured]
    train = [t["total"] - g - r for t, g, r in zip(measured, gen, reward)]
    out = {
        "impl": "flan-rlhf",
        "samples_per_s": round(responses_per_step(args) * args.steps / sum(t["total"] for t in measured), 4),
        "gen_s_per_step": round(float(np.mean(gen)), 4),
        "train_s_per_step": round(float(np.mean(train)), 4),
        "reward_s_per_step": round(float(np.mean(reward)), 6),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "rss_after_import_mb": rss_after_import_mb,
        "torch_threads": torch.get_num_threads(),
        "mean_response_tokens": round(float(np.mean([s["tokens/response_len_mean"] for s in stats])), 2),
        "mean_score": round(float(np.mean([s["env/reward_mean"] for s in stats])), 4),
        "last_objective_kl": round(float(stats[-1].get("objective/kl", float("nan"))), 6),
        "last_kl_coef": round(float(stats[-1]["objective/kl_coef"]), 6),
        "ppo_updates_per_step": [int(s.get("ppo/updates", 0)) for s in stats],
        "first_minibatch_max_abs_ratio_minus_1": max(t.get("first_ratio_dev", float("nan")) for t in timings),
        "ratio_threshold_skips": int(sum(s.get("guards/ratio_skipped", 0) for s in iteration_stats)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "lightning": L.__version__, "peft": __import__("peft").__version__ if args.lora else None},
        "config": {
            "d_model": args.d_model, "d_ff": args.d_ff, "layers": args.layers, "heads": args.heads,
            "vocab": len(model.tokenizer), "dropout": args.dropout, "lora": args.lora,
            "lora_r": args.lora_r if args.lora else None, "lora_alpha": args.lora_alpha if args.lora else None,
            "params_total": n_params, "params_trainable": n_train,
            "steps": args.steps, "warmup": args.warmup, "num_prompts": args.num_prompts,
            "method": args.method, "responses_per_step": responses_per_step(args),
            "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size, "ppo_epochs": args.ppo_epochs,
            "max_new_tokens": args.max_new_tokens, "learning_rate": ppo_settings.learning_rate,
            "init_kl_coef": ppo_settings.init_kl_coef, "adap_kl_ctrl": ppo_settings.adaptive_kl,
            "max_grad_norm": ppo_settings.max_grad_norm, "seed": args.seed,
            "gen": {"do_sample": generation.do_sample, "top_k": generation.top_k, "top_p": generation.top_p,
                    "temperature": generation.temperature, "min_new_tokens": generation.min_new_tokens},
        },
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
