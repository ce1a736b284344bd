"""Critic-free advantages from groups of k responses per prompt (no Lightning, no model code).

RLOO (Ahmadian et al. 2024, "Back to Basics", eq. 8; Kool et al. 2019) and GRPO (Shao et al.
2024, DeepSeekMath, section 4.1.2) sample k responses to each prompt and judge each response
against the others of its group instead of against a learned value. The batch holds the groups
contiguously: rows ``g * k .. g * k + k - 1`` are the k responses to prompt ``g``, so a
``(batch,)`` tensor reshapes to ``(n_groups, k)`` without copying. Every advantage is one number
per response; the losses spread it over the response's tokens (:func:`flan_rlhf.ppo.policy_loss`).
"""
from __future__ import annotations

import torch

__all__ = [
    "GRPO_STD_EPS",
    "check_group_size",
    "group_rewards",
    "group_reward_statistics",
    "grpo_advantages",
    "rloo_advantages",
]

#: Added to the group's standard deviation before dividing (TRL's GRPOTrainer uses 1e-4), so a
#: group whose rewards are all equal gets advantage 0, not 0 / 0.
GRPO_STD_EPS = 1e-4


def check_group_size(k: int, name: str = "k") -> int:
    """``k`` if a group of ``k`` responses can judge each of them against the others, else one line.

    Args:
        k: responses per prompt.
        name: what the caller calls ``k`` (the option a user sets), for the message.
    Raises:
        ValueError: ``k < 2``: with one response per prompt there is nothing to compare it with.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(
            f"{name} is {k!r}, but a group baseline needs at least 2 responses per prompt "
            f"(with 1 there is nothing to compare against): set {name} to 2 or more, e.g. 4"
        )
    return k


def _group_size(rewards: torch.Tensor) -> int:
    """``k`` of a ``(n_groups, k)`` rewards tensor, after :func:`check_group_size`."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (n_groups, k), got shape {tuple(rewards.shape)}")
    return check_group_size(rewards.shape[-1])


def group_rewards(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(batch,)`` rewards of contiguous groups as ``(batch // k, k)``, one row per prompt.

    Raises:
        ValueError: ``scores`` is not 1-D, or ``batch`` is not a multiple of ``k``.
    """
    check_group_size(k)
    if scores.dim() != 1:
        raise ValueError(f"scores must have shape (batch,), got {tuple(scores.shape)}")
    if scores.shape[0] % k:
        raise ValueError(
            f"{scores.shape[0]} responses do not split into groups of {k}: the batch must hold whole groups "
            "(prompts x samples per prompt)"
        )
    return scores.reshape(-1, k)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: each reward minus the mean of the other ``k - 1`` of its group.

    ``A_i = r_i - (sum_j r_j - r_i) / (k - 1) = k / (k - 1) * (r_i - mean_j r_j)``.
    A group of equal rewards gets 0 for every response; the advantages of a group sum to 0.

    Args:
        rewards: ``(n_groups, k)`` with ``k >= 2``.
    Returns:
        ``(n_groups, k)``, detached.
    """
    k = _group_size(rewards)
    rewards = rewards.detach()
    others_mean = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = GRPO_STD_EPS) -> torch.Tensor:
    """GRPO's group-normalised advantage: ``(r_i - mean) / (std + eps)`` within each group.

    ``std`` is the sample standard deviation (``k - 1`` in the denominator, as ``torch.std`` and
    TRL's GRPOTrainer). ``scale_by_std=False`` keeps ``r_i - mean`` (Dr. GRPO, Liu et al. 2025:
    dividing by the std weighs groups whose rewards barely differ as much as decisive ones). A
    group of equal rewards gets 0.

    Args:
        rewards: ``(n_groups, k)`` with ``k >= 2``.
        scale_by_std: divide by the group's std.
        eps: added to the std, ``> 0``.
    Returns:
        ``(n_groups, k)``, detached.
    """
    _group_size(rewards)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    rewards = rewards.detach()
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True) + eps)


def group_reward_statistics(rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """What GRPO users watch: the spread of rewards within groups.

    Args:
        rewards: ``(n_groups, k)``.
    Returns:
        scalar tensors (on the rewards' device, no host read): ``reward_std`` (the mean over
        groups of the within-group sample std) and ``frac_reward_zero_std`` (the share of groups
        whose rewards are all equal, which teach nothing: every advantage there is 0).
    """
    _group_size(rewards)
    rewards = rewards.detach()
    std = rewards.std(dim=-1)
    all_equal = (rewards == rewards[:, :1]).all(dim=-1)
    return {"reward_std": std.mean(), "frac_reward_zero_std": all_equal.to(rewards.dtype).mean()}
