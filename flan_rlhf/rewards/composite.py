"""A weighted sum of named rewards, e.g. ``1.0 * non_toxicity + 0.5 * positivity``.

Each child's own (combined) reward is a component under the child's ``name``, so the training
loop logs every part on its own as ``env/reward/<name>_mean``. A composite needs references when
any child does (``profanity + 0.5 * ROUGE-L``), and passes them to the children that take them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from flan_rlhf.rewards.base import Reward, RewardOptionError


class CompositeReward(Reward):
    """Reward = ``sum_i weights[i] * rewards[i](prompts, responses)``, shape ``(batch,)``.

    Args:
        rewards: the child rewards; their ``name``s must be unique (they become component names).
        weights: one weight per child, same order (default: all 1.0). Weights are not normalised:
            ``[1.0, 0.5]`` means exactly 1.0 * first + 0.5 * second.
        name: the composite's own name (used in error messages and for the total).

    In YAML (LightningCLI / ``flan-rlhf score --reward file.yaml``)::

        class_path: flan_rlhf.rewards.CompositeReward
        init_args:
          rewards:
            - class_path: flan_rlhf.rewards.ProfanityReward
            - class_path: flan_rlhf.rewards.VaderReward
          weights: [1.0, 0.5]

    Keeping the task quality while detoxifying (references from the data's ``reference_columns``)::

          rewards:
            - class_path: flan_rlhf.rewards.ProfanityReward
            - class_path: flan_rlhf.rewards.RougeReward     # ROUGE-L F against the row's references
          weights: [1.0, 0.5]
    """

    def __init__(
        self, rewards: list[Reward], weights: list[float] | None = None, name: str = "composite"
    ) -> None:
        rewards = list(rewards)
        if not rewards:
            raise RewardOptionError("CompositeReward needs at least one reward in `rewards`")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise RewardOptionError(
                f"CompositeReward got {len(weights)} weights for {len(rewards)} rewards: "
                "give one weight per reward"
            )
        names = [reward.name for reward in rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise RewardOptionError(
                f"CompositeReward children share the name(s) {duplicates}: give each a distinct `name`"
            )
        self.rewards = rewards
        self.weights = dict(zip(names, weights))
        self.name = name

    def setup(self, device: torch.device | str = "cpu") -> "CompositeReward":
        """Set up every child on ``device`` (each loads its model once)."""
        for reward in self.rewards:
            reward.setup(device)
        return self

    @property
    def needs_references(self) -> bool:  # type: ignore[override]
        """Whether any child compares responses with references."""
        return any(reward.needs_references for reward in self.rewards)

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   references: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
        """``{child.name: child reward}``, each validated to shape ``(batch,)``; ``references`` go to every child
        (those that do not need them ignore them)."""
        return {reward.name: reward.score(prompts, responses, references)[0] for reward in self.rewards}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i * components[name_i]``, shape ``(batch,)``."""
        weighted = [weight * components[name] for name, weight in self.weights.items()]
        return torch.stack(weighted, dim=0).sum(dim=0)
