"""Before/after evaluation: the reference policy and the trained policy on the same prompts.

Both policies answer every evaluation prompt ``k`` times with the same sampling seeds (seed per
batch, identical for both sides). "Before" is the reference: under LoRA the same weights with
the adapters disabled (the SFT or base checkpoint), under full fine-tuning the frozen copy.
Responses are scored for toxicity (and optionally positivity), KL to the reference, and quality
against the references; :func:`flan_rlhf.eval.report.write_report` turns the per-sample rows
into ``metrics.json``, ``report.md`` and figures with bootstrap confidence intervals.

Command line::

    flan-rlhf compare --config configs/flan_t5_base_dialogsum.yaml --ckpt_path checkpoints/.../last.ckpt \\
        --out reports/compare --samples_per_prompt 25
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterable, Sequence

import torch

from flan_rlhf.evaluation_step import EVAL_SEED_OFFSET
from flan_rlhf.ppo import sequence_kl
from flan_rlhf.rewards.base import Reward
from flan_rlhf.rollout import Rollout, response_rows
from flan_rlhf.settings import GenerationSettings


def _toxicity_of(scorer: Any, texts: list[str]) -> torch.Tensor:
    """Toxicity probabilities ``(batch,)`` from a scorer with ``toxicity(texts)``."""
    if not hasattr(scorer, "toxicity"):
        raise ValueError(
            f"toxicity scorer {type(scorer).__name__} has no toxicity(texts) method - use ProfanityReward or DetoxifyReward"
        )
    return torch.as_tensor(scorer.toxicity(texts), dtype=torch.float32).reshape(-1)


@torch.no_grad()
def sample_rows(
    module,
    batches: Iterable[dict[str, Any]],
    side: str,
    generation: GenerationSettings,
    toxicity_scorer: Any,
    positivity: Reward | None = None,
) -> list[dict[str, Any]]:
    """Per-sample rows for one side (``"before"`` = reference, ``"after"`` = trained policy).

    Returns:
        one dict per response: ``prompt_id``, ``sample``, ``prompt``, ``response``, ``references``,
        ``toxicity``, ``positivity`` (if a scorer is given), ``kl`` (0 for the reference),
        ``response_tokens``.
    """
    if side not in ("before", "after"):
        raise ValueError(f"side must be 'before' or 'after', got {side!r}")
    actor = module.actor
    rows: list[dict[str, Any]] = []
    for batch_idx, batch in enumerate(batches):
        module.seed_iteration(EVAL_SEED_OFFSET + batch_idx)  # same seeds for both sides
        reference_only = side == "before"
        context = actor.reference_context() if reference_only and actor.uses_lora else contextlib.nullcontext()
        if reference_only and not actor.uses_lora:
            rollout = _rollout_with_frozen_reference(module, batch["prompt"], generation)
        else:
            with context:
                rollout = module.rollout(batch["prompt"], generation, with_reference=not reference_only, scored=False)
        kl = torch.zeros(len(rollout.texts)) if reference_only else sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask).cpu()
        columns = {"toxicity": _toxicity_of(toxicity_scorer, rollout.texts), "kl": kl}
        columns["response_tokens"] = rollout.mask.sum(1).long()  # the mask is float; counts are ints
        if positivity is not None:
            columns["positivity"] = positivity(rollout.prompts, rollout.texts)
        rows.extend(response_rows(rollout, batch, columns))
    return rows


def _rollout_with_frozen_reference(module, prompts: Sequence[str], generation: GenerationSettings) -> Rollout:
    """Full fine-tuning: sample from the frozen reference copy by swapping it in as the policy."""
    actor = module.actor
    trained = actor.policy
    actor.policy = actor.frozen_reference
    try:
        return module.rollout(list(prompts), generation, with_reference=False, scored=False)
    finally:
        actor.policy = trained


def compare_before_after(
    module,
    batches: Sequence[dict[str, Any]],
    out_dir: str,
    toxicity_scorer: Any,
    positivity: Reward | None = None,
    generation: GenerationSettings | None = None,
    meta: dict[str, Any] | None = None,
    tb_logdir: str | None = None,
    insult_vocabulary: Sequence[str] | None = None,
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Sample both sides on ``batches`` and write the report to ``out_dir``; returns metrics."""
    from flan_rlhf.eval.report import write_report

    generation = generation or module.eval_generation
    module.eval()
    started = time.perf_counter()
    before = sample_rows(module, batches, "before", generation, toxicity_scorer, positivity)
    after = sample_rows(module, batches, "after", generation, toxicity_scorer, positivity)
    samples = max((row["sample"] for row in before), default=0) + 1
    info = {
        "decoding": {
            "mode": "sampled" if generation.do_sample else "greedy",
            "seed": int(module.sampling_seed),
            "temperature": generation.temperature,
            "top_k": generation.top_k,
            "top_p": generation.top_p,
            "max_new_tokens": generation.max_new_tokens,
            "samples_per_prompt": samples,
        },
        "eval_sampling_s": round(time.perf_counter() - started, 2),
    }
    info.update(meta or {})
    return write_report(before, after, out_dir, meta=info, tb_logdir=tb_logdir,
                        insult_vocabulary=insult_vocabulary, n_resamples=n_resamples)


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf compare``: before/after report for a PPO config and checkpoint."""
    from jsonargparse import ArgumentParser

    from flan_rlhf.lightning_cli import build_from_config
    from flan_rlhf.eval.report import format_table

    parser = ArgumentParser(prog="flan-rlhf compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the PPO training YAML (model + data)")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of the trained policy")
    parser.add_argument("--out", default="reports/compare", help="output folder of the report")
    parser.add_argument("--split", default="test", choices=["test", "validation"], help="evaluation split of the data module")
    parser.add_argument("--samples_per_prompt", type=int, default=1, help="k samples per prompt (25 for RealToxicityPrompts metrics)")
    parser.add_argument("--max_prompts", type=int | None, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--greedy", type=bool, default=False, help="greedy decoding instead of seeded sampling")
    parser.add_argument("--toxicity", type=Reward | None, default=None,
                        help="toxicity scorer with toxicity(texts) (default: ProfanityReward)")
    parser.add_argument("--positivity", type=Reward | None, default=None, help="optional positivity scorer, e.g. VaderReward")
    args = parser.parse_args(argv)
    init = parser.instantiate_classes(args)

    module, datamodule = build_from_config(args.config, [
        f"--data.init_args.samples_per_prompt={args.samples_per_prompt}",
        *( [f"--data.init_args.max_eval_prompts={args.max_prompts}"] if args.max_prompts else []),
    ])
    load_trained_weights(module, args.ckpt_path)
    datamodule.setup("test" if args.split == "test" else "validate")
    loader = datamodule.test_dataloader() if args.split == "test" else datamodule.val_dataloader()
    generation = module.eval_generation
    if args.greedy:
        generation = GenerationSettings(**{**vars(generation), "do_sample": False})
    if init.toxicity is None:
        from flan_rlhf.rewards import ProfanityReward

        toxicity = ProfanityReward()
    else:
        toxicity = init.toxicity
    toxicity.setup(module.device)
    if init.positivity is not None:
        init.positivity.setup(module.device)
    metrics = compare_before_after(module, list(loader), args.out, toxicity, init.positivity, generation,
                                   meta={"checkpoint": args.ckpt_path, "config": args.config})
    print(format_table(metrics))
    print(f"report written to {args.out}")
    return 0


def load_trained_weights(module, ckpt_path: str) -> None:
    """Load a PPOModule Lightning checkpoint into an already-built module (weights + PPO state)."""
    from flan_rlhf.checkpointing import read_checkpoint_file

    # weights_only load (no pickled code runs); a cut-short or foreign file is one clear error
    checkpoint = read_checkpoint_file(ckpt_path)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
