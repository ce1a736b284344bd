"""Prompts of preference pairs whose texts both hold them (Anthropic/hh-rlhf), for DPO."""
from __future__ import annotations

import json

import pytest

from flan_rlhf.reward_model.data import PreferenceDataModule, split_shared_prompt

HH_CHOSEN = "\n\nHuman: What is a dog?\n\nAssistant: An animal.\n\nHuman: And a cat?\n\nAssistant: Also an animal."
HH_REJECTED = "\n\nHuman: What is a dog?\n\nAssistant: An animal.\n\nHuman: And a cat?\n\nAssistant: Also a pest, idiot."


@pytest.mark.parametrize("chosen, rejected, expected", [
    # hh-rlhf: cut after the last "Assistant:" of the shared start, not inside the shared "Also a"
    (HH_CHOSEN, HH_REJECTED, (HH_CHOSEN[:-len(" Also an animal.")], " Also an animal.", " Also a pest, idiot.")),
    # no turn marker: the last whitespace of the shared start, so "Hi" is not split
    ("Say hi. Hi there", "Say hi. Hi you", ("Say hi. Hi", " there", " you")),
    ("Say hi. Hello", "Say hi. Help", ("Say hi.", " Hello", " Help")),
    # one text is the start of the other: both responses keep a word
    ("Say hi. Hi", "Say hi. Hi there", ("Say hi.", " Hi", " Hi there")),
    # nothing shared: an empty prompt
    ("Great!", "Awful.", ("", "Great!", "Awful.")),
])
def test_the_prompt_is_the_shared_start_cut_after_the_last_turn_or_word(chosen, rejected, expected):
    prompt, chosen_rest, rejected_rest = split_shared_prompt(chosen, rejected)
    assert (prompt, chosen_rest, rejected_rest) == expected
    assert prompt + chosen_rest == chosen and prompt + rejected_rest == rejected


def test_hh_style_file_gives_dpo_batches_with_split_prompts(tmp_path):
    path = tmp_path / "hh.jsonl"
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}] * 4
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = PreferenceDataModule(dataset=str(path), val_split=None, val_fraction=0.25, batch_size=2, split_prompt=True,
                                stream=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["prompt"] == [HH_CHOSEN[:-len(" Also an animal.")]] * 2
    assert batch["chosen"] == [" Also an animal."] * 2 and batch["rejected"] == [" Also a pest, idiot."] * 2

    from flan_rlhf.dpo_module import DPOModule
    from tests.conftest import tiny_policy_spec

    DPOModule(tiny_policy_spec()).check_datamodule(data)  # accepted: it has prompts now
