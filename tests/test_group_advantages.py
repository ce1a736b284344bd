"""Critic-free advantages (flan_rlhf/group_advantages.py) against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from flan_rlhf.group_advantages import (
    GRPO_STD_EPS,
    check_group_size,
    group_reward_statistics,
    group_rewards,
    grpo_advantages,
    rloo_advantages,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_rloo_is_each_reward_minus_the_mean_of_the_others_by_hand():
    # [1, 2, 3]: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; k = 2: 0.2 - 0.8, 0.8 - 0.2
    assert rloo_advantages(t([[1, 2, 3]])).tolist() == [[-1.5, 0.0, 1.5]]
    assert rloo_advantages(t([[0.2, 0.8]])) == pytest.approx(t([[-0.6, 0.6]]))
    # a tie: [1, 1, 0] -> 1 - 0.5, 1 - 0.5, 0 - 1
    assert rloo_advantages(t([[1, 1, 0]])).tolist() == [[0.5, 0.5, -1.0]]
    # groups are independent rows; a group's advantages sum to 0
    two = rloo_advantages(t([[1, 2, 3, 6], [5, 5, 5, 5]]))
    assert two[0].tolist() == [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2]
    assert two.sum(dim=-1).abs().max() < 1e-12


def test_all_equal_groups_get_zero_advantage_and_no_nan():
    equal = t([[0.7, 0.7, 0.7, 0.7], [0.0, 0.0, 0.0, 0.0]])
    for advantages in (rloo_advantages(equal), grpo_advantages(equal), grpo_advantages(equal, scale_by_std=False)):
        assert torch.isfinite(advantages).all() and advantages.abs().max() < 1e-12


def test_grpo_normalises_within_each_group_by_hand():
    # [1, 2, 3]: mean 2, sample std 1 -> (-1, 0, 1) / (1 + eps)
    assert grpo_advantages(t([[1, 2, 3]])) == pytest.approx(t([[-1, 0, 1]]) / (1 + GRPO_STD_EPS))
    # [0, 0, 1, 1] (ties): mean 0.5, sample std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    assert grpo_advantages(t([[0, 0, 1, 1]])) == pytest.approx(t([[-0.5, -0.5, 0.5, 0.5]]) / (std + GRPO_STD_EPS))
    # Dr. GRPO: no division, so a group with a 10x spread gets 10x the advantage
    assert grpo_advantages(t([[0, 1], [0, 10]]), scale_by_std=False).tolist() == [[-0.5, 0.5], [-5.0, 5.0]]
    scaled = grpo_advantages(t([[0, 1], [0, 10]]))
    assert scaled[0] == pytest.approx(scaled[1], rel=1e-3)  # with the std both groups look alike


def test_one_response_per_prompt_is_refused_with_one_line():
    for bad in (1, 0, True, 2.0):
        with pytest.raises(ValueError, match="at least 2 responses per prompt") as error:
            check_group_size(bad)
        assert "\n" not in str(error.value)
    for function in (rloo_advantages, grpo_advantages, group_reward_statistics):
        with pytest.raises(ValueError, match="at least 2 responses per prompt"):
            function(t([[1.0], [2.0]]))
        with pytest.raises(ValueError, match=r"\(n_groups, k\)"):
            function(t([1.0, 2.0]))
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(t([[1, 2]]), eps=0.0)


def test_group_rewards_reshapes_contiguous_groups():
    scores = torch.arange(6.0)
    assert group_rewards(scores, 3).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert group_rewards(scores, 2).data_ptr() == scores.data_ptr()  # a view, no copy
    with pytest.raises(ValueError, match="groups of 4"):
        group_rewards(scores, 4)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        group_rewards(scores.reshape(2, 3), 3)


def test_group_statistics_by_hand():
    stats = group_reward_statistics(t([[1, 1, 1], [0, 1, 2], [3, 3, 4]]))
    # stds 0, 1, sqrt(1/3); one group of three has no spread
    assert stats["reward_std"].item() == pytest.approx((0 + 1 + math.sqrt(1 / 3)) / 3)
    assert stats["frac_reward_zero_std"].item() == pytest.approx(1 / 3)


def test_advantages_are_detached():
    rewards = t([[1, 2], [3, 5]]).requires_grad_()
    assert not rloo_advantages(rewards).requires_grad and not grpo_advantages(rewards).requires_grad
