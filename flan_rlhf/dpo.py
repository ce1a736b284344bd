"""Direct preference optimisation: the DPO and IPO losses, their statistics, and online pairs (pure math).

No Lightning and no model code: these functions take per-response log-probabilities and rewards and
return tensors. :mod:`flan_rlhf.dpo_module` wires them to a policy, for pairs from a file and for
pairs from the policy's own samples.

* DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7)::

      L = -log sigmoid(beta * h),   h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

  with conservative DPO's label smoothing ``eps`` (the chosen label is wrong with probability
  ``eps``; Mitchell 2023, TRL's ``label_smoothing``): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
* IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17): ``L = (h - 1 / (2 * beta))**2``, a squared loss that regresses the log-ratio
  gap to a finite target instead of pushing it to infinity. As in TRL's DPOTrainer, IPO's log-probs
  are per-token means of each response (:func:`sequence_logps` with ``average=True``), so the target
  ``1 / (2 beta)`` does not depend on response length.
* The implicit rewards ``beta * (log pi(y|x) - log ref(y|x))`` and the statistics TRL logs from them
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
  ``logps/chosen``, ``logps/rejected``): :func:`preference_statistics`.
* Online pairs: from k sampled responses per prompt, the best and the worst by a reward
  (:func:`best_and_worst_of_groups`; a group whose rewards are all equal gives no pair), as in
  iterative / online DPO (Xu et al. 2023 "Some things are more CRINGE than others"; Guo et al. 2024
  "Direct Language Model Alignment from Online AI Feedback"; TRL's OnlineDPOTrainer with k = 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flan_rlhf.group_advantages import group_rewards

__all__ = [
    "LOSS_TYPES",
    "best_and_worst_of_groups",
    "check_loss_settings",
    "preference_loss",
    "preference_statistics",
    "sequence_logps",
    "weighted_mean",
]

#: The preference losses offered: ``sigmoid`` (DPO, with optional label smoothing) and ``ipo``.
LOSS_TYPES = ("sigmoid", "ipo")


def check_loss_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ``ValueError`` with one line naming the setting and its valid range, if any is invalid."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is unknown; use one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta is {beta!r}; it scales the log-ratio (the KL strength): use a positive number, e.g. 0.1")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is {label_smoothing!r}; it is the chance a label is flipped: use 0 <= it < 0.5")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only; set it to 0 with loss_type ipo")


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each response: the sum (or, with ``average``, the mean) of its token log-probs.

    Args:
        token_logps: ``(batch, response_len)`` log-prob of each response token.
        mask: ``(batch, response_len)``, 1 on response tokens (EOS included), 0 on padding.
        average: divide by the number of response tokens (IPO's length normalisation).
    Returns:
        ``(batch,)``.
    """
    mask = mask.to(token_logps.dtype)
    total = (token_logps * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0) if average else total


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO (``sigmoid``) or IPO loss, ``(n_pairs,)``; every input is ``(n_pairs,)``.

    ``h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)``;
    ``sigmoid``: ``-(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)`` (``eps`` =
    ``label_smoothing``); ``ipo``: ``(h - 1 / (2 beta))**2``. Gradients flow into the policy terms;
    the reference terms are constants (computed under ``no_grad``).
    """
    check_loss_settings(beta, loss_type, label_smoothing)
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def preference_statistics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """TRL's DPO statistics, 0-dim tensors (means over the pairs; no host reads).

    ``rewards/chosen`` is the mean of ``beta * (policy_chosen - reference_chosen)`` (the implicit
    reward), ``rewards/rejected`` likewise, ``rewards/margins`` the mean of their difference,
    ``rewards/accuracies`` the share of pairs whose chosen reward is strictly higher, and
    ``logps/chosen`` / ``logps/rejected`` the mean policy log-probs. Inputs ``(n_pairs,)``;
    ``weights`` ``(n_pairs,)`` (1 for a pair, 0 for a placeholder) makes the means :func:`weighted_mean`'s.
    """
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    weights = torch.ones_like(chosen) if weights is None else weights.to(chosen.dtype)
    return {
        "rewards/chosen": weighted_mean(chosen, weights),
        "rewards/rejected": weighted_mean(rejected, weights),
        "rewards/accuracies": weighted_mean((chosen > rejected).to(chosen.dtype), weights),
        "rewards/margins": weighted_mean(chosen - rejected, weights),
        "logps/chosen": weighted_mean(policy_chosen.detach(), weights),
        "logps/rejected": weighted_mean(policy_rejected.detach(), weights),
    }


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * x) / sum(w)`` of ``(n,)`` tensors, 0 when every weight is 0 (and then no gradient flows)."""
    return (values * weights).sum() / weights.sum().clamp(min=1e-8)


def best_and_worst_of_groups(rewards: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online preference pairs: in each group of ``k`` responses, the best is chosen, the worst rejected.

    Args:
        rewards: ``(n_groups * k,)``, rows ``g*k .. g*k+k-1`` answer prompt ``g`` (the rollout's layout).
        k: responses per prompt (>= 2).
    Returns:
        ``(chosen_rows, rejected_rows, has_pair)``, each ``(n_groups,)``: row indices into ``rewards``
        (int64) and whether group ``g`` makes a pair (bool): only when its best reward is strictly
        above its worst (a group of equal rewards says nothing about preference). Every group keeps
        a slot, so every process of a run holds the same number of pairs; a group without a pair is
        weighed 0. Among equal best (or worst) rewards the first row is taken.
    """
    grouped = group_rewards(rewards, k)  # (n_groups, k)
    offsets = torch.arange(grouped.shape[0], device=rewards.device) * k
    has_pair = grouped.max(dim=1).values > grouped.min(dim=1).values
    return offsets + grouped.argmax(dim=1), offsets + grouped.argmin(dim=1), has_pair
