#!/usr/bin/env python
"""The human-feedback loop on the demo, with a scripted labeller standing in for a person.

One round of what docs/labelling.md describes, through the real commands and the page's own API:

1. ``flan-rlhf label`` samples two responses per training prompt from the demo's SFT model into a
   label store and serves the page;
2. a scripted labeller judges every pair through the requests the page makes (``GET /api/next``,
   ``POST /api/label``): the response without an insult (the demo report's insult matcher) is
   better; both clean is a tie, both insulting is "both unacceptable";
3. ``flan-rlhf fit --config configs/demo_dpo_labels.yaml`` trains DPO from the store;
4. ``flan-rlhf label`` samples again on held-out test prompts, one response from the SFT model
   (``a``) and one from the new policy (``b``): the next round's pairs (those whose two responses
   differ). The same scripted judge labels them, and the insult share of each side is counted;
5. ``flan-rlhf generate`` gives one response per test prompt from each policy (seed 0), for the
   insult share and ROUGE-L against the references over the whole test set.

Prints a table on stderr and ONE JSON line on stdout: ``{"round1": label counts, "dpo": steps and
seconds, "round2": {"pairs", "insult_fraction_sft", "insult_fraction_new", "new_wins", "sft_wins",
"ties", "both_unacceptable"}, "test_set": {"sft"|"new": {"prompts", "insult_fraction", "rougeL"}},
"config": ...}``. Needs the demo's artefacts (``make demo``).

    python benchmarks/label_loop.py --prompts 200 --test-prompts 200
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from functools import partial
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = "scriptedlabeller"


def flan_rlhf(*args: str) -> list[str]:
    """The ``flan-rlhf`` command line of this Python."""
    return [sys.executable, "-m", "flan_rlhf.cli", *args]


def api(url: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def judge(matcher, left: str, right: str) -> str:
    """The scripted labeller: the response without an insult is better; else a tie or both unacceptable."""
    left_bad, right_bad = matcher(left), matcher(right)
    if left_bad == right_bad:
        return "both_unacceptable" if left_bad else "tie"
    return "right" if left_bad else "left"


def label_on_the_page(store: str, sample_args: list[str], log: str, choose: Callable[[str, str], str]) -> dict[str, int]:
    """Serve the page over ``store`` (``flan-rlhf label`` samples ``sample_args`` first) and judge every pair
    through the requests the page makes, ``choose(left, right)`` giving each choice; the count of each choice."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(log, "ab") as out:
        server = subprocess.Popen(flan_rlhf("label", "--store", store, "--port", str(port), "--labeller", "script",
                                            *sample_args), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    counts = {"left": 0, "right": 0, "tie": 0, "both_unacceptable": 0}
    try:
        while True:  # until the page answers (sampling comes first)
            if server.poll() is not None:
                raise SystemExit(f"flan-rlhf label exited with {server.returncode}: see {log}")
            try:
                urllib.request.urlopen(url + "/", timeout=5).read()  # the page
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        while (pair := api(f"{url}/api/next?client={CLIENT}")["pair"]) is not None:
            choice = choose(pair["left"], pair["right"])
            api(url + "/api/label", {"pair_id": pair["pair_id"], "client": CLIENT, "choice": choice, "labeller": "script"})
            counts[choice] += 1
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl+C, as a person stops it
        server.wait(timeout=60)
    return counts


def train_from_store(store: str, model: str, adapter: str, steps: int, logs: str, log: str) -> None:
    """``flan-rlhf fit --config configs/demo_dpo_labels.yaml``: DPO of ``model`` from ``store``, the adapter
    written to ``adapter``, TensorBoard logs and checkpoints under ``logs``."""
    with open(log, "ab") as handle:
        subprocess.run(flan_rlhf("fit", "--config", "configs/demo_dpo_labels.yaml", "--data.store", store,
                                 "--model.init_args.policy.name_or_path", model, "--model.init_args.export_dir", adapter,
                                 "--trainer.max_steps", str(steps), "--trainer.logger.init_args.save_dir", logs),
                       cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)


def test_set_scores(test_file: str, model: str, adapter: str | None, output: str, max_new_tokens: int, log: str,
                    matcher) -> dict:
    """One sampled response per test prompt (``flan-rlhf generate``, seed 0): the insult share and the mean
    ROUGE-L against the ``summary`` column."""
    from flan_rlhf.eval.metrics import rouge_per_sample

    command = flan_rlhf("generate", "--model", model, "--input", test_file, "--prompt_column", "dialogue",
                        "--output", output, "--max_new_tokens", str(max_new_tokens), "--seed", "0",
                        *(["--adapter", adapter] if adapter else []))
    with open(log, "ab") as handle:
        subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)
    responses = [json.loads(line)["response"] for line in open(output, encoding="utf-8")]
    summaries = [json.loads(line)["summary"] for line in open(test_file, encoding="utf-8")]
    rouge = rouge_per_sample(responses, [[summary] for summary in summaries], rouge_keys=("rougeL",))["rougeL"]
    return {"prompts": len(responses), "insult_fraction": round(sum(map(matcher, responses)) / len(responses), 4),
            "rougeL": round(float(rouge.mean()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="artifacts/demo", help="the demo's artefacts (make demo)")
    parser.add_argument("--prompts", type=int, default=200, help="training prompts to sample and label")
    parser.add_argument("--test-prompts", type=int, default=200, help="test prompts of the second round")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=40, help="DPO steps (batches of 8 labelled pairs)")
    parser.add_argument("--out", default=None, help="where the stores, logs and adapter go (default: a temporary folder)")
    args = parser.parse_args()

    from flan_rlhf.demo.corpus import INSULT_VOCABULARY
    from flan_rlhf.eval.metrics import InsultMatcher
    from flan_rlhf.label_store import LabelStore, without_preference

    matcher = InsultMatcher(INSULT_VOCABULARY)
    choose = partial(judge, matcher)
    demo = os.path.abspath(args.demo_dir)
    sft = os.path.join(demo, "sft_model")
    if not os.path.isdir(sft):
        raise SystemExit(f"no demo SFT model at {sft} - run `make demo` first")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="label_loop_"))
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "commands.log")
    sampling = ["--prompt_column", "dialogue", "--model", sft, "--max_new_tokens", str(args.max_new_tokens)]

    store1 = f"sqlite:///{out}/labels.db"
    started = time.perf_counter()
    round1 = label_on_the_page(store1, ["--data", os.path.join(demo, "corpus", "train.jsonl"),
                                        "--max_prompts", str(args.prompts), *sampling], log, choose)
    label_s = time.perf_counter() - started

    adapter = os.path.join(out, "dpo_labels_adapter")
    started = time.perf_counter()
    train_from_store(store1, sft, adapter, args.steps, os.path.join(out, "lightning_logs"), log)
    dpo_s = time.perf_counter() - started

    store2 = f"sqlite:///{out}/round2.db"
    round2_counts = label_on_the_page(store2, ["--data", os.path.join(demo, "corpus", "test.jsonl"),
                                               "--max_prompts", str(args.test_prompts), "--adapter_b", adapter,
                                               *sampling], log, choose)
    test_file = os.path.join(demo, "corpus", "test.jsonl")
    whole_test = {name: test_set_scores(test_file, sft, adapter_path, os.path.join(out, f"{name}.jsonl"),
                                        args.max_new_tokens, log, matcher)
                  for name, adapter_path in (("sft", None), ("new", adapter))}
    judgements = LabelStore(store2).judgements()
    sft_insults = sum(matcher(j["response_a"]) for j in judgements)
    new_insults = sum(matcher(j["response_b"]) for j in judgements)
    winners = [j["chosen"] for j in judgements if j["chosen"] is not None]
    new_wins = sum(j["chosen"] == j["response_b"] for j in judgements if j["chosen"] is not None)
    row = {
        "round1": {**round1, "pairs": sum(round1.values()), "preference_pairs": round1["left"] + round1["right"],
                   "sample_and_label_s": round(label_s, 1)},
        "dpo": {"steps": args.steps, "seconds": round(dpo_s, 1)},
        "round2": {"pairs": len(judgements), "insult_fraction_sft": round(sft_insults / len(judgements), 4),
                   "insult_fraction_new": round(new_insults / len(judgements), 4),
                   "new_wins": new_wins, "sft_wins": len(winners) - new_wins,
                   "ties": round2_counts["tie"], "both_unacceptable": round2_counts["both_unacceptable"]},
        "test_set": whole_test,
        "config": {"prompts": args.prompts, "test_prompts": args.test_prompts, "max_new_tokens": args.max_new_tokens,
                   "demo_dir": args.demo_dir, "out": out},
    }
    print(f"round 1: {row['round1']['pairs']} pairs labelled, {row['round1']['preference_pairs']} with a preference "
          f"({without_preference(round1)}) in {label_s:.0f} s\n"
          f"DPO from the store: {args.steps} steps in {dpo_s:.0f} s\n"
          f"round 2 ({len(judgements)} test prompts): insult share SFT {row['round2']['insult_fraction_sft']:.3f} -> "
          f"new policy {row['round2']['insult_fraction_new']:.3f}; the new policy wins {new_wins} of "
          f"{len(winners)} decided pairs\n"
          f"the whole test set ({whole_test['sft']['prompts']} prompts, one sample each, seed 0): insult share "
          f"{whole_test['sft']['insult_fraction']:.3f} -> {whole_test['new']['insult_fraction']:.3f}, ROUGE-L "
          f"{whole_test['sft']['rougeL']:.4f} -> {whole_test['new']['rougeL']:.4f}", file=sys.stderr)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
