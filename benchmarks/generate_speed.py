#!/usr/bin/env python
"""Generation speed and quality of each export of a LoRA policy, against the unmerged adapter.

Variants (all loaded the way ``flan-rlhf generate`` loads them, exports written by
``flan-rlhf export``):
  base      the base model alone (no adapter)
  adapter   base + the LoRA adapter, unmerged (peft) - the reference for quality
  merged    ``export``            LoRA merged into the weights, fp32
  bf16      ``export --dtype bf16``
  int8      ``export --int8``     int8 dynamic quantisation of every Linear
  merged-fused  the merged fp32 export decoded by ``flan-rlhf generate``'s default fused T5
            decoder (``flan_rlhf.rollout.fused_generate``; the same tokens as ``generate``)

Every other variant decodes with transformers' ``generate`` (``generate_ids(..., fused=False)``,
``flan-rlhf generate --hf-generate``): what a user of plain transformers/peft runs.

Policy: by default a small FLAN-T5-architecture model built from config (the shape of
``benchmarks/ppo_throughput.py``: d_model 256, d_ff 512, 4+4 layers, 4 heads; ByT5 byte
vocabulary; ``--d-model 512 --d-ff 1024 --layers 8 --heads 6`` is FLAN-T5-small's shape) with
LoRA r=8 alpha=16 on q,v whose B matrices are random (``--lora-b-std``), so the adapter
changes the outputs. ``--ckpt`` (a PPOModule checkpoint)
or ``--adapter`` (+ ``--base``) benchmarks a trained policy instead.

Speed: greedy, batch 32, exactly ``--max-new-tokens`` new tokens per prompt (EOS suppressed
until then, so every variant does the same work); tokens/s = generated tokens / wall time of
``generate_ids`` (prompt encoding included); the median over ``--repeats`` rounds after
``--warmup``; each round runs every variant once, in a fresh random order. Speed-ups are
paired: the median over rounds of (variant / adapter in the same round). Also
tokens per CPU-second (``time.process_time``, all threads): on a shared machine wall time
swings 2-3x with other load (measured here, CPU time swung nearly as much: shared caches and
memory bandwidth, the thread pool's spin-waits). And best-of-runs (max tokens/s): interference only ever slows a
run down, so the fastest run is the least disturbed one (as ``timeit`` reports).
Quality: greedy with EOS on ``--n-quality`` prompts; per variant, against the adapter:
next-token agreement (teacher-forced top-1 on the adapter's responses, per token), ROUGE-L F
of the greedy responses (per response, mean; identical responses count 1), the share of
identical responses; the toxic share (alt-profanity-check ``predict_prob >= 0.5``) with a 95%
bootstrap interval; and, when the prompts have references, ROUGE-L against them.

Prompts: the demo corpus test split (``flan_rlhf.demo.corpus``, clean summaries as references)
under the ``summarize_dialogue`` template, or ``--prompts FILE`` (.jsonl with ``--field`` and an
optional ``--reference-field``, or .txt).

Prints one JSON line per variant on stdout, then a Markdown table (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch

VARIANTS = ("base", "adapter", "merged", "bf16", "int8", "merged-fused")
FUSED_SUFFIX = "-fused"  # the export decoded by ``flan-rlhf generate``'s default fused T5 decoder
EXPORT_FLAGS = {"merged": [], "bf16": ["--dtype", "bf16"], "int8": ["--format", "int8"]}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="PPOModule checkpoint to benchmark (LoRA)")
    src.add_argument("--adapter", help="LoRA adapter folder to benchmark (with --base or its adapter_config base)")
    p.add_argument("--base", help="base model of --adapter / --ckpt (overrides the recorded one)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--d-kv", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-b-std", type=float, default=0.02, help="std of the random LoRA B matrices (default model)")
    p.add_argument("--prompts", help=".jsonl or .txt prompts (default: demo corpus test split)")
    p.add_argument("--field", default="dialogue", help="prompt key in --prompts .jsonl")
    p.add_argument("--reference-field", default="clean_summary", help="reference key in --prompts .jsonl (optional)")
    p.add_argument("--template", default="summarize_dialogue")
    p.add_argument("--n-speed", type=int, default=32, help="prompts in each timed run")
    p.add_argument("--n-quality", type=int, default=128, help="prompts for the quality comparison")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--quality-max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--workdir", help="keep the exports here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown or "adapter" not in args.variants:
        p.error(f"--variants must include 'adapter' (the reference) and only use {', '.join(VARIANTS)}")
    return args


# ----------------------------------------------------------------------------- prompts
def load_prompts(args) -> tuple[list[str], list[str] | None]:
    """``(prompts, references or None)``; at least ``max(n_speed, n_quality)`` of them."""
    from flan_rlhf.data.templates import apply_template, resolve_template

    template = resolve_template(args.template)
    n = max(args.n_speed, args.n_quality)
    if args.prompts is None:
        from flan_rlhf.demo.corpus import generate_split

        rows = generate_split("test", n, seed=args.seed, toxic_share=0.0)
        return [apply_template(template, r["dialogue"]) for r in rows], [r["clean_summary"] for r in rows]
    if args.prompts.endswith(".txt"):
        with open(args.prompts, encoding="utf-8") as fh:
            lines = [line.rstrip("\n") for line in fh if line.strip()]
        return [apply_template(template, line) for line in lines][:n], None
    with open(args.prompts, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()][:n]
    refs = [r[args.reference_field] for r in rows] if rows and all(args.reference_field in r for r in rows) else None
    return [apply_template(template, r[args.field]) for r in rows], refs


# ----------------------------------------------------------------------------- policies
def prepare_base_and_adapter(args, workdir: str) -> tuple[str, str]:
    """Folders ``(base_dir, adapter_dir)`` of the policy to benchmark."""
    from transformers import ByT5Tokenizer

    from flan_rlhf.policy import save_adapter
    from flan_rlhf.tools.export import actor_from_checkpoint, read_checkpoint
    from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec, build_t5_from_config, load_policy_model

    if args.adapter:
        if args.base is None:
            with open(os.path.join(args.adapter, "adapter_config.json"), encoding="utf-8") as fh:
                args.base = json.load(fh).get("base_model_name_or_path")
        if not args.base:
            raise SystemExit("error: the adapter does not name its base - pass --base")
        return args.base, args.adapter
    base_dir, adapter_dir = os.path.join(workdir, "base"), os.path.join(workdir, "adapter")
    if args.ckpt:
        actor, tokenizer, _ = actor_from_checkpoint(read_checkpoint(args.ckpt), args.base)
        if not actor.uses_lora:
            raise SystemExit("error: the checkpoint is full fine-tuning; this benchmark compares LoRA exports")
        copy.deepcopy(actor.policy).unload().save_pretrained(base_dir)  # LoRA layers removed, not merged
    else:
        tokenizer = ByT5Tokenizer()
        build_t5_from_config(len(tokenizer), d_model=args.d_model, d_ff=args.d_ff, d_kv=args.d_kv, num_layers=args.layers,
                             num_heads=args.heads, seed=args.seed).save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        model, tokenizer = load_policy_model(PolicySpec(name_or_path=base_dir))
        actor = ActorCritic(model, LoraSettings(r=args.lora_r, alpha=args.lora_alpha, target_modules=["q", "v"]))
        generator = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for name, p in actor.policy.named_parameters():
                if "lora_B" in name:  # peft starts B at 0 (adapter = identity); a trained one is not
                    p.copy_(torch.randn(p.shape, generator=generator) * args.lora_b_std)
    tokenizer.save_pretrained(base_dir)
    save_adapter(actor, tokenizer, adapter_dir)
    return base_dir, adapter_dir


def export_variants(args, base_dir: str, adapter_dir: str, workdir: str) -> dict[str, tuple[str, str | None]]:
    """Run ``flan-rlhf export`` for each export variant; ``{variant: (model, adapter)}`` to load."""
    from flan_rlhf.tools import export as export_cli

    sources: dict[str, tuple[str, str | None]] = {"base": (base_dir, None), "adapter": (base_dir, adapter_dir)}
    for variant, flags in EXPORT_FLAGS.items():
        if variant not in args.variants:
            continue
        out = os.path.join(workdir, f"export-{variant}")
        with contextlib.redirect_stdout(sys.stderr):
            code = export_cli.main(["--adapter", adapter_dir, "--base", base_dir, "--out", out, "--overwrite", "true", *flags])
        if code != 0:
            raise SystemExit(f"error: export of {variant} failed")
        sources[variant] = (out, None)
    for variant in args.variants:
        if variant.endswith(FUSED_SUFFIX):
            sources[variant] = sources[variant.removesuffix(FUSED_SUFFIX)]
    return {v: sources[v] for v in args.variants}


def folder_mb(model: str, adapter: str | None) -> float:
    files = [os.path.join(model, f) for f in os.listdir(model)] if os.path.isdir(model) else []
    weights = [f for f in files if f.endswith(".safetensors")]
    if adapter:
        weights += [os.path.join(adapter, "adapter_model.safetensors")]
    return sum(os.path.getsize(f) for f in weights) / 2**20


# ----------------------------------------------------------------------------- quality
def rouge_l_agreement(predictions: list[str], references: list[str]) -> np.ndarray:
    """Per-response ROUGE-L F of ``predictions`` against ``references``; identical strings count 1
    (ROUGE gives 0 when a text has no alphanumeric tokens, even against itself)."""
    from flan_rlhf.eval.metrics import rouge_per_sample

    scores = rouge_per_sample(predictions, references, rouge_keys=("rougeL",))["rougeL"].numpy()
    same = np.array([p == r for p, r in zip(predictions, references)])
    return np.where(same, 1.0, scores)


def toxic_flags(texts: list[str]) -> np.ndarray:
    from profanity_check import predict_prob

    return (np.asarray(predict_prob(texts)) >= 0.5).astype(np.float64) if texts else np.zeros(0)


def quality(texts: dict[str, list[str]], ids: dict[str, list[list[int]]], references: list[str] | None) -> dict[str, dict]:
    from flan_rlhf.eval.bootstrap import paired_bootstrap

    ref_texts = texts["adapter"]
    ref_toxic = toxic_flags(ref_texts)
    ref_rouge_vs_refs = rouge_l_agreement(ref_texts, references).mean() if references else None
    out = {}
    for variant, variant_texts in texts.items():
        toxic = toxic_flags(variant_texts)
        boot = paired_bootstrap(ref_toxic, toxic, n_resamples=2000, seed=0)
        row = {
            "rougeL_vs_adapter": float(rouge_l_agreement(variant_texts, ref_texts).mean()),
            "identical_vs_adapter": float(np.mean([a == b for a, b in zip(ids[variant], ids["adapter"])])),
            "toxic_share": float(toxic.mean()),
            "toxic_share_ci95": [boot.after.ci_low, boot.after.ci_high],
            "toxic_delta_vs_adapter_ci95": [boot.delta.ci_low, boot.delta.ci_high],
            "toxic_within_adapter_ci": bool(boot.before.ci_low <= toxic.mean() <= boot.before.ci_high),
            "mean_response_tokens": float(np.mean([len(x) for x in ids[variant]])),
        }
        if references:
            score = float(rouge_l_agreement(variant_texts, references).mean())
            row["rougeL_vs_reference"] = score
            row["rougeL_vs_reference_rel_change"] = (score - ref_rouge_vs_refs) / ref_rouge_vs_refs if ref_rouge_vs_refs else 0.0
        out[variant] = row
    return out


@torch.inference_mode()
def teacher_forced_argmax(model, tokenizer, prompts: list[str], responses: list[list[int]], batch_size: int) -> list[list[int]]:
    """The model's top-1 next token at every position of given responses (teacher forcing).

    Comparing these between two models counts per-step disagreements without the cascade of
    greedy decoding (one flipped token changes everything after it).

    Returns:
        ``len(prompts)`` lists, the i-th of length ``len(responses[i])``.
    """
    start = model.config.decoder_start_token_id
    out: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = responses[lo:lo + batch_size]
        enc = tokenizer(prompts[lo:lo + batch_size], padding=True, return_tensors="pt")
        width = max(1, max(len(r) for r in chunk))
        decoder_input = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, r in enumerate(chunk):  # [start] + response[:-1]
            decoder_input[i, 0] = start
            decoder_input[i, 1:len(r)] = torch.tensor(r[:-1], dtype=torch.long)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], decoder_input_ids=decoder_input).logits
        top1 = logits.float().argmax(-1).tolist()
        out += [row[:len(r)] for row, r in zip(top1, chunk)]
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from flan_rlhf.tools.command import quiet_progress_bars
    from flan_rlhf.settings import GenerationSettings
    from flan_rlhf.tools.generate import decode, generate_ids, load_generation_model

    quiet_progress_bars()
    prompts, references = load_prompts(args)
    speed_prompts, quality_prompts = prompts[: args.n_speed], prompts[: args.n_quality]
    quality_refs = references[: args.n_quality] if references else None
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="genspeed-"))
        os.makedirs(workdir, exist_ok=True)
        base_dir, adapter_dir = prepare_base_and_adapter(args, workdir)
        sources = export_variants(args, base_dir, adapter_dir, workdir)
        models, load_s = {}, {}
        for variant, (model_path, adapter) in sources.items():
            t0 = time.perf_counter()
            models[variant] = load_generation_model(model_path, adapter)[:2]
            load_s[variant] = time.perf_counter() - t0
        tokenizer = models["adapter"][1]

        # every variant decodes with transformers' generate (what plain transformers/peft users run),
        # except "*-fused", which uses flan-rlhf generate's default fused T5 decoder (same tokens)
        speed_settings = GenerationSettings(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                            do_sample=False)
        runs: dict[str, list[float]] = {v: [] for v in sources}
        cpu_runs: dict[str, list[float]] = {v: [] for v in sources}
        order_rng = np.random.default_rng(args.seed)
        for round_index in range(args.warmup + args.repeats):
            # Interleaved, in a fresh random order each round: slow spells of a shared machine hit
            # every variant alike, and no variant always runs right after the same neighbour.
            for variant in order_rng.permutation(list(models)).tolist():
                model = models[variant][0]
                t0, c0 = time.perf_counter(), time.process_time()
                ids = generate_ids(model, tokenizer, speed_prompts, speed_settings, batch_size=args.batch_size,
                                   fused=variant.endswith(FUSED_SUFFIX))
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                n_tokens = sum(len(x) for x in ids)
                if round_index >= args.warmup:
                    runs[variant].append(n_tokens / elapsed)
                    cpu_runs[variant].append(n_tokens / cpu)
            if round_index >= args.warmup:
                log(f"run {round_index + 1 - args.warmup}/{args.repeats}: "
                    + ", ".join(f"{v} {runs[v][-1]:.0f} tok/s ({cpu_runs[v][-1]:.0f} tok/cpu-s)" for v in runs))

        quality_settings = GenerationSettings(max_new_tokens=args.quality_max_new_tokens, do_sample=False)
        ids_by_variant = {v: generate_ids(m, tokenizer, quality_prompts, quality_settings, batch_size=args.batch_size,
                                          fused=v.endswith(FUSED_SUFFIX)) for v, (m, _) in models.items()}
        texts = {v: decode(tokenizer, ids) for v, ids in ids_by_variant.items()}
        quality_rows = quality(texts, ids_by_variant, quality_refs)
        reference_choice = teacher_forced_argmax(models["adapter"][0], tokenizer, quality_prompts, ids_by_variant["adapter"], args.batch_size)
        for variant, (model, _) in models.items():
            choice = teacher_forced_argmax(model, tokenizer, quality_prompts, ids_by_variant["adapter"], args.batch_size)
            same = [a == b for row_a, row_b in zip(choice, reference_choice) for a, b in zip(row_a, row_b)]
            quality_rows[variant]["next_token_agreement"] = float(np.mean(same)) if same else 1.0
        sizes = {v: folder_mb(*sources[v]) for v in sources}

    tps = {v: statistics.median(runs[v]) for v in runs}
    cpu_tps = {v: statistics.median(cpu_runs[v]) for v in cpu_runs}
    # Paired: the ratio to the adapter within each round (same machine state), then the median.
    paired = {v: statistics.median(a / b for a, b in zip(runs[v], runs["adapter"])) for v in runs}
    paired_base = {v: statistics.median(a / b for a, b in zip(runs[v], runs["base"])) for v in runs} if "base" in runs else {}
    config = {k: getattr(args, k) for k in ("ckpt", "adapter", "base", "d_model", "d_ff", "d_kv", "layers", "heads", "lora_r",
                                            "lora_alpha", "lora_b_std", "n_speed", "n_quality", "batch_size", "max_new_tokens",
                                            "quality_max_new_tokens", "repeats", "warmup", "threads", "seed")}
    config.update(torch=torch.__version__, quantized_engine=torch.backends.quantized.engine)
    rows = []
    for variant in sources:
        q = quality_rows[variant]
        row = {"variant": variant, "tokens_per_s": round(tps[variant], 1),
               "tokens_per_s_runs": [round(x, 1) for x in runs[variant]],
               "speedup_vs_adapter": round(tps[variant] / tps["adapter"], 3),
               "speedup_vs_base": round(tps[variant] / tps["base"], 3) if "base" in tps else None,
               "best_tokens_per_s": round(max(runs[variant]), 1),
               "best_speedup_vs_adapter": round(max(runs[variant]) / max(runs["adapter"]), 3),
               "paired_speedup_vs_adapter": round(paired[variant], 3),
               "paired_speedup_vs_base": round(paired_base[variant], 3) if paired_base else None,
               "tokens_per_cpu_s": round(cpu_tps[variant], 1),
               "tokens_per_cpu_s_runs": [round(x, 1) for x in cpu_runs[variant]],
               "cpu_speedup_vs_adapter": round(cpu_tps[variant] / cpu_tps["adapter"], 3),
               "cpu_speedup_vs_base": round(cpu_tps[variant] / cpu_tps["base"], 3) if "base" in cpu_tps else None,
               "weights_mb": round(sizes[variant], 1), "load_s": round(load_s[variant], 2), **q}
        if variant not in ("base", "adapter"):
            rouge_ok = q["rougeL_vs_reference_rel_change"] >= -0.01 if "rougeL_vs_reference" in q else q["rougeL_vs_adapter"] >= 0.99
            # Issue #6 targets: a recommended export >= 1.3x the adapter's tokens/s with ROUGE-L within 1%
            # and the toxic share inside the adapter's interval; the merged fp32 export within 5% of base.
            row["meets_export_target"] = bool(row["paired_speedup_vs_adapter"] >= 1.3 and rouge_ok and q["toxic_within_adapter_ci"])
        if variant in ("merged", "merged-fused") and row["paired_speedup_vs_base"] is not None:
            row["within_5pct_of_base"] = bool(abs(row["paired_speedup_vs_base"] - 1.0) <= 0.05)
        row["config"] = config
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| variant | tokens/s (median) | vs adapter (paired) | vs base (paired) | best tokens/s | best vs adapter | tokens/CPU-s | weights MB "
          "| next-token agreement | ROUGE-L vs adapter | identical | toxic share [95% CI] |" + (" ROUGE-L vs ref |" if quality_refs else ""))
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if quality_refs else ""))
    for r in rows:
        ci = r["toxic_share_ci95"]
        line = (f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['paired_speedup_vs_adapter']:.2f}x | "
                f"{(r['paired_speedup_vs_base'] or 0):.2f}x | {r['best_tokens_per_s']:.0f} | {r['best_speedup_vs_adapter']:.2f}x | "
                f"{r['tokens_per_cpu_s']:.0f} | "
                f"{r['weights_mb']:.1f} | {r['next_token_agreement']:.3f} | "
                f"{r['rougeL_vs_adapter']:.3f} | {r['identical_vs_adapter']:.2f} | {r['toxic_share']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
        if quality_refs:
            line += f" {r['rougeL_vs_reference']:.3f} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
