"""PPO tensor math for RLHF on generated tokens (no Lightning, no model code).

Every per-token tensor has shape ``(batch, response_len)`` and lives on the generated
(decoder) tokens. ``mask`` has the same shape; it is nonzero (``1``/``True``) on response
tokens, EOS included, and zero on padding. Float, integer and bool masks are accepted.

Conventions follow TRL <= 0.11 (``trl/core.py`` and ``PPOTrainer.compute_rewards`` /
``compute_advantages`` / ``loss``) so that TRL hyperparameters (``cliprange=0.2``,
``cliprange_value=0.2``, ``gamma=1``, ``lam=0.95``, ``init_kl_coef=0.2``, ``target=6``,
``horizon=10000``, ``ratio_threshold=10``) mean the same thing here. Two deliberate
differences:

* Masked positions are removed with :func:`torch.where`, never by multiplying by the mask,
  so NaN/inf garbage at padding cannot leak into results or gradients (``NaN * 0 == NaN``).
* Tensors that PPO treats as constants (``old_logprobs``, ``old_values``, ``advantages``,
  ``returns``) are detached inside the losses, so no gradient can reach them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "entropy_from_logits",
    "gae",
    "kl_penalized_rewards",
    "response_kl",
    "logprobs_from_logits",
    "masked_mean",
    "masked_ratio_mean",
    "masked_var",
    "masked_whiten",
    "per_token_kl",
    "aggregate_tokens",
    "policy_loss",
    "value_loss",
]

#: Per-token KL estimators accepted by :func:`kl_penalized_rewards` (TRL's ``kl_penalty``) and
#: :func:`per_token_kl`; ``k3`` is the one GRPO puts in its loss.
KL_ESTIMATORS = ("kl", "abs", "mse", "k3")

#: How a per-token loss becomes a scalar (:func:`aggregate_tokens`).
LOSS_AGGREGATIONS = ("token", "sequence")

# Added to the variance before the inverse square root in whitening (TRL's value).
_WHITEN_EPS = 1e-8


# --------------------------------------------------------------------------- helpers


def _bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "x") -> torch.Tensor:
    """``mask`` as a bool tensor broadcast to ``like.shape``; ValueError if it cannot be."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}; pass torch.as_tensor(mask)")
    try:
        torch.broadcast_shapes(mask.shape, like.shape)
    except RuntimeError:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {name} shape {tuple(like.shape)}; "
            "pass a mask of the same (batch, response_len) shape"
        ) from None
    bool_mask = mask if mask.dtype == torch.bool else mask != 0
    return bool_mask.to(like.device).expand(like.shape)


def _same_shape(**tensors: torch.Tensor) -> None:
    """Raise ValueError naming the tensors if their shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listing}; all must be (batch, response_len)")


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out entries replaced by 0 (NaN-safe, gradient-safe)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if not float(value) >= 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {value}")


# --------------------------------------------------------------------- masked stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, *, check: bool = True) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is nonzero.

    Entries where ``mask`` is 0 are ignored even if they hold NaN or inf.

    Args:
        x: any shape, e.g. ``(batch, response_len)``.
        mask: same shape as ``x`` (or broadcastable to it); nonzero = include.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        A scalar tensor if ``dim is None``, otherwise ``x`` reduced over ``dim``
        (e.g. ``(batch,)`` for ``dim=1``).

    Raises:
        ValueError: if the mask selects nothing (or, with ``dim``, nothing in some slice).
        ``check=False`` skips this test, which reads a value from the device (a host sync on a
        GPU); an empty selection then gives NaN.
    """
    bool_mask = _bool_mask(mask, x)
    total = _zero_masked(x, bool_mask).sum(dim=dim)
    count = bool_mask.sum(dim=dim)
    if check and bool((count == 0).any()):
        where = "anywhere" if dim is None else f"in some slice along dim={dim}"
        raise ValueError(
            f"masked_mean: mask has no nonzero entries {where}; every row needs at least one response token"
        )
    return total / count.to(total.dtype)


def aggregate_tokens(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token", *, check: bool = True) -> torch.Tensor:
    """A per-token loss ``(batch, response_len)`` as one scalar.

    ``"token"``: the mean over every response token of the batch, so each token weighs the same
    and a long response weighs more (TRL's PPO, DAPO). ``"sequence"``: the mean over responses of
    each response's own token mean, so each response weighs the same and a long one's tokens
    each weigh less (GRPO as published, Shao et al. 2024, eq. 3).

    Args:
        x: ``(batch, response_len)``.
        mask: ``(batch, response_len)``; with ``"sequence"`` every row needs a nonzero entry.
        aggregation: one of :data:`LOSS_AGGREGATIONS`.
        check: as in :func:`masked_mean`.
    Returns:
        a scalar tensor.
    """
    if aggregation == "token":
        return masked_mean(x, mask, check=check)
    if aggregation == "sequence":
        return masked_mean(x, mask, dim=-1, check=check).mean()
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use one of {LOSS_AGGREGATIONS}")


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the entries where ``mask`` is nonzero, as a scalar tensor.

    With ``unbiased=True`` the population variance is Bessel-corrected like TRL's
    ``masked_var``: multiplied by ``n / (n - 1)`` where ``n`` is the number of selected
    entries. Masked-out entries are ignored even if they hold NaN or inf.

    Args:
        x: any shape, e.g. ``(batch, response_len)``.
        mask: same shape as ``x``; nonzero = include.
        unbiased: apply the Bessel correction.

    Raises:
        ValueError: if the mask selects no entry, or exactly one entry with ``unbiased=True``.
    """
    bool_mask = _bool_mask(mask, x)
    count = int(bool_mask.sum())
    if count == 0:
        raise ValueError(
            "masked_var: mask sums to 0; there is nothing to take the variance of (use a larger minibatch)"
        )
    if unbiased and count == 1:
        raise ValueError(
            "masked_var: mask sums to 1, so the unbiased variance divides by 0; "
            "use a minibatch with more response tokens or pass unbiased=False"
        )
    clean = _zero_masked(x, bool_mask)
    mean = clean.sum() / count
    variance = _zero_masked((clean - mean) ** 2, bool_mask).sum() / count
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``x`` with the masked mean and (unbiased) masked variance.

    ``whitened = (x - mean) * rsqrt(var + 1e-8)``; with ``shift_mean=False`` the mean is
    added back (TRL uses this to whiten rewards without moving their level).

    Args:
        x: ``(batch, response_len)`` (any shape works).
        mask: same shape as ``x``; nonzero = include in the statistics.
        shift_mean: if ``False``, add the mean back after scaling.

    Returns:
        Same shape as ``x``. Positions where ``mask`` is 0 are set to 0.

    Raises:
        ValueError: from :func:`masked_var` if fewer than 2 entries are selected.
    """
    bool_mask = _bool_mask(mask, x)
    clean = _zero_masked(x, bool_mask)
    mean = masked_mean(clean, bool_mask)
    variance = masked_var(clean, bool_mask, unbiased=True)
    whitened = (clean - mean) * torch.rsqrt(variance + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, bool_mask)


# ---------------------------------------------------------------- logits -> tokens


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Log-probability of each label token: ``log_softmax(logits)[..., label]``.

    Computed as ``logits[label] - logsumexp(logits)`` so the full ``(batch, len, vocab)``
    log-softmax is never materialised.

    Args:
        logits: ``(batch, response_len, vocab)``.
        labels: ``(batch, response_len)`` integer token ids in ``[0, vocab)``. Padding
            positions must hold a valid id (e.g. the pad token), not ``-100``.

    Returns:
        ``(batch, response_len)`` in the dtype of ``logits``.

    ``check=False`` skips the label-range test (it reads ``labels.min()/max()`` from the device, a
    host sync on a GPU); use it where the labels were checked once already (:func:`check_token_ids`).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, response_len, vocab), got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without vocab "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if check:
        check_token_ids(labels, logits.shape[-1])
    label_logits = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return label_logits - torch.logsumexp(logits, dim=-1)


def check_token_ids(labels: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` unless every id in ``labels`` (any shape) lies in ``[0, vocab_size)``."""
    if not labels.numel():
        return
    low, high = torch.stack([labels.min(), labels.max()]).tolist()  # one device read
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"labels must lie in [0, {vocab_size}); "
            f"got range [{low}, {high}] "
            "(replace -100 by the pad token id and rely on the mask)"
        )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution given by ``logits`` over the last dim.

    ``H = logsumexp(z) - sum(softmax(z) * z)`` (TRL's formula; equal to ``-sum p log p``).

    Args:
        logits: ``(batch, response_len, vocab)``.

    Returns:
        ``(batch, response_len)``, in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# -------------------------------------------------------------------------- rewards


def per_token_kl(log_ratio: torch.Tensor, kl_estimator: str) -> torch.Tensor:
    """A per-token estimate of ``KL(policy || reference)`` from ``log_ratio = logprobs - ref_logprobs``.

    Estimators from http://joschu.net/blog/kl-approx.html, for tokens sampled from the policy:
    ``"kl"`` is k1 (``log_ratio``, unbiased, can be negative), ``"mse"`` is k2
    (``0.5 * log_ratio**2``), ``"k3"`` is ``exp(-log_ratio) - 1 + log_ratio`` (unbiased and
    never negative; the KL term of GRPO's loss, Shao et al. 2024, eq. 4), ``"abs"`` is
    ``|log_ratio|``. The first three are TRL's ``PPOTrainer._kl_penalty``.

    Args:
        log_ratio: any shape, e.g. ``(batch, response_len)``.
    Returns:
        the same shape.
    """
    if kl_estimator == "kl":
        return log_ratio
    if kl_estimator == "abs":
        return log_ratio.abs()
    if kl_estimator == "mse":
        return 0.5 * log_ratio.square()
    if kl_estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kl_estimator == "full":
        raise ValueError(
            "kl_estimator='full' needs the full-vocabulary log-probs, which this function does not get; "
            f"use one of {KL_ESTIMATORS}"
        )
    raise ValueError(f"unknown kl_estimator {kl_estimator!r}; use one of {KL_ESTIMATORS}")


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response KL estimate ``sum_t (logp_t - ref_logp_t)`` over response tokens (k1).

    Args:
        logprobs, ref_logprobs: sampled tokens' log-probs under policy and reference, ``(batch, len)``.
        mask: 1 on response tokens, ``(batch, len)``.
    Returns:
        ``(batch,)``: an unbiased estimate of ``KL(policy || reference)`` of each response
        when the tokens were sampled from the policy.
    """
    return ((logprobs - ref_logprobs) * mask).sum(dim=1)


def response_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_estimator: str = "kl", *,
    check: bool = True,
) -> torch.Tensor:
    """Per-token KL estimate of each response (:func:`per_token_kl` of ``logprobs - ref_logprobs``), 0 off it.

    Args:
        logprobs: ``(batch, response_len)`` log-probs of the generated tokens under the policy.
        ref_logprobs: ``(batch, response_len)`` the same under the frozen reference model.
        mask: ``(batch, response_len)``; every row needs at least one nonzero entry.
        kl_estimator: one of :data:`KL_ESTIMATORS`.
        check: test that no mask row is all 0 (a device read, as in :func:`masked_mean`).

    Returns:
        ``(batch, response_len)``, 0 where ``mask`` is 0. The log-ratio is zeroed off the response
        before the estimator, so a loss built on it gets no NaN gradient from padding.

    Raises:
        ValueError: shapes differ, or (with ``check``) a mask row is all 0 (a response with no token).
    """
    _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be (batch, response_len), got shape {tuple(logprobs.shape)}")
    bool_mask = _bool_mask(mask, logprobs, "logprobs")
    if check and not bool(bool_mask.any(dim=-1).all()):
        raise ValueError("some mask row is all 0; every response needs at least one token (EOS)")
    log_ratio = _zero_masked(logprobs, bool_mask) - _zero_masked(ref_logprobs, bool_mask)
    return _zero_masked(per_token_kl(log_ratio, kl_estimator), bool_mask)


def mean_non_score_reward(mean_sequence_kl: float, kl_coef: float) -> float:
    """TRL's ``ppo/mean_non_score_reward``: the KL penalty's share of the reward, summed over each
    response and averaged over responses, ``-kl_coef * mean_b sum_t KL_bt``.

    Args:
        mean_sequence_kl: ``mean_b sum_t KL_bt``, the mean per-response KL (``objective/kl``).
        kl_coef: the coefficient the rewards were penalised with, ``>= 0``.
    """
    _check_non_negative("kl_coef", kl_coef)
    return -float(kl_coef) * float(mean_sequence_kl)


def kl_penalized_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "kl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * kl`` on every response token, plus the score at the last one.

    As in TRL's ``PPOTrainer.compute_rewards``: the sequence-level score of each response is
    added at its last response token, i.e. the last index where ``mask`` is nonzero (this
    also works when the mask is not contiguous from index 0).

    Args:
        scores: ``(batch,)`` reward-model score of each response.
        logprobs: ``(batch, response_len)`` log-probs of the generated tokens under the policy.
        ref_logprobs: ``(batch, response_len)`` the same under the frozen reference model.
        mask: ``(batch, response_len)``; every row needs at least one nonzero entry.
        kl_coef: KL penalty coefficient (e.g. ``AdaptiveKLController.value``), ``>= 0``.
        kl_estimator: ``"kl"`` (``logp - ref``), ``"abs"`` (``|logp - ref|``),
            ``"mse"`` (``0.5 * (logp - ref)**2``) or ``"k3"`` (:func:`per_token_kl`).
            ``"full"`` is not supported here.

    Returns:
        ``(rewards, kl)``, both ``(batch, response_len)`` and 0 where ``mask`` is 0
        (``kl`` is :func:`response_kl`).
    """
    if tuple(scores.shape) != (logprobs.shape[0],) or logprobs.dim() != 2:
        raise ValueError(
            f"scores must have shape (batch,) = ({logprobs.shape[0]},) for logprobs (batch, response_len), "
            f"got {tuple(scores.shape)} and {tuple(logprobs.shape)}"
        )
    _check_non_negative("kl_coef", kl_coef)
    kl = response_kl(logprobs, ref_logprobs, mask, kl_estimator)
    rewards = -kl_coef * kl

    # Last nonzero mask index per row: the largest position once masked positions are set to -1.
    bool_mask = _bool_mask(mask, logprobs, "logprobs")
    positions = torch.arange(logprobs.shape[-1], device=logprobs.device)
    last_index = torch.where(bool_mask, positions, -1).argmax(dim=-1, keepdim=True)
    rewards = rewards.scatter_add(-1, last_index, scores.to(rewards.dtype).unsqueeze(-1))
    return rewards, kl


# ------------------------------------------------------------------------ advantages


def gae(
    values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438), not whitened.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    computed right to left as in TRL's ``compute_advantages``. Positions where ``mask`` is
    0 count as absent: their value and reward are taken as 0, so the bootstrap value after
    the last response token is 0 (the episode ends at EOS). For right-padded masks this is
    exact; an interior 0 would act as a zero-reward, zero-value step (same as TRL).

    Args:
        values: ``(batch, response_len)`` value-head predictions at rollout time.
        rewards: ``(batch, response_len)`` per-token rewards, e.g. from :func:`kl_penalized_rewards`.
        mask: ``(batch, response_len)``.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``(batch, response_len)``, detached, 0 where ``mask``
        is 0, with ``returns = advantages + values`` on response tokens.
    """
    _same_shape(values=values, rewards=rewards)
    if values.dim() != 2:
        raise ValueError(f"values must be (batch, response_len), got shape {tuple(values.shape)}")
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    bool_mask = _bool_mask(mask, values, "values")
    with torch.no_grad():
        values = _zero_masked(values.detach(), bool_mask)
        rewards = _zero_masked(rewards.detach().to(values.dtype), bool_mask)
        response_len = values.shape[-1]
        advantages = torch.zeros_like(values)
        next_advantage = torch.zeros_like(values[:, 0])
        next_value = torch.zeros_like(values[:, 0])
        for t in reversed(range(response_len)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[:, t] = next_advantage
            next_value = values[:, t]
        returns = advantages + values
        return _zero_masked(advantages, bool_mask), _zero_masked(returns, bool_mask)


# ---------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    *,
    aggregation: str = "token",
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate objective (Schulman et al. 2017), as a loss to minimise.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``pg_loss = aggregate(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))``, aggregated over
    tokens as :func:`aggregate_tokens` says (``"token"``, the default, is TRL's masked mean).

    Args:
        logprobs: ``(batch, response_len)`` current policy log-probs (carries gradient).
        old_logprobs: ``(batch, response_len)`` log-probs at rollout time (treated as constant).
        advantages: ``(batch, response_len)`` (treated as constant; usually whitened).
        mask: ``(batch, response_len)``.
        cliprange: ``c`` above, e.g. 0.2.
        aggregation: ``"token"`` or ``"sequence"`` (:func:`aggregate_tokens`).
        check: test that ``mask`` selects something (see :func:`masked_mean`).

    Returns:
        ``(pg_loss, clipfrac, approx_kl)``, scalars. ``clipfrac`` is the fraction of response
        tokens where the clipped term is the larger (active) one. ``approx_kl`` is TRL's
        ``0.5 * masked_mean((logprobs - old_logprobs)**2)`` (the k2 estimator of
        http://joschu.net/blog/kl-approx.html). Both are detached.
    """
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    _check_non_negative("cliprange", cliprange)
    bool_mask = _bool_mask(mask, logprobs, "logprobs")
    log_ratio = _zero_masked(logprobs, bool_mask) - _zero_masked(old_logprobs.detach(), bool_mask)
    advantages = _zero_masked(advantages.detach(), bool_mask)

    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = aggregate_tokens(torch.maximum(unclipped, clipped), bool_mask, aggregation, check=check)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), bool_mask, check=False)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), bool_mask, check=False)
    return pg_loss, clipfrac, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    *,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (TRL / OpenAI baselines PPO2).

    ``v_clip = old_values + clamp(values - old_values, -c, c)``;
    ``vf_loss = 0.5 * masked_mean(max((values - returns)**2, (v_clip - returns)**2))``.

    Args:
        values: ``(batch, response_len)`` current value predictions (carries gradient).
        old_values: ``(batch, response_len)`` value predictions at rollout time (constant).
        returns: ``(batch, response_len)`` targets from :func:`gae` (constant).
        mask: ``(batch, response_len)``.
        cliprange_value: ``c`` above, e.g. 0.2.
        check: test that ``mask`` selects something (see :func:`masked_mean`).

    Returns:
        ``(vf_loss, vf_clipfrac)``, scalars; ``vf_clipfrac`` (detached) is the fraction of
        response tokens where the clipped error is strictly larger than the unclipped one.
    """
    _same_shape(values=values, old_values=old_values, returns=returns)
    _check_non_negative("cliprange_value", cliprange_value)
    bool_mask = _bool_mask(mask, values, "values")
    values = _zero_masked(values, bool_mask)
    old_values = _zero_masked(old_values.detach(), bool_mask)
    returns = _zero_masked(returns.detach(), bool_mask)

    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (values_clipped - returns).square()
    vf_loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), bool_mask, check=check)
    with torch.no_grad():
        vf_clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), bool_mask, check=False)
    return vf_loss, vf_clipfrac


def masked_ratio_mean(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, *,
                      check: bool = True) -> torch.Tensor:
    """Mean importance ratio ``exp(logprobs - old_logprobs)`` over response tokens.

    Used for TRL's guard that skips a minibatch whose mean ratio exceeds
    ``ratio_threshold`` (10 by default). Shapes: ``(batch, response_len)`` in, detached
    scalar out.
    """
    _same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    bool_mask = _bool_mask(mask, logprobs, "logprobs")
    with torch.no_grad():
        log_ratio = _zero_masked(logprobs, bool_mask) - _zero_masked(old_logprobs, bool_mask)
        return masked_mean(torch.exp(log_ratio), bool_mask, check=check)


# ---------------------------------------------------------------------- controllers


def _as_finite_float(name: str, value) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}; skip the KL controller update for this batch")
    return number


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from
    Human Preferences", arXiv:1909.08593, sec. 2.2), as implemented in TRL:

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.

    Attributes:
        value: current KL coefficient (python float).
        target: KL (nats per sequence, as measured by the caller) to steer towards.
        horizon: larger = slower adaptation.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        _check_non_negative("init_kl_coef", init_kl_coef)
        if not float(target) > 0:
            raise ValueError(f"target must be > 0, got {target}")
        if not float(horizon) > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` towards keeping ``current_kl`` at ``target``.

        Args:
            current_kl: observed KL (float or 0-dim tensor), must be finite.
            n_steps: number of samples (TRL: the batch size) since the last update.
        """
        current = _as_finite_float("current_kl", current_kl)
        proportional_error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Everything needed to resume: ``{"value", "target", "horizon"}``."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` output (exact round trip)."""
        missing = {"value", "target", "horizon"} - set(state)
        if missing:
            raise ValueError(
                f"AdaptiveKLController state is missing {sorted(missing)}; pass the dict from state_dict()"
            )
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        _check_non_negative("kl_coef", kl_coef)
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept for interface compatibility)."""

    def state_dict(self) -> dict[str, float]:
        """``{"value"}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` output."""
        if "value" not in state:
            raise ValueError("FixedKLController state is missing 'value'; pass the dict from state_dict()")
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


# ------------------------------------------------------------------ running moments


class RunningMoments:
    """Running mean and standard deviation of a stream of values (e.g. reward scores).

    Merges each batch with the parallel algorithm of Chan, Golub & LeVeque (1979), like
    TRL's ``RunningMoments`` (itself from stable-baselines3's ``RunningMeanStd``). State is
    kept in python floats (float64). ``std`` is the unbiased (n - 1) standard deviation of
    everything seen so far; before the first update ``mean=0``, ``var=1``, ``std=1``,
    ``count=0`` (TRL starts ``count`` at 1e-24, which gives the same numbers).

    Attributes:
        mean: running mean.
        var: running population (biased) variance, used for merging.
        std: running unbiased standard deviation.
        count: number of values seen.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Fold all entries of ``x`` (any shape) into the running moments.

        Returns:
            ``(batch_mean, batch_std)`` of ``x`` itself; ``batch_std`` is unbiased and is
            NaN when ``x`` has a single entry.

        Raises:
            ValueError: if ``x`` is empty or not finite, or if fewer than 2 values would
                have been seen in total (the std would be undefined).
        """
        values = torch.as_tensor(x).detach().to(torch.float64).flatten()
        batch_count = values.numel()
        if batch_count == 0:
            raise ValueError("RunningMoments.update got an empty tensor; pass at least one value")
        if not bool(torch.isfinite(values).all()):
            raise ValueError("RunningMoments.update got NaN/inf values; filter them out before updating")
        total_count = self.count + batch_count
        if total_count < 2:
            raise ValueError("RunningMoments needs at least 2 values in its first update to define a std")

        batch_var, batch_mean = torch.var_mean(values, unbiased=False)
        batch_mean, batch_var = float(batch_mean), float(batch_var)

        delta = batch_mean - self.mean
        # Chan et al.: M2 = M2_a + M2_b + delta^2 * n_a * n_b / n
        old_m2 = self.var * self.count + delta**2 * self.count * batch_count / total_count
        new_m2 = batch_var * batch_count
        self.mean += delta * batch_count / total_count
        self.var = (old_m2 + new_m2) / total_count
        self.std = math.sqrt(self.var * total_count / (total_count - 1))
        self.count = total_count

        batch_std = float("nan")
        if batch_count > 1:
            batch_std = math.sqrt(batch_var * batch_count / (batch_count - 1))
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        """``{"mean", "var", "std", "count"}`` for checkpointing."""
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore from :meth:`state_dict` output (exact round trip)."""
        missing = {"mean", "var", "std", "count"} - set(state)
        if missing:
            raise ValueError(
                f"RunningMoments state is missing {sorted(missing)}; pass the dict from state_dict()"
            )
        self.mean = float(state["mean"])
        self.var = float(state["var"])
        self.std = float(state["std"])
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"RunningMoments(mean={self.mean}, std={self.std}, count={self.count})"
