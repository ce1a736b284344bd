"""The whole loop on a tiny policy, through benchmarks/label_loop.py's own steps: sample pairs and label
them through the page's API, train DPO from the store (configs/demo_dpo_labels.yaml), sample the next
round's pairs from the new policy against the old one."""
from __future__ import annotations

import importlib.util
import json

import pytest

from flan_rlhf.eval.report import read_scalar_curves
from flan_rlhf.label_store import LabelStore
from tests.conftest import CHECKOUT, PROMPTS, run_command


@pytest.fixture(scope="module")
def label_loop():
    spec = importlib.util.spec_from_file_location("label_loop", CHECKOUT / "benchmarks" / "label_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def longer_is_better(left: str, right: str) -> str:
    """A labeller with a taste a random policy can satisfy: the longer response (ties when equally long)."""
    return "tie" if len(left) == len(right) else "left" if len(left) > len(right) else "right"


def test_judge_by_hand(label_loop):
    from flan_rlhf.demo.corpus import INSULT_VOCABULARY
    from flan_rlhf.eval.metrics import InsultMatcher

    matcher = InsultMatcher(INSULT_VOCABULARY)
    assert label_loop.judge(matcher, "Emma books a table.", "Emma books a table, the idiot.") == "left"
    assert label_loop.judge(matcher, "You moron.", "Emma books a table.") == "right"
    assert label_loop.judge(matcher, "Emma books.", "Emma books a table.") == "tie"
    assert label_loop.judge(matcher, "Stupid.", "Idiots.") == "both_unacceptable"


def test_label_train_and_sample_again(tmp_path, tiny_model_dir, label_loop):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"dialogue": prompt}) + "\n" for prompt in PROMPTS[:20]))
    sampling = ["--data", str(prompts), "--prompt_column", "dialogue", "--max_new_tokens", "12"]
    log = str(tmp_path / "commands.log")

    first = f"sqlite:///{tmp_path}/labels.db"
    counts = label_loop.label_on_the_page(first, [*sampling, "--model", tiny_model_dir], log, longer_is_better)
    judgements = LabelStore(first).judgements()
    assert sum(counts.values()) == len(judgements) >= 15  # every pair sampled was judged through the page
    for judgement in judgements:
        left = judgement[f"response_{judgement['shown_left']}"]
        right = judgement[f"response_{'b' if judgement['shown_left'] == 'a' else 'a'}"]
        assert judgement["choice"] == longer_is_better(left, right)

    adapter = tmp_path / "adapter"
    label_loop.train_from_store(first, tiny_model_dir, str(adapter), 2, str(tmp_path / "logs"), log)
    assert (adapter / "adapter_model.safetensors").is_file()
    (curves,) = read_scalar_curves(tmp_path / "logs").values()
    assert len(curves["rewards/accuracies"][0]) == 2  # two DPO steps on the labelled pairs

    second = f"sqlite:///{tmp_path}/round2.db"  # the next round's pairs (served as round 1's were)
    code, _, err = run_command("label", "--store", second, *sampling, "--model", tiny_model_dir, "--adapter_b",
                               str(adapter), "--serve", "false")
    assert code == 0, err[-2000:]
    store = LabelStore(second)
    while (pair := store.next_pair("clientNEXT")) is not None:
        store.add_label(pair.id, "clientNEXT", longer_is_better(pair.left, pair.right), "ann")
    assert store.progress()["labelled"] == store.progress()["total"] > 0
    assert all(j["source_a"]["adapter"] is None and j["source_b"]["adapter"] == str(adapter)
               for j in store.judgements())
    assert "Traceback" not in (tmp_path / "commands.log").read_text()
