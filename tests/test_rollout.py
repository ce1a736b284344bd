"""The Rollout record: built complete by PPOModule.rollout, and the one row builder over it."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flan_rlhf.rewards.base import Reward
from flan_rlhf.rollout import Rollout, response_rows
from tests.conftest import ScriptedReward
from tests.test_module import MetricsRecorder, fit, make_module


def _hand_rollout(prompts: list[str], texts: list[str]) -> Rollout:
    n = len(prompts)
    zeros = torch.zeros(n, 3)
    return Rollout(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                   torch.zeros(n, 3, dtype=torch.long), torch.ones(n, 3), zeros, zeros, zeros, zeros,
                   prompts, texts, n_truncated=0, scores=None)


def test_response_rows_carry_ids_text_references_and_columns_in_order():
    rollout = _hand_rollout(["p0", "p1"], ["r0", "r1"])
    batch = {"prompt": ["p0", "p1"], "prompt_id": torch.tensor([7, 9]), "sample": torch.tensor([0, 2]),
             "references": [["a", "b"], []]}
    columns = {"reward": torch.tensor([0.5, -1.0]), "tokens": torch.tensor([3, 1]), "kl": [0.25, 0.0]}
    rows = response_rows(rollout, batch, columns)
    assert rows == [
        {"prompt_id": 7, "sample": 0, "prompt": "p0", "response": "r0", "references": ["a", "b"],
         "reward": 0.5, "tokens": 3, "kl": 0.25},
        {"prompt_id": 9, "sample": 2, "prompt": "p1", "response": "r1", "references": [],
         "reward": -1.0, "tokens": 1, "kl": 0.0},
    ]
    assert [list(row) for row in rows][0] == ["prompt_id", "sample", "prompt", "response", "references",
                                               "reward", "tokens", "kl"]
    assert isinstance(rows[0]["tokens"], int) and isinstance(rows[0]["reward"], float)


def test_response_rows_without_ids_or_references():
    rows = response_rows(_hand_rollout(["p"], ["r"]), {"prompt": ["p"]}, {"kl": torch.tensor([1.5])})
    assert rows == [{"prompt": "p", "response": "r", "references": [], "kl": 1.5}]


class PromptAndTextLength(Reward):
    """Score ``10 * len(prompt) + len(response)``: a different number for every row."""

    name = "lengths"

    def components(self, prompts, responses):
        return {self.name: torch.tensor([10.0 * len(p) + len(r) for p, r in zip(prompts, responses)])}


def test_rollout_is_built_scored_and_cannot_be_changed_afterwards():
    # ByT5: one token per byte plus EOS, so "abcdefgh" is 9 tokens and "ab" is 3
    module = make_module(PromptAndTextLength(), truncate_prompt_tokens=5)
    module.configure_model()
    prompts = ["abcdefgh", "ab", "abcdef"]
    with torch.no_grad():
        rollout = module.rollout(prompts, module.generation)
    assert rollout.n_truncated == 2
    assert rollout.input_ids.shape == (3, 5)
    expected = torch.tensor([10.0 * len(p) + len(t) for p, t in zip(prompts, rollout.texts)])
    torch.testing.assert_close(rollout.scores, expected)  # row by row: each row's own prompt and text
    torch.testing.assert_close(rollout.components["lengths"], expected)
    assert rollout.prompts == prompts and len(rollout.texts) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        rollout.scores = torch.zeros(3)


def test_unscored_rollout_does_not_call_the_reward():
    reward = ScriptedReward([0.1, 0.2])
    module = make_module(reward)
    module.configure_model()
    with torch.no_grad():
        rollout = module.rollout(["ab", "cd"], module.generation, scored=False)
    assert rollout.scores is None and rollout.components == {}
    assert reward.calls == 0


def test_truncated_prompt_count_of_the_rollout_is_the_logged_one():
    recorder = MetricsRecorder()
    module = make_module(ScriptedReward([], fallback=0.5), truncate_prompt_tokens=5)
    prompts = ["abcdefgh", "ab", "abcdef", "abc"]  # 9, 3, 7, 4 tokens: two over 5
    fit(module, steps=1, batch_size=4, callbacks=[recorder], prompts=prompts)
    assert [row["data/truncated_prompts"] for row in recorder.rows] == [2.0]
