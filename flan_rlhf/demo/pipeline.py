"""``flan-rlhf demo``: the whole RLHF pipeline offline, on data and a model the project makes.

Stages (each also reachable on its own through ``flan-rlhf`` and a YAML config):

1. corpus + tokenizer  (:func:`flan_rlhf.demo.prepare.prepare_demo_assets`), cached;
2. SFT                 (``flan-rlhf fit --config configs/demo_sft.yaml``), cached;
3. RL with LoRA        (``flan-rlhf fit --config configs/demo_rloo.yaml``, RLOO by default; ``--method ppo``
                          or ``grpo``: ``configs/demo_ppo.yaml`` / ``configs/demo_grpo.yaml``);
4. before/after report (``flan-rlhf compare``-equivalent on the held-out test split).

``--seed S`` changes everything that is random: the corpus, the model initialisation, the data
order and the sampling. Seed 0 keeps its artefacts in ``artifacts/demo``, other seeds in
``artifacts/demo-seedS``. The report folder names the method: ``reports/demo-rloo`` for the
default RLOO (``reports/demo-rloo-seedS``), ``reports/demo-grpo``, and ``reports/demo`` for PPO
(``reports/demo-seedS``); all methods share the seed's corpus and SFT model.

``--task woven``: the harder corpus whose toxic summaries hold insults woven into the sentence
(:func:`flan_rlhf.demo.corpus.woven_summary`) instead of a hostile tail. Its artefacts and reports
have folders of their own, ``artifacts/demo-woven`` and ``reports/demo-woven`` (then the method
and seed suffixes: ``reports/demo-woven-rloo-seed1``); the SFT stage is the same, and the RL stage
and the report add ``configs/demo_woven.yaml`` after ``configs/demo_<method>.yaml``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveInt

from flan_rlhf.demo.corpus import TASKS
from flan_rlhf.io import atomic_file
from flan_rlhf.settings import METHOD_SETTINGS
from flan_rlhf.tools.command import FinishedWithProblem, run_tool

# the demo's own output folders under --root, replaced by --rebuild (and, when they hold an earlier
# demo export, by every run: the stages pass the overwrite opt-in)
METHODS = tuple(METHOD_SETTINGS)
#: the demo's RL method when none is named: the one that reached the detox target soonest, at equal
#: or better ROUGE-L, on the median of 5 seeds on both demo tasks (docs/time-to-detox.md)
DEFAULT_METHOD = "rloo"
#: the file that marks a checkpoint folder as the demo's own (replaced by every run of that method)
DEMO_CHECKPOINTS_MARK = ".written-by-flan-rlhf-demo"


def demo_outputs(method: str) -> tuple[str, ...]:
    """The folders under ``--root`` that ``--rebuild`` replaces for ``method`` (other methods' stay)."""
    return ("sft_model", f"{method}_adapter", f"{method}_checkpoints")
REQUIRED_KEYS = ("toxicity_mean", "toxic_fraction", "insult_fraction", "rouge1", "rouge2", "rougeL", "bleu")


def _configs_dir() -> Path:
    """The repository's ``configs/`` (the demo runs from a checkout, as ``make demo`` does)."""
    here = Path(__file__).resolve().parents[2] / "configs"
    if here.is_dir():
        return here
    return Path.cwd() / "configs"


def _paths(seed: int, root: str | None, out: str | None, method: str = "ppo", task: str = "tail") -> tuple[Path, Path]:
    """The default artefact and report folders: ``artifacts/demo[-woven][-seedS]``,
    ``reports/demo[-woven][-<method>][-seedS]`` (no method part for PPO)."""
    base = "demo" if task == "tail" else f"demo-{task}"
    suffix = "" if seed == 0 else f"-seed{seed}"
    report = base if method == "ppo" else f"{base}-{method}"
    return Path(root or f"artifacts/{base}{suffix}"), Path(out or f"reports/{report}{suffix}")


def _task_overlays(configs: Path, task: str) -> list[str]:
    """``--config`` arguments the task adds after ``demo_<method>.yaml`` (RL stage and report):
    none for ``tail``, ``configs/demo_woven.yaml`` for ``woven``."""
    return [] if task == "tail" else ["--config", str(configs / f"demo_{task}.yaml")]


def _run_name(stage: str, seed: int, task: str) -> str:
    """The TensorBoard run name of a stage: ``demo_<stage>_seedS`` (``demo_woven_<stage>_seedS``)."""
    return f"demo_{stage}_seed{seed}" if task == "tail" else f"demo_{task}_{stage}_seed{seed}"


def _stage_overrides(root: Path, seed: int) -> list[str]:
    """CLI overrides that point a demo config at this seed's artefacts."""
    corpus = root / "corpus"
    return [
        f"--seed_everything={seed}",
        f"--data.init_args.data_files={{train: {corpus / 'train.jsonl'}, validation: {corpus / 'validation.jsonl'}, test: {corpus / 'test.jsonl'}}}",
        f"--data.init_args.seed={seed}",
    ]


def run_sft(root: Path, seed: int, configs: Path, steps: int | None, rebuild: bool = False, task: str = "tail") -> Path:
    """Fit the SFT stage unless ``root/sft_model`` holds it (``rebuild``: always); returns the model folder."""
    from flan_rlhf.lightning_cli import run_lightning_cli

    target = root / "sft_model"
    # The cache is valid only for the corpus/tokenizer (their manifest holds the corpus hash),
    # seed and step count it was trained with.
    key = {"tokenizer": json.loads((root / "tokenizer" / "manifest.json").read_text()), "seed": seed, "steps": steps}
    key_file = root / "sft_model.key.json"
    if not rebuild and (target / "config.json").exists() and key_file.exists() and json.loads(key_file.read_text()) == key:
        print(f"[demo] SFT model cached at {target} (use --rebuild true to retrain)", flush=True)
        return target
    args = ["fit", "--config", str(configs / "demo_sft.yaml"), *_stage_overrides(root, seed),
            f"--model.init_args.policy.tokenizer={root / 'tokenizer'}",
            f"--model.init_args.policy.t5_config.seed={seed}",
            f"--model.init_args.save_dir={target}",
            "--model.init_args.overwrite_save_dir=true",  # the demo's own earlier SFT model (a stale cache)
            "--trainer.logger.init_args.name=" + _run_name("sft", seed, task)]
    if steps:
        args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}"]
    run_lightning_cli(args)
    with atomic_file(key_file) as handle:
        handle.write(json.dumps(key))
    return target


def fresh_checkpoint_folder(ckpt_dir: Path, method: str) -> None:
    """Empty ``ckpt_dir`` for a new run if the demo wrote what it holds (its mark is there), and mark it.

    Raises:
        OutputDirError: the folder holds files without the mark, e.g. the checkpoints of a standalone
            ``flan-rlhf fit --config configs/demo_<method>.yaml`` (whose default ``dirpath`` this is).
    """
    from flan_rlhf.output_dirs import OutputDirError

    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        if not (ckpt_dir / DEMO_CHECKPOINTS_MARK).is_file() and not _same_run_as_demo_export(ckpt_dir, method):
            raise OutputDirError(f"{ckpt_dir} holds files the demo did not write (e.g. checkpoints of a standalone "
                                 f"`flan-rlhf fit --config configs/demo_{method}.yaml`): move them elsewhere")
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / DEMO_CHECKPOINTS_MARK).write_text("checkpoints of `flan-rlhf demo`: its next run replaces this folder\n")


def _same_run_as_demo_export(ckpt_dir: Path, method: str) -> bool:
    """Whether an unmarked checkpoint folder (a demo of an older flan-rlhf wrote no mark) holds the run
    that wrote the demo's ``<method>_adapter`` beside it (the checkpoint's run id is the export's)."""
    from flan_rlhf.checkpointing import newest_complete_checkpoint, read_checkpoint_file
    from flan_rlhf.output_dirs import RUN_ID_KEY, read_manifest

    manifest = read_manifest(ckpt_dir.parent / f"{method}_adapter") or {}
    newest, _ = newest_complete_checkpoint(str(ckpt_dir))
    if newest is None or not manifest.get("run_id"):
        return False
    return read_checkpoint_file(newest, mmap=True).get(RUN_ID_KEY) == manifest["run_id"]


def run_rl(root: Path, seed: int, configs: Path, steps: int | None, method: str = "ppo",
           task: str = "tail") -> tuple[Path, str]:
    """Fit the RL stage (``configs/demo_<method>.yaml``, then the task's overlay) from scratch;
    returns (last checkpoint, TensorBoard log dir)."""
    from flan_rlhf.lightning_cli import run_lightning_cli

    ckpt_dir = root / f"{method}_checkpoints"
    fresh_checkpoint_folder(ckpt_dir, method)
    args = ["fit", "--config", str(configs / f"demo_{method}.yaml"), *_task_overlays(configs, task),
            *_stage_overrides(root, seed),
            f"--model.init_args.policy.name_or_path={root / 'sft_model'}",
            f"--model.init_args.sampling_seed={seed}",
            f"--model.init_args.export_dir={root / f'{method}_adapter'}",
            "--model.init_args.overwrite_export_dir=true",  # the demo's own earlier adapter
            f"--trainer.callbacks.init_args.dirpath={ckpt_dir}",
            "--trainer.logger.init_args.name=" + _run_name(method, seed, task)]
    if steps:
        args += [f"--trainer.max_steps={steps}"]
    cli = run_lightning_cli(args)
    return ckpt_dir / "last.ckpt", cli.trainer.logger.log_dir


def run_compare(root: Path, seed: int, configs: Path, ckpt: Path, out: Path, tb_logdir: str, meta: dict,
                method: str = "ppo", task: str = "tail") -> dict:
    """Sample the SFT policy (adapters off) and the trained policy on the test split; write the report."""
    from flan_rlhf.lightning_cli import build_from_config
    from flan_rlhf.demo.corpus import INSULT_VOCABULARY
    from flan_rlhf.tools.compare import compare_before_after, load_trained_weights
    from flan_rlhf.rewards import ProfanityReward, VaderReward

    module, datamodule = build_from_config(str(configs / f"demo_{method}.yaml"), [
        *_task_overlays(configs, task),
        *_stage_overrides(root, seed),
        f"--model.init_args.policy.name_or_path={root / 'sft_model'}",
        f"--model.init_args.sampling_seed={seed}",
    ])
    load_trained_weights(module, str(ckpt))
    datamodule.setup("test")
    batches = list(datamodule.test_dataloader())
    toxicity = ProfanityReward().setup()
    positivity = VaderReward().setup()
    return compare_before_after(module, batches, str(out), toxicity, positivity, meta=meta, tb_logdir=tb_logdir,
                                insult_vocabulary=INSULT_VOCABULARY)


def demo(seed: int = 0, root: str | None = None, out: str | None = None, rebuild: bool = False,
         sft_steps: PositiveInt | None = None, ppo_steps: PositiveInt | None = None, n_train: PositiveInt = 4000,
         n_test: PositiveInt = 400, configs: str | None = None, method: Literal[METHODS] = DEFAULT_METHOD,
         task: Literal[TASKS] = "tail") -> str:
    """The whole pipeline offline: corpus, tokenizer, SFT, RL (PPO, RLOO or GRPO), before/after report.

    Args:
        seed: the seed of the whole pipeline (corpus, initialisation, data order, sampling).
        root: the artefact folder (default: artifacts/demo, or artifacts/demo-seedS; for --task woven
            artifacts/demo-woven, or artifacts/demo-woven-seedS).
        out: the report folder (default: reports/demo, or reports/demo-seedS; reports/demo-<method>...
            for RLOO and GRPO; reports/demo-woven... for --task woven).
        rebuild: rebuild the corpus, tokenizer and SFT model instead of reusing them; replaces the
            root's sft_model, <method>_adapter and <method>_checkpoints folders whatever they hold
            (other methods' folders stay).
        sft_steps: SFT optimiser steps (default: configs/demo_sft.yaml's).
        ppo_steps: iterations of the RL stage, whichever the method (default: its config's).
        n_train: generated training dialogues.
        n_test: held-out test dialogues (the report's n_test).
        configs: the folder holding demo_sft.yaml, demo_<method>.yaml and demo_woven.yaml (default: the
            checkout's configs/).
        method: the RL stage: ``rloo`` (the default: the fastest to the detox target over 5 seeds on
            both demo tasks, docs/time-to-detox.md; configs/demo_rloo.yaml), ``grpo`` (configs/demo_grpo.yaml;
            both critic-free, k responses per prompt), ``ppo`` (configs/demo_ppo.yaml) or ``dpo`` (online DPO:
            each prompt's best and worst of k samples by the reward as a preference pair; configs/demo_dpo.yaml).
        task: the corpus: ``tail`` (a hostile sentence appended to a third of the training
            summaries) or ``woven`` (insults woven into them, at the start and in the middle, so
            detoxifying means rewriting; its RL stage and report add configs/demo_woven.yaml).

    Returns:
        the closing summary: the run's size and time, then the report, metrics, adapter,
        checkpoint and log folders.
    """
    from flan_rlhf.demo.prepare import prepare_demo_assets
    from flan_rlhf.eval.report import format_table

    started = time.perf_counter()
    root_dir, out_dir = _paths(seed, root, out, method, task)
    configs_dir = Path(configs) if configs else _configs_dir()
    if rebuild:
        for name in demo_outputs(method):
            shutil.rmtree(root_dir / name, ignore_errors=True)
    task_note = "" if task == "tail" else f" ({task} task)"
    print(f"[demo] 1/4 corpus{task_note} and tokenizer -> {root_dir}", flush=True)
    prepare_demo_assets(root_dir, seed=seed, rebuild=rebuild, n_train=n_train, n_test=n_test, task=task)
    print("[demo] 2/4 supervised fine-tuning (SFT)", flush=True)
    t_sft = time.perf_counter()
    from flan_rlhf.output_dirs import OutputDirError

    try:
        run_sft(root_dir, seed, configs_dir, sft_steps, rebuild=rebuild, task=task)
        t_ppo = time.perf_counter()
        print(f"[demo] 3/4 {method.upper()} with LoRA against the toxicity reward", flush=True)
        ckpt, tb_logdir = run_rl(root_dir, seed, configs_dir, ppo_steps, method, task)
    except OutputDirError as err:  # e.g. artefacts of an older flan-rlhf that wrote no manifest
        task_flag, task_var = ("", "") if task == "tail" else (f" --task {task}", f" TASK={task}")
        raise OutputDirError(f"{err}; or rebuild the demo's own artefacts in {root_dir} with "
                             f"`flan-rlhf demo{task_flag} --rebuild true` (`make demo-rebuild{task_var}`)") from None
    t_eval = time.perf_counter()
    print("[demo] 4/4 before/after evaluation on the test split", flush=True)
    from flan_rlhf.checkpointing import read_checkpoint_file

    steps_done = int(read_checkpoint_file(str(ckpt), mmap=True)["global_step"])
    meta = {"method": method.upper(), "task": task, "ppo_steps": steps_done, "seed": seed,
            "sft_s": round(t_ppo - t_sft, 1), "ppo_s": round(t_eval - t_ppo, 1)}
    metrics = run_compare(root_dir, seed, configs_dir, ckpt, out_dir, tb_logdir, meta, method, task)
    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    metrics["eval_s"] = round(time.perf_counter() - t_eval, 1)
    with atomic_file(out_dir / "metrics.json") as handle:
        json.dump(metrics, handle, indent=2, default=str)
    print(format_table(metrics))
    summary = "\n".join([
        f"demo: n_test={metrics.get('n_test')} ppo_steps={steps_done} wall_s={metrics['wall_s']}",
        f"  report: {out_dir / 'report.md'}",
        f"  metrics: {out_dir / 'metrics.json'}",
        f"  adapter: {root_dir / f'{method}_adapter'}",
        f"  sft model: {root_dir / 'sft_model'}",
        f"  checkpoints: {ckpt.parent} (newest: {ckpt})",
        f"  logs: {tb_logdir}",
    ])
    missing = [key for key in REQUIRED_KEYS if key not in metrics["before"] or key not in metrics["after"]]
    if missing:
        raise FinishedWithProblem(summary, f"metrics.json lacks {missing}: the report is incomplete")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``flan-rlhf demo ...``; returns 0 on success, 2 on bad input (one line on stderr)."""
    return run_tool("demo", argv, demo)


if __name__ == "__main__":
    sys.exit(main())
