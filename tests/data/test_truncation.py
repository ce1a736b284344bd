"""Long prompts lose the end of their inserted text, never the template (data/datamodule.py, step 5).

ByT5 counts one token per UTF-8 byte plus ``</s>``, so every expected length below is a byte count.
"""
from __future__ import annotations

import json

import lightning as L
import pytest
from datasets import Dataset
from transformers import ByT5Tokenizer

from flan_rlhf.data import PromptDataModule, prepare_prompts, resolve_template
from flan_rlhf.module import PPOModule
from flan_rlhf.rewards import ProfanityReward
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.sft import SFTModule
from flan_rlhf.tokens import PromptTokenLimit
from tests.conftest import tiny_policy_spec

BYT5 = ByT5Tokenizer()


def byt5_tokens(text: str) -> int:
    return len(text.encode("utf-8")) + 1


def dialogues(lengths: list[int]) -> list[str]:
    """Dialogues of exactly these many characters (ASCII), each with a distinct start."""
    return [(f"#Person1#: row {i} says " + "la " * n)[:n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("template", ["summarize_dialogue", "continue_text", "Q: {text} A:", "raw"])
def test_the_model_cap_cuts_the_inserted_text_and_keeps_the_template(template):
    resolved = resolve_template(template)
    head, tail = resolved.split("{text}")
    cap = byt5_tokens(head + tail) + 40  # room for 40 characters of dialogue
    texts = dialogues([10, 40, 41, 300])
    table, report = prepare_prompts(
        Dataset.from_dict({"dialogue": texts, "summary": ["s"] * 4}), role="test", split="test",
        prompt_column="dialogue", reference_columns=["summary"], template=resolved,
        model_limit=PromptTokenLimit(BYT5, cap),
    )
    assert table.truncated == [False, False, True, True]
    assert report.truncated_to_model_limit == 2 and report.truncated == 0 and report.kept == 4
    for prompt, text, cut in zip(table.prompts, texts, table.truncated):
        assert prompt.startswith(head) and prompt.endswith(tail), prompt
        inserted = prompt[len(head):len(prompt) - len(tail)]
        assert text.startswith(inserted) and (inserted == text) == (not cut)
        assert byt5_tokens(prompt) <= cap
    assert [byt5_tokens(p) for p in table.prompts[2:]] == [cap, cap]  # cut to the cap exactly (ASCII)
    assert "2 truncated to model.truncate_prompt_tokens=" in report.summary()


def test_data_limit_then_model_cap_are_counted_apart():
    """max_prompt_tokens (the data's own tokenizer) cuts first; a tighter model cap cuts further."""
    template = resolve_template("summarize_dialogue")
    overhead = byt5_tokens(template.replace("{text}", ""))
    texts = dialogues([10, 60, 200])
    table, report = prepare_prompts(
        Dataset.from_dict({"dialogue": texts}), role="test", split="test", prompt_column="dialogue",
        reference_columns=[], template=template, tokenizer=BYT5, max_prompt_tokens=overhead + 100,
        model_limit=PromptTokenLimit(BYT5, overhead + 50),
    )
    assert report.truncated == 1 and report.truncated_to_model_limit == 2
    assert table.truncated == [False, True, True]
    assert [byt5_tokens(p) for p in table.prompts] == [overhead + 10, overhead + 50, overhead + 50]
    assert all(p.endswith("\n\nSummary:") for p in table.prompts)


def test_the_template_alone_over_the_model_cap_names_the_model_option():
    from flan_rlhf.data import DataConfigError

    with pytest.raises(DataConfigError, match=r"template alone is \d+ tokens.*--model.truncate_prompt_tokens=10"):
        prepare_prompts(Dataset.from_dict({"dialogue": ["a long enough dialogue"]}), role="test", split="test",
                        prompt_column="dialogue", reference_columns=[], template=resolve_template("summarize_dialogue"),
                        model_limit=PromptTokenLimit(BYT5, 10))


def _long_dialogue_file(tmp_path, lengths: list[int]) -> str:
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"dialogue": text, "summary": f"summary {i}"}) + "\n"
                            for i, text in enumerate(dialogues(lengths))))
    return str(path)


def test_predict_rows_show_the_prompt_the_model_saw_with_the_template_kept(tmp_path):
    """Through the Trainer: the data module takes the module's cap, so no prompt reaches the model
    longer than it and every one still ends with the template's ``Summary:``."""
    template = resolve_template("summarize_dialogue")
    cap = byt5_tokens(template.replace("{text}", "")) + 30
    lengths = [5, 30, 31, 500]
    data_file = _long_dialogue_file(tmp_path, lengths)
    datamodule = PromptDataModule(dataset="json", data_files={"test": data_file}, val_split=None,
                                  template="summarize_dialogue", eval_batch_size=4)
    module = PPOModule(policy=tiny_policy_spec(), reward=ProfanityReward(), generation=GenerationSettings(max_new_tokens=4),
                       truncate_prompt_tokens=cap, log_samples_every_n_steps=0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    rows = [row for batch in trainer.predict(module, datamodule=datamodule) for row in batch]
    assert [row["prompt_truncated"] for row in rows] == [False, False, True, True]
    assert all(row["prompt"].endswith("\n\nSummary:") for row in rows)
    assert max(byt5_tokens(row["prompt"]) for row in rows) == cap
    assert datamodule.reports["predict"].truncated_to_model_limit == 2


def test_sft_training_prompts_are_cut_on_the_dialogue_too(tmp_path):
    template = resolve_template("summarize_dialogue")
    cap = byt5_tokens(template.replace("{text}", "")) + 20
    datamodule = PromptDataModule(dataset="json", data_files={"train": _long_dialogue_file(tmp_path, [5, 80, 400])},
                                  val_split=None, test_split=None, template="summarize_dialogue", batch_size=3)
    module = SFTModule(policy=tiny_policy_spec(), truncate_prompt_tokens=cap)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    table = datamodule.tables["train"]
    assert table.truncated == [False, True, True]
    assert all(p.endswith("\n\nSummary:") and byt5_tokens(p) <= cap for p in table.prompts)
