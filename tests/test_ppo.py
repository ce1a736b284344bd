"""Unit tests for flan_rlhf.ppo against values worked out by hand (arithmetic in comments).

Masked positions are filled with NaN / inf / 1e9 wherever an unmasked implementation
(or one that masks by multiplying, since NaN * 0 == NaN) would give a different answer.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from flan_rlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    check_token_ids,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    response_kl,
    logprobs_from_logits,
    masked_mean,
    masked_ratio_mean,
    masked_var,
    masked_whiten,
    mean_non_score_reward,
    policy_loss,
    sequence_kl,
    value_loss,
)

NAN = float("nan")
INF = float("inf")
F64 = torch.float64


def t(values, dtype=F64, **kwargs) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, **kwargs)


def close(actual, expected, atol=1e-6) -> None:
    actual, expected = torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# ----------------------------------------------------------------------- masked stats


def test_masked_mean_ignores_nan_and_inf_at_masked_positions():
    x = t([[1.0, 2.0, NAN], [4.0, INF, 6.0]])
    mask = t([[1, 1, 0], [1, 0, 1]])
    # all selected: (1 + 2 + 4 + 6) / 4 = 3.25
    close(masked_mean(x, mask), 3.25)
    # per row: (1 + 2) / 2 = 1.5 ; (4 + 6) / 2 = 5
    close(masked_mean(x, mask, dim=1), [1.5, 5.0])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_masked_mean_accepts_bool_float_and_int_masks(mask_dtype):
    x = t([[10.0, 1e9], [2.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]]).to(mask_dtype)
    close(masked_mean(x, mask), (10 + 2 + 4) / 3)


def test_masked_mean_gradient_is_finite_and_zero_at_nan_positions():
    x = t([1.0, NAN, 3.0], requires_grad=True)
    masked_mean(x, t([1, 0, 1])).backward()
    # d mean / dx_i = 1/2 for the two selected entries, 0 for the masked one
    close(x.grad, [0.5, 0.0, 0.5])


def test_masked_mean_rejects_empty_mask_and_bad_shape():
    with pytest.raises(ValueError, match="no nonzero"):
        masked_mean(t([1.0, 2.0]), t([0, 0]))
    with pytest.raises(ValueError, match="no nonzero"):
        masked_mean(t([[1.0, 2.0], [3.0, 4.0]]), t([[1, 1], [0, 0]]), dim=1)
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(t([[1.0, 2.0]]), t([1, 1, 1]))


def test_masked_var_bessel_correction_and_masked_garbage():
    x = t([1.0, 2.0, 3.0, 1e9])
    mask = t([1, 1, 1, 0])
    # mean = 2; squared deviations 1, 0, 1 -> population var = 2/3
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    # Bessel: 2/3 * n/(n-1) = 2/3 * 3/2 = 1
    close(masked_var(x, mask), 1.0)
    close(masked_var(t([1.0, 2.0, 3.0, NAN]), mask), 1.0)


def test_masked_var_raises_on_too_few_entries():
    with pytest.raises(ValueError, match="sums to 0"):
        masked_var(t([1.0, 2.0]), t([0, 0]))
    with pytest.raises(ValueError, match="sums to 1"):
        masked_var(t([1.0, 2.0]), t([1, 0]))
    # a single entry is fine without the correction: its variance is 0
    close(masked_var(t([5.0, 2.0]), t([1, 0]), unbiased=False), 0.0)


def test_masked_whiten_known_numbers():
    x = t([[2.0, 4.0], [6.0, 8.0]])
    mask = torch.ones(2, 2)
    # mean 5; deviations -3 -1 1 3; sum sq 20; unbiased var 20/3; 1/std = sqrt(3/20)
    s = math.sqrt(3.0 / 20.0)
    close(masked_whiten(x, mask), [[-3 * s, -1 * s], [1 * s, 3 * s]])
    # shift_mean=False adds the mean 5 back
    close(masked_whiten(x, mask, shift_mean=False), [[5 - 3 * s, 5 - s], [5 + s, 5 + 3 * s]])


def test_masked_whiten_sets_masked_positions_to_zero_and_ignores_nan():
    x = t([[1.0, 2.0, 3.0, NAN]])
    mask = t([[1, 1, 1, 0]])
    # mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8); masked position -> 0
    scale = 1.0 / math.sqrt(1.0 + 1e-8)
    close(masked_whiten(x, mask), [[-scale, 0.0, scale, 0.0]], atol=1e-12)
    close(masked_whiten(x, mask, shift_mean=False), [[2 - scale, 2.0, 2 + scale, 0.0]], atol=1e-12)


# ------------------------------------------------------------------- logits -> tokens


def test_logprobs_and_entropy_from_logits_by_hand():
    # position 0: logits [0, ln 3] -> p = [1/4, 3/4]; position 1: logits [5, 5] -> p = [1/2, 1/2]
    logits = t([[[0.0, math.log(3.0)], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[math.log(0.75), math.log(0.5)]], atol=1e-12)
    # H0 = -(1/4 ln 1/4 + 3/4 ln 3/4); H1 = ln 2
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    close(entropy_from_logits(logits), [[h0, math.log(2.0)]], atol=1e-12)


def test_logprobs_from_logits_gradient_matches_softmax_identity():
    # d log p_y / d z = onehot(y) - softmax(z): for z = [0, ln 3], y = 1 -> [-1/4, 1 - 3/4]
    logits = t([[[0.0, math.log(3.0)]]], requires_grad=True)
    logprobs_from_logits(logits, torch.tensor([[1]])).sum().backward()
    close(logits.grad, [[[-0.25, 0.25]]], atol=1e-12)


def test_logprobs_from_logits_rejects_ignore_index_labels():
    with pytest.raises(ValueError, match="-100"):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.tensor([[1, -100]]))
    with pytest.raises(ValueError, match="labels shape"):
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.tensor([[1, 2, 0]]))


# -------------------------------------------------------------------------- rewards


def test_kl_penalized_rewards_put_score_on_last_response_token():
    logprobs = t([[-1.0, -2.0, -0.5], [-1.0, -1.5, 1e9]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-2.0, -1.0, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    scores = t([2.0, -1.0])
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: kl = logp - ref = [0.5, -1.0, 0.0]; -0.1*kl = [-0.05, 0.1, 0]; +2 at index 2
    # row 1: kl = [1.0, -0.5, (pad) 0]; -0.1*kl = [-0.1, 0.05, 0]; -1 at index 1 -> 0.05 - 1 = -0.95
    close(kl, [[0.5, -1.0, 0.0], [1.0, -0.5, 0.0]], atol=1e-12)
    close(rewards, [[-0.05, 0.1, 2.0], [-0.1, -0.95, 0.0]], atol=1e-12)


def test_kl_penalized_rewards_non_contiguous_mask_uses_last_one():
    logprobs = torch.zeros(1, 4, dtype=F64)
    mask = t([[1, 0, 1, 0]])
    rewards, _ = kl_penalized_rewards(t([3.0]), logprobs, logprobs.clone(), mask, kl_coef=0.5)
    # kl is 0 everywhere, so the only reward is the score at index 2 (the last 1)
    close(rewards, [[0.0, 0.0, 3.0, 0.0]])


def test_kl_penalized_rewards_abs_and_mse_estimators():
    logprobs = t([[-1.0, -2.0, 7.0]])
    ref_logprobs = t([[-1.5, -1.0, NAN]])
    mask = t([[1, 1, 0]])
    # diff = [0.5, -1.0]
    _, kl_abs = kl_penalized_rewards(t([0.0]), logprobs, ref_logprobs, mask, 1.0, kl_estimator="abs")
    close(kl_abs, [[0.5, 1.0, 0.0]])  # |diff|
    rewards, kl_mse = kl_penalized_rewards(t([1.0]), logprobs, ref_logprobs, mask, 2.0, kl_estimator="mse")
    close(kl_mse, [[0.125, 0.5, 0.0]])  # 0.5 * diff^2 = 0.5*0.25, 0.5*1
    close(rewards, [[-0.25, -1.0 + 1.0, 0.0]])  # -2 * kl, score 1 added at index 1


def test_kl_penalized_rewards_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="full"):
        kl_penalized_rewards(torch.zeros(2), z, z, torch.ones(2, 3), 0.1, kl_estimator="full")
    with pytest.raises(ValueError, match="unknown kl_estimator"):
        kl_penalized_rewards(torch.zeros(2), z, z, torch.ones(2, 3), 0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="all 0"):
        kl_penalized_rewards(torch.zeros(2), z, z, t([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError, match="scores"):
        kl_penalized_rewards(torch.zeros(3), z, z, torch.ones(2, 3), 0.1)


def test_response_kl_is_the_estimator_on_response_tokens_and_zero_after():
    logprobs = t([[-1.0, -2.0, -0.5], [-0.3, -7.0, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-0.3, -1.0, -2.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # k1: logp - ref; k3 of d = logp - ref: exp(-d) - 1 + d (e.g. d = 0.5 -> 0.6065 - 1 + 0.5 = 0.1065)
    torch.testing.assert_close(response_kl(logprobs, ref, mask), t([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0]]))
    k3 = response_kl(logprobs, ref, mask, "k3")
    torch.testing.assert_close(k3, t([[math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="all 0"):
        response_kl(logprobs, ref, t([[1, 0, 0], [0, 0, 0]]))


# ------------------------------------------------------------------------ advantages


def test_gae_one_by_three_by_hand():
    values = t([[0.5, 1.0, 2.0]])
    rewards = t([[0.1, -0.2, 1.0]])
    mask = torch.ones(1, 3)
    # gamma = 0.9, lam = 0.5 -> gamma*lam = 0.45; bootstrap value after the last token = 0
    # t=2: delta = 1.0 + 0.9*0   - 2.0 = -1.0 ; A2 = -1.0
    # t=1: delta = -0.2 + 0.9*2.0 - 1.0 = 0.6  ; A1 = 0.6 + 0.45*(-1.0) = 0.15
    # t=0: delta = 0.1 + 0.9*1.0 - 0.5 = 0.5  ; A0 = 0.5 + 0.45*0.15  = 0.5675
    # returns = A + V = [1.0675, 1.15, 1.0]
    advantages, returns = gae(values, rewards, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.5675, 0.15, -1.0]], atol=1e-12)
    close(returns, [[1.0675, 1.15, 1.0]], atol=1e-12)


def test_gae_padding_is_absent_and_garbage_ignored():
    values = t([[0.5, 1.0, 2.0, 1e9], [0.5, NAN, INF, 1e9]])
    rewards = t([[0.1, -0.2, 1.0, NAN], [2.0, 1e9, NAN, 5.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0]])
    advantages, returns = gae(values, rewards, mask, gamma=0.9, lam=0.5)
    # row 0 as in the 1x3 case (the pad value is not bootstrapped from); row 1 has one token:
    # A = 2.0 + 0.9*0 - 0.5 = 1.5 ; return = 1.5 + 0.5 = 2.0 ; zeros at padding
    close(advantages, [[0.5675, 0.15, -1.0, 0.0], [1.5, 0.0, 0.0, 0.0]], atol=1e-12)
    close(returns, [[1.0675, 1.15, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]], atol=1e-12)


def test_gae_with_gamma_lam_one_is_monte_carlo_return_minus_value():
    values = t([[0.5, 1.0, 2.0]], requires_grad=True)
    rewards = t([[0.1, -0.2, 1.0]])
    # A_t = sum_{k>=t} r_k - V_t = [0.9 - 0.5, 0.8 - 1.0, 1.0 - 2.0]
    advantages, returns = gae(values, rewards, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[0.4, -0.2, -1.0]], atol=1e-12)
    close(returns, [[0.9, 0.8, 1.0]], atol=1e-12)
    assert not advantages.requires_grad and not returns.requires_grad


def test_gae_rejects_out_of_range_gamma():
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma=1.5, lam=0.9)


# ---------------------------------------------------------------------------- losses


def _policy_case():
    # tokens: a b c d e (pad)
    #   A      = +1    -1    +2    -1    +1
    #   ratio  = 1.5   0.5   1.0   1.5   0.5
    #   -A*r   = -1.5  0.5   -2    1.5   -0.5       (unclipped)
    #   -A*cl  = -1.2  0.8   -2    1.2   -0.8       (clip to [0.8, 1.2])
    #   max    = -1.2  0.8   -2    1.5   -0.5       clipped term active for a (A>0) and b (A<0)
    log_ratio = [math.log(1.5), math.log(0.5), 0.0, math.log(1.5), math.log(0.5)]
    old = [-1.0, -2.0, -0.5, -3.0, -0.25]
    logprobs = t([[o + lr for o, lr in zip(old, log_ratio)] + [1e9]], requires_grad=True)
    old_logprobs = t([old + [NAN]], requires_grad=True)
    advantages = t([[1.0, -1.0, 2.0, -1.0, 1.0, NAN]], requires_grad=True)
    mask = t([[1, 1, 1, 1, 1, 0]])
    return logprobs, old_logprobs, advantages, mask, log_ratio


def test_policy_loss_clipping_for_positive_and_negative_advantage():
    logprobs, old_logprobs, advantages, mask, log_ratio = _policy_case()
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    # mean of max row: (-1.2 + 0.8 - 2 + 1.5 - 0.5) / 5 = -1.4 / 5 = -0.28
    close(pg_loss, -0.28, atol=1e-9)
    # clipped > unclipped at a and b only -> 2/5
    close(clipfrac, 0.4)
    # 0.5 * mean(log_ratio^2) = 0.5 * (2 ln(1.5)^2 + 2 ln(0.5)^2) / 5 = 0.128971...
    close(approx_kl, 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 5, atol=1e-9)
    assert not clipfrac.requires_grad and not approx_kl.requires_grad


def test_policy_loss_gradient_flows_to_logprobs_only():
    logprobs, old_logprobs, advantages, mask, _ = _policy_case()
    pg_loss, _, _ = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    pg_loss.backward()
    # d(-A*ratio)/d logp = -A*ratio on unclipped tokens, 0 where the clamp is active; / 5 tokens
    # a: clipped -> 0 ; b: clipped -> 0 ; c: -2*1/5 = -0.4 ; d: +1*1.5/5 = 0.3 ; e: -1*0.5/5 = -0.1 ; pad: 0
    close(logprobs.grad, [[0.0, 0.0, -0.4, 0.3, -0.1, 0.0]], atol=1e-9)
    assert old_logprobs.grad is None
    assert advantages.grad is None


def test_value_loss_with_and_without_active_clip():
    # token 1: old 1.0, new 1.5,   ret 2.0 -> v_clip 1.2;  errors 0.25 vs 0.64  -> max 0.64   (clip active)
    # token 2: old 1.0, new 1.125, ret 2.0 -> v_clip 1.125; errors 0.765625 both -> 0.765625 (inside range)
    # token 3: old 1.0, new 1.5,   ret 0.0 -> v_clip 1.2;  errors 2.25 vs 1.44  -> max 2.25   (unclipped wins)
    values = t([[1.5, 1.125, 1.5, NAN]], requires_grad=True)
    old_values = t([[1.0, 1.0, 1.0, 1e9]], requires_grad=True)
    returns = t([[2.0, 2.0, 0.0, INF]], requires_grad=True)
    mask = t([[1, 1, 1, 0]])
    vf_loss, vf_clipfrac = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # 0.5 * (0.64 + 0.765625 + 2.25) / 3
    close(vf_loss, 0.5 * 3.655625 / 3, atol=1e-9)
    close(vf_clipfrac, 1.0 / 3.0)
    vf_loss.backward()
    # token 1: clamp saturated -> 0; token 2: 0.5 * 2*(1.125-2)/3 = -0.875/3; token 3: 0.5 * 2*1.5/3 = 0.5
    close(values.grad, [[0.0, -0.875 / 3, 0.5, 0.0]], atol=1e-9)
    assert old_values.grad is None and returns.grad is None

    # a cliprange this wide never clips: plain 0.5 * mean squared error = 0.5 * (0.25 + 0.765625 + 2.25) / 3
    vf_loss_wide, clipfrac_wide = value_loss(values, old_values, returns, mask, cliprange_value=10.0)
    close(vf_loss_wide, 0.5 * 3.265625 / 3, atol=1e-9)
    close(clipfrac_wide, 0.0)


def test_masked_ratio_mean():
    logprobs = t([[math.log(2.0), math.log(0.5), 1e9]])
    old_logprobs = t([[0.0, 0.0, NAN]])
    # ratios 2 and 0.5 -> mean 1.25 ; the padded token is ignored
    close(masked_ratio_mean(logprobs, old_logprobs, t([[1, 1, 0]])), 1.25, atol=1e-12)


# ---------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_one_update_and_clip():
    # e = clip(6.6/6 - 1, -0.2, 0.2) = 0.1 ; mult = 1 + 0.1 * 256/10000 = 1.00256 ; 0.2 * 1.00256 = 0.200512
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.200512, abs=1e-12)
    # KL 12: 12/6 - 1 = 1 -> clipped to +0.2 ; mult = 1 + 0.2*256/10000 = 1.00512 ; 0.2 * 1.00512 = 0.201024
    high = AdaptiveKLController(0.2, 6.0, 10000)
    high.update(torch.tensor(12.0), n_steps=256)
    assert high.value == pytest.approx(0.201024, abs=1e-12)
    # KL 0: 0/6 - 1 = -1 -> clipped to -0.2 ; mult = 0.99488 ; 0.2 * 0.99488 = 0.198976
    low = AdaptiveKLController(0.2, 6.0, 10000)
    low.update(0.0, n_steps=256)
    assert low.value == pytest.approx(0.198976, abs=1e-12)


def test_adaptive_kl_controller_state_round_trips_exactly():
    ctl = AdaptiveKLController(0.2, 6.0, 10000)
    for kl in (7.3, 1.1, 6.05):
        ctl.update(kl, n_steps=64)
    restored = AdaptiveKLController(1.0, 1.0, 1.0)
    restored.load_state_dict(json.loads(json.dumps(ctl.state_dict())))
    assert restored.state_dict() == ctl.state_dict()
    ctl.update(9.0, 64)
    restored.update(9.0, 64)
    assert restored.value == ctl.value


def test_kl_controllers_reject_bad_input():
    with pytest.raises(ValueError, match="finite"):
        AdaptiveKLController(0.2, 6.0, 10000).update(NAN, 8)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.2, 0.0, 10000)
    with pytest.raises(ValueError, match="missing"):
        AdaptiveKLController(0.2, 6.0, 10000).load_state_dict({"value": 0.1})


def test_fixed_kl_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# ------------------------------------------------------------------ running moments


def test_running_moments_first_batches_by_hand():
    rm = RunningMoments()
    # [1, 2, 3]: mean 2, unbiased var (1 + 0 + 1)/2 = 1
    assert rm.update(t([1.0, 2.0, 3.0])) == pytest.approx((2.0, 1.0))
    # [4, 5]: batch mean 4.5, batch std sqrt(0.5); running over 1..5: mean 3, var (4+1+0+1+4)/4 = 2.5
    batch_mean, batch_std = rm.update(t([4.0, 5.0]))
    assert (batch_mean, batch_std) == pytest.approx((4.5, math.sqrt(0.5)))
    assert (rm.mean, rm.std, rm.count) == pytest.approx((3.0, math.sqrt(2.5), 5))


def test_running_moments_match_concatenated_batches():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=generator) * 3 + 1 for n in (7, 1, 16, 3)]
    rm = RunningMoments()
    for batch in batches:
        rm.update(batch)
    everything = torch.cat(batches).double()
    assert rm.count == 27
    assert rm.mean == pytest.approx(everything.mean().item(), abs=1e-12)
    assert rm.std == pytest.approx(everything.std().item(), abs=1e-12)  # unbiased, like TRL


def test_running_moments_state_round_trip_and_bad_input():
    rm = RunningMoments()
    rm.update(t([0.5, -2.0, 4.0]))
    restored = RunningMoments()
    restored.load_state_dict(json.loads(json.dumps(rm.state_dict())))
    assert restored.state_dict() == rm.state_dict()
    rm.update(t([1.0, 9.0]))
    restored.update(t([1.0, 9.0]))
    assert restored.state_dict() == rm.state_dict()
    with pytest.raises(ValueError, match="NaN"):
        rm.update(t([1.0, NAN]))
    with pytest.raises(ValueError, match="empty"):
        rm.update(torch.zeros(0))
    with pytest.raises(ValueError, match="at least 2"):
        RunningMoments().update(t([1.0]))


def test_sequence_kl_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: 0.5 - 1.0 + 0 = -0.5; row 1: 0.2 + 0 (the masked -8 does not count)
    assert torch.allclose(sequence_kl(logprobs, ref, mask), torch.tensor([-0.5, 0.2]))


def test_checks_off_read_nothing_and_an_empty_selection_gives_nan():
    """``check=False`` (the PPO minibatch loop, where each check would be a host sync) does not raise:
    an empty mask gives NaN, which the module's non-finite guard then skips."""
    x, empty = t([[1.0, 2.0]]), t([[0.0, 0.0]])
    assert math.isnan(masked_mean(x, empty, check=False).item())
    pg_loss, _, _ = policy_loss(x, x, x, empty, 0.2, check=False)
    vf_loss, _ = value_loss(x, x, x, empty, 0.2, check=False)
    assert math.isnan(pg_loss.item()) and math.isnan(vf_loss.item())
    assert math.isnan(masked_ratio_mean(x, x, empty, check=False).item())
    with pytest.raises(ValueError, match="no nonzero"):
        policy_loss(x, x, x, empty, 0.2)  # checked by default
    logits = torch.zeros(1, 2, 3, dtype=F64)
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([[0, 2]]), check=False),
                               torch.full((1, 2), -math.log(3), dtype=F64))


def test_check_token_ids_names_the_range():
    check_token_ids(torch.tensor([[0, 4]]), 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\); got range \[-100, 4\]"):
        check_token_ids(torch.tensor([[-100, 4]]), 5)
    with pytest.raises(ValueError, match=r"got range \[0, 5\]"):
        check_token_ids(torch.tensor([5, 0]), 5)


# ----------------------------------------------------------- k3 KL and loss aggregation (RLOO, GRPO)


def test_k3_kl_by_hand_and_never_negative():
    from flan_rlhf.ppo import per_token_kl

    # log_ratio = logp - ref: k3 = exp(-log_ratio) - 1 + log_ratio
    log_ratio = torch.tensor([math.log(2.0), 0.0, -math.log(2.0)], dtype=torch.float64)
    expected = [0.5 - 1 + math.log(2.0), 0.0, 2.0 - 1 - math.log(2.0)]
    assert per_token_kl(log_ratio, "k3").tolist() == pytest.approx(expected, abs=1e-12)
    assert (per_token_kl(torch.linspace(-5, 5, 101), "k3") >= 0).all()
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0]), t([[math.log(2.0), 0.0]]), t([[0.0, 0.0]]),
                                       torch.ones(1, 2), 0.5, kl_estimator="k3")
    assert kl[0].tolist() == pytest.approx([expected[0], 0.0], abs=1e-6)
    assert rewards[0].tolist() == pytest.approx([-0.5 * expected[0], 1.0], abs=1e-6)


def test_token_and_sequence_aggregation_by_hand():
    from flan_rlhf.ppo import aggregate_tokens

    x, mask = t([[1.0, 2.0, 99.0], [4.0, 99.0, 99.0]]), t([[1, 1, 0], [1, 0, 0]])
    assert aggregate_tokens(x, mask, "token").item() == pytest.approx(7 / 3)  # (1 + 2 + 4) / 3 tokens
    assert aggregate_tokens(x, mask, "sequence").item() == pytest.approx(2.75)  # mean(1.5, 4)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_tokens(x, mask, "batch")


def test_policy_loss_aggregates_per_sequence_when_asked():
    # ratio 1 everywhere, so the loss is the aggregate of -A: A = +1 on the two tokens of row 0,
    # -2 on the one token of row 1. Token mean: (-1 - 1 + 2) / 3 = 0; sequence mean: (-1 + 2) / 2 = 0.5.
    logprobs = t([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    advantages, mask = t([[1.0, 1.0, 0.0], [-2.0, 0.0, 0.0]]), t([[1, 1, 0], [1, 0, 0]])
    token, _, _ = policy_loss(logprobs, logprobs, advantages, mask, 0.2)
    sequence, _, _ = policy_loss(logprobs, logprobs, advantages, mask, 0.2, aggregation="sequence")
    assert (token.item(), sequence.item()) == pytest.approx((0.0, 0.5))


def test_mean_non_score_reward_is_trls_kl_share_of_the_reward():
    # TRL 0.11 compute_rewards: non_score_reward = -kl_coef * kl per token; record_step_stats averages its
    # per-response sums. Two responses with KL sums 1.5 and 3.5 (mean 2.5) at kl_coef 0.2: -0.5.
    assert mean_non_score_reward(2.5, 0.2) == pytest.approx(-0.5)
    assert mean_non_score_reward(-0.1, 0.0) == 0.0
    with pytest.raises(ValueError, match="kl_coef"):
        mean_non_score_reward(1.0, -0.1)
