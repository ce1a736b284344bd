"""Device-side bookkeeping of one PPO update: guard decisions, accumulation groups, loss sums.

:meth:`flan_rlhf.on_policy.OnPolicyModule.ppo_epoch` hands each minibatch's guard flags and statistics
to an :class:`UpdateTally`, which keeps them as tensors on the training device, so the minibatch
loop never waits for the device. :meth:`UpdateTally.read` converts everything once, at the end
of the update.
"""
from __future__ import annotations

import torch

#: PPO's minibatch statistics (the critic-free modules log their own keys, without ``value``).
LOSS_KEYS = ("ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/approxkl",
             "ppo/policy/clipfrac", "ppo/val/clipfrac", "ppo/policy/ratio_mean")


class UpdateTally:
    """Counters of one update, all 0-dim tensors on ``device``.

    Per minibatch, ``skip = stopped | nonfinite | too_far`` (``stopped``: an earlier minibatch's
    approximate KL passed ``ppo.target_kl``; it stays set). A minibatch that is not skipped is
    *accepted*; its statistics are summed. Minibatches are grouped ``gradient_accumulation_steps``
    at a time; a group's optimiser step is skipped when none of its minibatches was accepted or
    one had a non-finite loss (:meth:`end_group`). ``group_size`` is a host int (no read).
    """

    def __init__(self, device: torch.device | str, loss_keys: tuple[str, ...] = LOSS_KEYS):
        def zero(dtype=torch.float32):
            return torch.zeros((), dtype=dtype, device=device)

        self.sums = {key: zero() for key in loss_keys}
        self.accepted, self.applied = zero(), zero()
        self.skipped_nonfinite, self.skipped_ratio = zero(), zero()
        self.stopped = zero(torch.bool)
        self.group_accepted, self.group_nonfinite = zero(), zero(torch.bool)
        self.group_size = 0

    def add_minibatch(self, nonfinite: torch.Tensor, too_far: torch.Tensor, kl_exceeded: torch.Tensor,
                      stats: dict[str, torch.Tensor], empty: torch.Tensor | None = None) -> torch.Tensor:
        """Record one minibatch; returns its ``skip`` flag (0-dim bool tensor).

        Args:
            nonfinite, too_far, kl_exceeded: 0-dim bool tensors (already agreed across ranks).
            stats: 0-dim tensors keyed by the tally's ``loss_keys`` (NaN allowed when skipped).
            empty: 0-dim bool, the minibatch holds nothing to learn from on any rank (DPO: only tied
                groups); skipped so that a zero gradient does not step Adam on its moments alone.
        """
        live = ~self.stopped
        skip = self.stopped | nonfinite | too_far
        if empty is not None:
            skip = skip | empty
        accepted = ~skip
        self.skipped_nonfinite += (live & nonfinite).float()
        self.skipped_ratio += (live & too_far & ~nonfinite).float()
        self.accepted += accepted.float()
        self.group_accepted += accepted.float()
        self.group_nonfinite |= nonfinite & live
        self.stopped |= kl_exceeded & accepted
        for key in self.sums:
            # torch.where, not a product: a NaN statistic of a skipped minibatch must not reach the sum
            self.sums[key] += torch.where(accepted, stats[key].detach().float(), 0.0)
        self.group_size += 1
        return skip

    def end_group(self) -> torch.Tensor:
        """Close the accumulation group; returns ``skip_step`` (0-dim bool tensor) for the optimiser."""
        skip_step = self.group_nonfinite | (self.group_accepted == 0)
        self.applied += torch.where(skip_step, 0.0, self.group_accepted)
        self.group_accepted = torch.zeros_like(self.group_accepted)
        self.group_nonfinite = torch.zeros_like(self.group_nonfinite)
        self.group_size = 0
        return skip_step

    def read(self) -> dict[str, float]:
        """All statistics in one device read. Loss means are over accepted minibatches; an update
        with none logs no loss (a 0.0 would read as a perfect step)."""
        counters = [self.accepted, self.applied, self.skipped_ratio, self.skipped_nonfinite, self.stopped.float()]
        means = [total / self.accepted.clamp(min=1) for total in self.sums.values()]
        values = torch.stack(counters + means).tolist()
        accepted, applied, ratio, nonfinite, stopped = values[:5]
        stats = {
            "ppo/updates": applied,
            "guards/ratio_skipped": ratio,
            "guards/nonfinite_loss_skipped": nonfinite,
            "guards/early_stopped": stopped,
        }
        if accepted:
            stats.update(zip(self.sums, values[5:]))
        return stats
