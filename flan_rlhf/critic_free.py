"""RLOO and GRPO for encoder-decoders: k responses per prompt judged against each other, no critic.

Both sample ``samples_per_prompt`` (k) responses to every prompt of the batch, so the rollout holds
the groups contiguously (rows ``g*k .. g*k+k-1`` answer prompt ``g``, on the process that drew the
prompt), and give every response one advantage from its group's rewards
(:mod:`flan_rlhf.group_advantages`): RLOO the leave-one-out baseline (Ahmadian et al. 2024), GRPO
the group mean and std (Shao et al. 2024; without the std, Dr. GRPO). The KL to the reference
(LoRA adapters off) is either taken from the reward before the baseline (``kl_penalty: reward``)
or added to the loss (``kl_penalty: loss``, GRPO's k3 term). The update is
:class:`~flan_rlhf.on_policy.OnPolicyModule`'s clipped ratio over ``ppo_epochs`` passes
(1 = on-policy REINFORCE).
"""
from __future__ import annotations

import torch

from flan_rlhf import group_advantages, ppo
from flan_rlhf.on_policy import OnPolicyModule
from flan_rlhf.policy import PolicySpec
from flan_rlhf.rewards.base import Reward
from flan_rlhf.rollout import Rollout
from flan_rlhf.settings import GroupSettings, GRPOSettings, RLOOSettings

__all__ = ["CriticFreeModule", "GRPOModule", "RLOOModule", "repeat_per_prompt"]

#: The minibatch statistics of a critic-free update (PPO's names; no value loss, a KL loss instead).
CRITIC_FREE_LOSS_KEYS = ("ppo/loss/policy", "ppo/loss/kl", "ppo/loss/total", "ppo/policy/approxkl",
                         "ppo/policy/clipfrac", "ppo/policy/ratio_mean")


def repeat_per_prompt(per_prompt: list, k: int) -> list:
    """Each entry ``k`` times in a row: ``[p0, p0, .., p1, p1, ..]`` (``len(per_prompt) * k`` rows), so a
    prompt's references follow each of its ``k`` responses (the rollout layout of every group method)."""
    return [entry for entry in per_prompt for _ in range(k)]


class CriticFreeModule(OnPolicyModule):
    """The shared part of RLOO and GRPO; a subclass defines :meth:`group_advantages`."""

    WITH_VALUE_HEAD = False
    LOSS_KEYS = CRITIC_FREE_LOSS_KEYS
    settings: GroupSettings

    def rollout_rows(self, per_prompt: list) -> list:
        return repeat_per_prompt(per_prompt, self.settings.samples_per_prompt)

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(n_groups, k)`` rewards -> ``(n_groups, k)`` advantages."""
        raise NotImplementedError

    @property
    def kl_in_reward(self) -> bool:
        """Whether each response's reward carries ``-beta * KL`` (``kl_penalty: reward``)."""
        return self.settings.kl_penalty == "reward"

    def training_targets(self, rollout: Rollout, scores: torch.Tensor, kl_coef: float
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """One advantage per response from its group's rewards, spread over its tokens.

        The reward of a response is its shaped score, minus ``kl_coef * sum_t KL_t`` when
        ``kl_penalty`` is ``reward``. Returns ``advantages`` ``(batch, response_len)`` (each
        row's advantage on its response tokens, 0 after them) and the per-token KL estimate.
        """
        s = self.settings
        kl = ppo.response_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask, s.kl_estimator)
        rewards = scores.float()
        if s.kl_penalty == "reward":
            rewards = rewards - kl_coef * kl.sum(dim=1)
        grouped = group_advantages.group_rewards(rewards, s.samples_per_prompt)
        advantages = self.group_advantages(grouped).reshape(-1)
        spread = group_advantages.group_reward_statistics(grouped)
        stats = {
            "group/reward_std": spread["reward_std"].item(),
            "group/frac_reward_zero_std": spread["frac_reward_zero_std"].item(),
            "ppo/advantages/mean": advantages.mean().item(),
        }
        per_token = advantages[:, None] * rollout.mask.to(advantages.dtype)
        return {"advantages": per_token}, kl, stats

    def minibatch_loss(self, mb: dict[str, torch.Tensor], logprobs: torch.Tensor, values: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss, plus ``beta * KL`` to the reference when ``kl_penalty`` is ``loss``;
        both aggregated over tokens by ``loss_aggregation``."""
        s = self.settings
        pg_loss, clipfrac, approx_kl = ppo.policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                                       s.cliprange, check=False, aggregation=s.loss_aggregation)
        if s.kl_penalty == "loss":
            kl = ppo.response_kl(logprobs, mb["ref_logprobs"], mb["mask"], s.kl_estimator, check=False)
            kl_loss = ppo.aggregate_tokens(kl, mb["mask"], s.loss_aggregation, check=False)
            loss = pg_loss + self.kl_controller.value * kl_loss
        else:
            kl_loss = torch.zeros_like(pg_loss)
            loss = pg_loss
        return loss, approx_kl, {
            "ppo/loss/policy": pg_loss, "ppo/loss/kl": kl_loss, "ppo/loss/total": loss,
            "ppo/policy/approxkl": approx_kl, "ppo/policy/clipfrac": clipfrac,
        }


class RLOOModule(CriticFreeModule):
    """REINFORCE leave-one-out (RLOO) of a seq2seq policy with LoRA against a reward.

    Args:
        rloo: RLOO hyperparameters (k responses per prompt, KL placement, loss aggregation, ...).
        policy: where the policy weights and tokenizer come from.
        reward: the reward source (``flan_rlhf.rewards.*``), higher is better.
        **kwargs: the options every RL module takes (:class:`~flan_rlhf.on_policy.OnPolicyModule`):
            ``lora``, ``generation``, ``truncate_prompt_tokens``, ...
    """

    ALGORITHM = "RLOO"
    SETTINGS_KEY = "rloo"

    def __init__(self, policy: PolicySpec, reward: Reward, rloo: RLOOSettings = RLOOSettings(), **kwargs):
        super().__init__(policy=policy, reward=reward, settings=rloo, **kwargs)

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return group_advantages.rloo_advantages(rewards)


class GRPOModule(CriticFreeModule):
    """Group relative policy optimisation (GRPO) of a seq2seq policy with LoRA against a reward.

    Args:
        grpo: GRPO hyperparameters (k responses per prompt, std scaling, KL placement, ...).
        policy: where the policy weights and tokenizer come from.
        reward: the reward source (``flan_rlhf.rewards.*``), higher is better.
        **kwargs: the options every RL module takes (:class:`~flan_rlhf.on_policy.OnPolicyModule`):
            ``lora``, ``generation``, ``truncate_prompt_tokens``, ...
    """

    ALGORITHM = "GRPO"
    SETTINGS_KEY = "grpo"

    def __init__(self, policy: PolicySpec, reward: Reward, grpo: GRPOSettings = GRPOSettings(), **kwargs):
        super().__init__(policy=policy, reward=reward, settings=grpo, **kwargs)

    def group_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return group_advantages.grpo_advantages(rewards, scale_by_std=self.settings.scale_rewards)
