"""The PPO LightningModule: rollout -> score -> KL-penalised rewards -> GAE -> PPO epochs.

Rollout, guards, updates, logging, checkpoints and exports are :class:`~flan_rlhf.on_policy.OnPolicyModule`'s;
this file adds what is PPO's own: the value head, GAE advantages and the clipped value loss. The
math lives in :mod:`flan_rlhf.ppo`; this file only wires it.
"""
from __future__ import annotations

import torch

from flan_rlhf import ppo
from flan_rlhf.on_policy import OnPolicyModule, shards_weights
from flan_rlhf.policy import PolicySpec
from flan_rlhf.rewards.base import Reward
from flan_rlhf.rollout import Rollout
from flan_rlhf.settings import PPOSettings
from flan_rlhf.update_tally import LOSS_KEYS

__all__ = ["PPOModule", "shards_weights"]


class PPOModule(OnPolicyModule):
    """RLHF-PPO of a seq2seq policy with LoRA against a reward.

    Args:
        ppo: PPO hyperparameters (defaults: TRL 0.11's).
        policy: where the policy weights and tokenizer come from.
        reward: the reward source (``flan_rlhf.rewards.*``), higher is better.
        **kwargs: the options every RL module takes (:class:`~flan_rlhf.on_policy.OnPolicyModule`):
            ``lora``, ``generation``, ``truncate_prompt_tokens``, ...
    """

    ALGORITHM = "PPO"
    SETTINGS_KEY = "ppo"
    WITH_VALUE_HEAD = True
    LOSS_KEYS = LOSS_KEYS

    def __init__(self, policy: PolicySpec, reward: Reward, ppo: PPOSettings = PPOSettings(), **kwargs):
        super().__init__(policy=policy, reward=reward, settings=ppo, **kwargs)

    @property
    def kl_in_reward(self) -> bool:
        """PPO's rewards always carry the KL penalty (:func:`flan_rlhf.ppo.kl_penalized_rewards`)."""
        return True

    def training_targets(self, rollout: Rollout, scores: torch.Tensor, kl_coef: float
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """Per-token rewards (score at the last token, ``-kl_coef * KL`` on each), GAE advantages
        (whitened per batch unless switched off) and returns; all ``(batch, response_len)``."""
        s = self.settings
        rewards, kl = ppo.kl_penalized_rewards(scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask, kl_coef,
                                               s.kl_estimator)
        advantages, returns = ppo.gae(rollout.values, rewards, rollout.mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = ppo.masked_whiten(advantages, rollout.mask)
        stats = {
            "ppo/returns/mean": ppo.masked_mean(returns, rollout.mask).item(),
            "ppo/val/mean": ppo.masked_mean(rollout.values, rollout.mask).item(),
            "ppo/advantages/mean": ppo.masked_mean(advantages, rollout.mask).item(),
        }
        return {"advantages": advantages, "returns": returns}, kl, stats

    def minibatch_loss(self, mb: dict[str, torch.Tensor], logprobs: torch.Tensor, values: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` x clipped value loss (token means over the minibatch)."""
        s = self.settings
        pg_loss, clipfrac, approx_kl = ppo.policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                                       s.cliprange, check=False)
        vf_loss, vf_clipfrac = ppo.value_loss(values, mb["values"], mb["returns"], mb["mask"], s.cliprange_value,
                                              check=False)
        loss = pg_loss + s.vf_coef * vf_loss
        return loss, approx_kl, {
            "ppo/loss/policy": pg_loss, "ppo/loss/value": vf_loss, "ppo/loss/total": loss,
            "ppo/policy/approxkl": approx_kl, "ppo/policy/clipfrac": clipfrac, "ppo/val/clipfrac": vf_clipfrac,
        }
