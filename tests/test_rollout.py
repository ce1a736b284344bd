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
                   prompts, texts, prompt_cut=[False] * len(prompts), scores=None)


def test_response_rows_carry_ids_text_references_and_columns_in_order():
    rollout = dataclasses.replace(_hand_rollout(["p0", "p1", "p2"], ["r0", "r1", "r2"]),
                                  prompt_cut=[True, False, False])
    batch = {"prompt": ["p0", "p1", "p2"], "prompt_id": torch.tensor([7, 9, 4]), "sample": torch.tensor([0, 2, 1]),
             "id": ["train_7", "train_9", 12], "truncated": torch.tensor([False, True, False]),
             "references": [["a", "b"], [], ["c"]]}
    columns = {"reward": torch.tensor([0.5, -1.0, 2.0]), "tokens": torch.tensor([3, 1, 2]), "kl": [0.25, 0.0, 1.0]}
    rows = response_rows(rollout, batch, columns)
    assert rows == [  # row 0 cut by the model's cap, row 1 by the data module, row 2 not cut
        {"prompt_id": 7, "sample": 0, "id": "train_7", "prompt": "p0", "prompt_truncated": True, "response": "r0",
         "references": ["a", "b"], "reward": 0.5, "tokens": 3, "kl": 0.25},
        {"prompt_id": 9, "sample": 2, "id": "train_9", "prompt": "p1", "prompt_truncated": True, "response": "r1",
         "references": [], "reward": -1.0, "tokens": 1, "kl": 0.0},
        {"prompt_id": 4, "sample": 1, "id": 12, "prompt": "p2", "prompt_truncated": False, "response": "r2",
         "references": ["c"], "reward": 2.0, "tokens": 2, "kl": 1.0},
    ]
    assert [list(row) for row in rows][0] == ["prompt_id", "sample", "id", "prompt", "prompt_truncated", "response",
                                               "references", "reward", "tokens", "kl"]
    assert isinstance(rows[0]["tokens"], int) and isinstance(rows[0]["reward"], float)


def test_response_rows_without_ids_or_references():
    rows = response_rows(_hand_rollout(["p"], ["r"]), {"prompt": ["p"]}, {"kl": torch.tensor([1.5])})
    assert rows == [{"prompt": "p", "prompt_truncated": False, "response": "r", "references": [], "kl": 1.5}]


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
    with torch.no_grad(), pytest.warns(UserWarning, match=r"2 of 3 prompts .* truncate_prompt_tokens=5 and lose their end"):
        rollout = module.rollout(prompts, module.generation)
    assert rollout.n_truncated == 2 and rollout.prompt_cut == [True, False, True]
    assert rollout.input_ids.shape == (3, 5)
    # the model's cap keeps 4 bytes + </s>: prompts and the reward see what the model saw
    assert rollout.prompts == ["abcd", "ab", "abcd"] and len(rollout.texts) == 3
    seen = rollout.prompts
    expected = torch.tensor([10.0 * len(p) + len(t) for p, t in zip(seen, rollout.texts)])
    torch.testing.assert_close(rollout.scores, expected)  # row by row: each row's own prompt and text
    torch.testing.assert_close(rollout.components["lengths"], expected)
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
