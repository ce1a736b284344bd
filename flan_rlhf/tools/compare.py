"""Before/after evaluation: the reference policy and the trained policy on the same prompts.

Both policies answer every evaluation prompt ``k`` times with the same sampling seeds (seed per
batch, identical for both sides). "Before" is the reference: under LoRA the same weights with
the adapters disabled (the SFT or base checkpoint), under full fine-tuning the frozen copy.
Responses are scored for toxicity (and optionally positivity), KL to the reference, and quality
against the references; :func:`flan_rlhf.eval.report.write_report` turns the per-sample rows
into ``metrics.json``, ``report.md`` and figures with bootstrap confidence intervals.

Command line::

    flan-rlhf compare --config configs/flan_t5_base_dialogsum.yaml --ckpt_path last \\
        --out reports/compare --data.samples_per_prompt 25
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import torch

from flan_rlhf.evaluation_step import EVAL_SEED_OFFSET
from flan_rlhf.output_dirs import OutputDirError
from flan_rlhf.ppo import sequence_kl
from flan_rlhf.progress import RowProgress, seconds
from flan_rlhf.rewards.base import Reward, set_up_reward
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
    progress: RowProgress | None = None,
) -> list[dict[str, Any]]:
    """Per-sample rows for one side (``"before"`` = reference, ``"after"`` = trained policy).

    ``progress`` is advanced by one per batch.

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
        if progress is not None:
            progress.update(1)
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
    with RowProgress(2 * len(batches), "compare", unit="batches") as progress:  # reference side, then trained side
        before = sample_rows(module, batches, "before", generation, toxicity_scorer, positivity, progress)
        after = sample_rows(module, batches, "after", generation, toxicity_scorer, positivity, progress)
    samples = max((row["sample"] for row in before), default=0) + 1
    info = {
        "decoding": {"mode": generation.mode, "seed": int(module.sampling_seed),
                     **{key: value for key, value in asdict(generation).items() if key != "do_sample"},  # in mode
                     "samples_per_prompt": samples},
        "eval_sampling_s": round(time.perf_counter() - started, 2),
    }
    info.update(meta or {})
    return write_report(before, after, out_dir, meta=info, tb_logdir=tb_logdir,
                        insult_vocabulary=insult_vocabulary, n_resamples=n_resamples)


@dataclass
class CompareOptions:
    """What ``flan-rlhf compare`` evaluates and where it writes (the model, data and trainer come from the training YAML).

    Args:
        ckpt_path: Lightning checkpoint of the trained policy, or ``last`` for the newest complete
            checkpoint in the config's ModelCheckpoint folder.
        out: report folder (metrics.json, report.md, per-sample rows, figures).
        overwrite: replace the report files of an existing, non-empty ``out`` folder.
        split: evaluation split of the data module: test or validation. The rest of the protocol is the data
            module's and the model's, settable here as in ``fit``: which dataset split (``--data.test_split``,
            ``--data.val_split``), ``--data.id_column``, ``--data.reference_columns``, ``--data.template``,
            ``--data.max_eval_prompts``, ``--data.samples_per_prompt`` and decoding
            (``--model.eval_generation.*``, or ``--greedy``); ``metrics.json`` records them.
        greedy: greedy decoding instead of the config's seeded sampling.
        toxicity: toxicity scorer with a ``toxicity(texts)`` method (null: ProfanityReward).
        positivity: optional positivity scorer, e.g. VaderReward.
    """

    ckpt_path: str
    out: str = "reports/compare"
    overwrite: bool = False
    split: Literal["test", "validation"] = "test"
    greedy: bool = False
    toxicity: Optional[Reward] = None
    positivity: Optional[Reward] = None


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf compare``: before/after report for a training YAML and a checkpoint; returns 0.

    Parsed by the same LightningCLI as ``fit`` (so ``--config`` files compose, ``--data.*``/``--model.*``
    override and ``--print_config`` round-trips), plus :class:`CompareOptions`.
    """
    from flan_rlhf.lightning_cli import run_lightning_cli

    started = time.perf_counter()
    cli = run_lightning_cli(list(argv or []), run=False, extra_options=CompareOptions, prog="flan-rlhf compare",
                            description=__doc__.split("\n\n")[0])
    options = {name: cli.config_init.get(name) for name in CompareOptions.__dataclass_fields__}
    out = Path(options["out"])
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not options["overwrite"]):
        raise OutputDirError(f"--out {out} already exists and is not an empty folder - choose another --out, "
                             "or pass --overwrite true to replace its report files")
    ckpt_path = cli.resolve_ckpt_path_option(options["ckpt_path"])
    module, datamodule = cli.model, cli.datamodule
    load_trained_weights(module, ckpt_path)
    module.to(cli.trainer.strategy.root_device)
    role = options["split"]
    datamodule.follow_model(module)  # long prompts lose the end of their inserted text, not the template
    datamodule.setup("test" if role == "test" else "validate")  # prints the split's data line
    loader = datamodule.test_dataloader() if role == "test" else datamodule.val_dataloader()
    generation = module.eval_generation
    if options["greedy"]:
        generation = replace(generation, do_sample=False)
    toxicity = options["toxicity"]
    if toxicity is None:
        from flan_rlhf.rewards import ProfanityReward

        toxicity = ProfanityReward()
    set_up_reward(toxicity, module.device)
    if options["positivity"] is not None:
        set_up_reward(options["positivity"], module.device)
    batches = list(loader)
    metrics = compare_before_after(module, batches, str(out), toxicity, options["positivity"], generation,
                                   meta={"checkpoint": ckpt_path, "split": role,
                                         "data": datamodule.reports[role].as_dict()})
    from flan_rlhf.eval.report import format_table

    print(format_table(metrics))
    print(f"compare: {metrics['n_prompts']} prompts x {metrics['samples_per_prompt']} samples on the {options['split']} "
          f"split, reference vs {ckpt_path}, in {seconds(time.perf_counter() - started)}\n"
          f"  report: {out / 'report.md'}\n  metrics: {out / 'metrics.json'}\n"
          f"  rows: {out / 'samples_before.jsonl'} and {out / 'samples_after.jsonl'}", flush=True)
    return 0


def load_trained_weights(module, ckpt_path: str) -> None:
    """Load a PPOModule Lightning checkpoint into an already-built module (weights + PPO state)."""
    from flan_rlhf.checkpointing import read_checkpoint_file

    # weights_only load (no pickled code runs); a cut-short or foreign file is one clear error
    checkpoint = read_checkpoint_file(ckpt_path)
    module.configure_model()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
