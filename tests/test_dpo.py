"""The DPO / IPO losses, their statistics and online pair building (:mod:`flan_rlhf.dpo`), against
hand-computed values, the papers' formulas and TRL's code."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flan_rlhf import dpo

# one pair: h = (pc - rc) - (pr - rr) = (-1 + 1.5) - (-2 + 1.5) = 1.0
PC, PR, RC, RR = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])


def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_gap():
    # -log sigmoid(0.1 * 1.0) = log(1 + e^-0.1), by hand 0.6443966600735709
    loss = dpo.preference_loss(PC, PR, RC, RR, beta=0.1)
    assert loss.item() == pytest.approx(0.6443966600735709, abs=1e-7)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-7)


def test_label_smoothing_mixes_in_the_flipped_label():
    # 0.8 * log(1 + e^-0.1) + 0.2 * log(1 + e^0.1) = 0.8 * 0.64439666 + 0.2 * 0.74439666 = 0.66439666
    loss = dpo.preference_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.6643966600735709, abs=1e-7)


def test_ipo_loss_regresses_the_gap_to_one_over_two_beta():
    # (h - 1 / (2 beta))^2: (1 - 5)^2 = 16 at beta 0.1, (1 - 1)^2 = 0 at beta 0.5
    assert dpo.preference_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo").item() == pytest.approx(16.0)
    assert dpo.preference_loss(PC, PR, RC, RR, beta=0.5, loss_type="ipo").item() == pytest.approx(0.0)


def test_dpo_gradient_is_the_papers():
    """Rafailov et al. eq. 7's gradient: d L / d log pi(y_w) = -beta * sigmoid(-beta h), and the
    opposite for y_l; with h = 1, beta = 0.1: -0.1 * sigmoid(-0.1) = -0.0475020813."""
    chosen, rejected = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo.preference_loss(chosen, rejected, RC, RR, beta=0.1).sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.0475020813, abs=1e-9)
    assert rejected.grad.item() == pytest.approx(0.0475020813, abs=1e-9)


def trl_dpo_loss(pc, pr, rc, rr, beta, label_smoothing, loss_type):
    """TRL 0.11 ``DPOTrainer.dpo_loss`` (trl/trainer/dpo_trainer.py), its sigmoid and ipo branches, verbatim
    but for the attribute names."""
    pi_logratios = pc - pr
    ref_logratios = rc - rr
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return losses, chosen_rewards, rejected_rewards


@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0)])
def test_losses_and_statistics_match_trls_code_on_random_pairs(loss_type, label_smoothing):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(16, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    beta = 0.25
    expected, chosen_rewards, rejected_rewards = trl_dpo_loss(pc, pr, rc, rr, beta, label_smoothing, loss_type)
    got = dpo.preference_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    torch.testing.assert_close(got, expected)
    stats = dpo.preference_statistics(pc, pr, rc, rr, beta)
    torch.testing.assert_close(stats["rewards/chosen"], chosen_rewards.mean())
    torch.testing.assert_close(stats["rewards/rejected"], rejected_rewards.mean())
    torch.testing.assert_close(stats["rewards/margins"], (chosen_rewards - rejected_rewards).mean())
    torch.testing.assert_close(stats["rewards/accuracies"], (chosen_rewards > rejected_rewards).double().mean())
    torch.testing.assert_close(stats["logps/chosen"], pc.mean())
    torch.testing.assert_close(stats["logps/rejected"], pr.mean())


def test_statistics_by_hand():
    # chosen reward 0.1 * (-1 + 1.5) = 0.05; rejected 0.1 * (-2 + 1.5) = -0.05; a second pair the other way round
    stats = dpo.preference_statistics(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]),
                                      torch.tensor([-1.5, -1.0]), torch.tensor([-1.5, -1.0]), beta=0.1)
    # pair 2: chosen 0.1 * (-3 + 1) = -0.2, rejected 0.1 * (-1 + 1) = 0
    assert stats["rewards/chosen"].item() == pytest.approx((0.05 - 0.2) / 2)
    assert stats["rewards/rejected"].item() == pytest.approx((-0.05 + 0.0) / 2)
    assert stats["rewards/margins"].item() == pytest.approx((0.1 - 0.2) / 2)
    assert stats["rewards/accuracies"].item() == 0.5
    assert stats["logps/chosen"].item() == -2.0 and stats["logps/rejected"].item() == -1.5


def test_sequence_logps_sum_or_average_the_response_tokens_only():
    token_logps = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert dpo.sequence_logps(token_logps, mask).tolist() == [-7.0, -0.5]
    assert dpo.sequence_logps(token_logps, mask, average=True).tolist() == pytest.approx([-7.0 / 3, -0.5])


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "hinge"}, "loss_type 'hinge' is unknown"),
    ({"beta": 0.0}, "beta is 0.0"),
    ({"label_smoothing": 0.5}, "label_smoothing is 0.5"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid (DPO) loss only"),
])
def test_invalid_settings_are_refused_in_one_line(kwargs, message):
    settings = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        dpo.check_loss_settings(**settings)
    assert "\n" not in str(err.value)


def test_best_and_worst_of_each_group_make_the_pair_and_ties_make_none():
    # k = 3; groups: [0.1, 0.9, 0.5] -> (1, 0); [2, 2, 2] -> no pair; [0.3, -1, 0.3] -> first best (6), worst (7)
    rewards = torch.tensor([0.1, 0.9, 0.5, 2.0, 2.0, 2.0, 0.3, -1.0, 0.3])
    chosen, rejected, has_pair = dpo.best_and_worst_of_groups(rewards, k=3)
    assert has_pair.tolist() == [True, False, True]
    assert chosen[has_pair].tolist() == [1, 6]
    assert rejected[has_pair].tolist() == [0, 7]
    assert chosen[1] // 3 == rejected[1] // 3 == 1  # the placeholder stays within its group


def test_weighted_statistics_ignore_placeholder_pairs():
    # pair 2 is a placeholder (weight 0) whose values would change every mean
    stats = dpo.preference_statistics(torch.tensor([-1.0, -50.0]), torch.tensor([-2.0, 0.0]),
                                      torch.tensor([-1.5, 0.0]), torch.tensor([-1.5, 0.0]), beta=0.1,
                                      weights=torch.tensor([1.0, 0.0]))
    assert stats["rewards/chosen"].item() == pytest.approx(0.05)
    assert stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == -1.0
    assert dpo.weighted_mean(torch.tensor([3.0, 5.0]), torch.tensor([0.0, 0.0])).item() == 0.0


def test_pairs_need_whole_groups():
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        dpo.best_and_worst_of_groups(torch.tensor([1.0, 2.0, 3.0]), k=2)
