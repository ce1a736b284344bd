#!/usr/bin/env python
"""Count what the commands print beyond their own lines, on the tiny config.

Runs, each in its own process (warnings print once per process), from a scratch folder with a
copy of ``configs/``: ``fit`` (2 steps), ``fit --ckpt_path last`` (a resume to 3 steps),
``validate``, ``compare``, ``export --ckpt_path last``, and ``generate`` on that export with a
prompt longer than the tokenizer's limit. Every line a command prints (stdout and stderr) is
either the project's (progress, summaries, notes, the before/after table), one of Lightning's
run facts (seed, devices, ``limit_val_batches``, ``fit stopped``, restoring), or *foreign*:
a third-party warning or notice. Prints one JSON line per command, ``{"command", "lines",
"foreign", "foreign_lines"}``, then ``{"total_foreign": N}``.

    python benchmarks/count_warnings.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The lines that are the project's own or Lightning's statements of fact about the run.
EXPECTED = re.compile("|".join([
    r"^\[(fit|validate|test|predict|compare|score|generate|demo)\] ",  # progress
    r"^(fit|validate|test|predict|compare|score|generate|export|demo): ",  # closing summaries
    r"^  (?!warnings\.warn\()\S",  # the summaries' output lines (not the second line of a Python warning)
    r"^model: [\d.]+ [KMB]? ?parameters",  # model_summary.ParameterSummary
    r"^data\[\w+ <- '",  # PromptDataModule's line per split (SplitReport.summary)
    r"^resumed from step \d+ \(",  # PPOModule on a resume
    r"^(note|warning|error): ",  # the project's own messages
    r"^metric +before +after", r"^-{5,}", r" [↓↑] +-?[\d.]+ ", r"^(response_len_mean|response_tokens_mean) ",  # report table
    r"^Seed set to \d+$", r"^(GPU|TPU) available: ", r"^`Trainer\(limit_\w+=\d+\)` was configured",
    r"^`Trainer\.fit` stopped: ", r"^Restoring states from the checkpoint path", r"^Restored all states from the checkpoint",
    r"^Loaded model weights from the checkpoint", r"^[┏┃┡│└]",  # Lightning's run facts and its metrics table
    r"^\s*$",
]))


ONCE = re.compile(r"^(resumed from step|note: |warning: |data\[)")  # the project's notices: a repeat is noise too


def foreign_lines(output: str) -> list[str]:
    """The lines of ``output`` that :data:`EXPECTED` does not know (tqdm redraws split on ``\\r``), and
    every repeat of a project notice (:data:`ONCE`), marked ``(repeated)``."""
    lines = [part for line in output.splitlines() for part in line.split("\r")]
    foreign, seen = [], set()
    for line in lines:
        if not EXPECTED.search(line):
            foreign.append(line)
        elif ONCE.search(line):
            if line in seen:
                foreign.append(f"(repeated) {line}")
            seen.add(line)
    return foreign


def commands(workdir: str) -> list[tuple[str, list[str]]]:
    """``(label, flan-rlhf arguments)`` of each run, in order (later ones read what earlier ones wrote)."""
    config = os.path.join("configs", "tiny.yaml")
    return [
        ("fit", ["fit", "--config", config, "--trainer.max_steps", "2"]),
        ("fit --ckpt_path last", ["fit", "--config", config, "--trainer.max_steps", "3", "--ckpt_path", "last"]),
        ("validate", ["validate", "--config", config, "--ckpt_path", "last"]),
        ("compare", ["compare", "--config", config, "--ckpt_path", "last", "--out", "report"]),
        ("export", ["export", "--ckpt_path", "last", "--run_config", config, "--out", "merged"]),
        ("generate", ["generate", "--model", "merged", "--input", "prompts.txt", "--output", "responses.jsonl",
                      "--max_prompt_tokens", "64"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="run in this (new) folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.keep and os.path.exists(args.keep):
        parser.error(f"--keep {args.keep} exists: name a new folder")
    workdir = args.keep or tempfile.mkdtemp(prefix="count_warnings-")
    os.makedirs(workdir, exist_ok=True)
    shutil.copytree(os.path.join(ROOT, "configs"), os.path.join(workdir, "configs"))
    with open(os.path.join(workdir, "prompts.txt"), "w", encoding="utf-8") as handle:
        handle.write("a prompt far longer than the tokenizer allows " * 40 + "\nshort prompt\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CI", None)  # the lines a user's shell would show (no CI variable); output is a pipe either way
    total, failed = 0, False
    try:
        for label, arguments in commands(workdir):
            result = subprocess.run([sys.executable, "-m", "flan_rlhf.cli", *arguments], cwd=workdir, env=env,
                                    capture_output=True, text=True, timeout=900)
            if result.returncode != 0:
                print(json.dumps({"command": label, "error": result.stderr.strip().splitlines()[-1:]}), flush=True)
                failed = True
                continue
            output = result.stdout + result.stderr
            foreign = foreign_lines(output)
            total += len(foreign)
            print(json.dumps({"command": label, "lines": len(output.splitlines()), "foreign": len(foreign),
                              "foreign_lines": foreign}, ensure_ascii=False), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"total_foreign": total}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
