"""Reward shaping users know from TRL/trlX: running mean/std normalisation, scaling, clipping.

Order (as TRL's ``use_score_norm`` / ``use_score_scaling`` / ``score_clip``): update the
running moments with the batch, normalise ``(r - mean) / std``, multiply by ``scale``, clamp
to ``[-clip, clip]``. The moments are :class:`flan_rlhf.ppo.RunningMoments` (Chan et al.
merge, unbiased std, the same as the PPO module uses), so both shape identically; their state
round-trips exactly through ``state_dict()``/``load_state_dict()``.
"""
from __future__ import annotations

import torch

from flan_rlhf.ppo import RunningMoments


class RewardShaper:
    """Normalise, scale and clip a batch of rewards.

    Args:
        normalize: subtract the running mean and divide by the running (unbiased) std, both
            updated with each batch first, so the first batch is normalised by its own moments.
        scale: multiply by this after normalising.
        clip: clamp finite values to ``[-clip, clip]`` last (``None``: no clipping).
        eps: added to the std to avoid division by zero.

    NaN/inf rewards stay NaN/inf in the output (the training loop's guard must still see and
    skip them) and are never merged into the moments. A lone first finite value is held back
    until a second arrives (one value has no std); until then ``mean 0, std 1``: a no-op.

    In DDP, pass the rewards gathered from all ranks (``all_gather``) so every rank keeps the
    same moments; save ``state_dict()`` in the checkpoint for an exact resume.
    """

    def __init__(
        self, normalize: bool = False, scale: float = 1.0, clip: float | None = None, eps: float = 1e-8
    ) -> None:
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.normalize = normalize
        self.scale = float(scale)
        self.clip = clip
        self.eps = eps
        self.moments = RunningMoments()
        self._pending: list[float] = []  # a lone first value, merged with the next batch

    def update(self, rewards: torch.Tensor) -> None:
        """Merge the finite entries of ``rewards`` (any shape) into the running moments."""
        values = rewards.detach().double().flatten().cpu()
        values = torch.cat([torch.tensor(self._pending, dtype=torch.float64), values[torch.isfinite(values)]])
        if values.numel() == 0:
            return
        if self.moments.count + values.numel() < 2:
            self._pending = values.tolist()
            return
        self.moments.update(values)
        self._pending = []

    def __call__(self, rewards: torch.Tensor, update: bool = True) -> torch.Tensor:
        """Shape rewards of any shape; returns a tensor of the same shape, dtype and device."""
        shaped = rewards
        if self.normalize:
            if update:
                self.update(rewards)
            shaped = (shaped - self.moments.mean) / (self.moments.std + self.eps)
        shaped = shaped * self.scale
        if self.clip is not None:
            shaped = torch.where(torch.isfinite(shaped), shaped.clamp(-self.clip, self.clip), shaped)
        return shaped.to(rewards.dtype)

    def state_dict(self) -> dict:
        """The running moments and any held-back value (the options are config, not state)."""
        return {"moments": self.moments.state_dict(), "pending": list(self._pending)}

    def load_state_dict(self, state: dict) -> None:
        self.moments.load_state_dict(state["moments"])
        self._pending = [float(value) for value in state.get("pending", [])]
