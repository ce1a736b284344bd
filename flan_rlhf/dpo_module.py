"""DPO and IPO for encoder-decoders, from stored pairs and from the policy's own samples.

:class:`DPOModule` trains on whichever batches its data module gives:

* **stored pairs** (``prompt`` / ``chosen`` / ``rejected`` rows of a
  :class:`~flan_rlhf.reward_model.PreferenceDataModule`, TRL's column convention): no reward and no
  sampling; each batch is one step.
* **prompts** (a :class:`~flan_rlhf.data.PromptDataModule`) and a ``reward``: online / iterative
  DPO. Each iteration samples ``samples_per_prompt`` responses per prompt, ranks them by the
  reward (any reward or composite) and pairs each prompt's best with its worst
  (:func:`flan_rlhf.dpo.best_and_worst_of_groups`; no pair when all score the same).

Either way the pairs go through the same update: the reference's log-probs once per batch (LoRA
adapters off, under ``no_grad``; for sampled pairs the rollout's own reference pass), then
``ppo_epochs`` passes of minibatches of ``mini_batch_size`` pairs, each scored with one encoder
pass per prompt (:mod:`flan_rlhf.pair_logps`) and trained on the DPO or IPO loss
(:mod:`flan_rlhf.dpo`). Sampling, guards, checkpoints (exact resume), validation and exports are
:class:`~flan_rlhf.on_policy.OnPolicyModule`'s. Logged under TRL's names: ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
(training) and ``val/rewards/...`` on held-out stored pairs.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from flan_rlhf import dpo, ppo
from flan_rlhf.data.loading import DataConfigError
from flan_rlhf.critic_free import repeat_per_prompt
from flan_rlhf.group_advantages import group_reward_statistics, group_rewards
from flan_rlhf.on_policy import OnPolicyModule
from flan_rlhf.evaluation_step import EVAL_SEED_OFFSET
from flan_rlhf.pair_logps import PairTokens, pair_logps, pairs_from_rollout, tokenize_preference_pairs
from flan_rlhf.policy import PolicySpec
from flan_rlhf.rewards.base import Reward
from flan_rlhf.rollout import Rollout
from flan_rlhf.settings import DPOSettings, SettingsError
from flan_rlhf.update_tally import UpdateTally

__all__ = ["DPO_LOSS_KEYS", "DPOModule", "MissingRewardError"]

#: The minibatch statistics of a DPO update (TRL's DPOTrainer names, and the loss).
DPO_LOSS_KEYS = ("dpo/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected")


PROMPT_COLUMN_NEEDED = ("DPO on stored pairs needs each pair's prompt: set --data.init_args.prompt_column to the column "
                        "holding it, or --data.init_args.split_prompt true when chosen and rejected both start with it "
                        "(hh-rlhf)")


class MissingRewardError(SettingsError):
    """DPO was given prompts (to sample and rank) but no reward to rank them with; the message names the fix."""


class DPOModule(OnPolicyModule):
    """DPO / IPO of a seq2seq policy with LoRA, from stored preference pairs or from ranked samples.

    Args:
        policy: where the policy weights and tokenizer come from.
        reward: ranks the sampled responses when the data gives prompts (online DPO); ``null`` for
            stored pairs (it is then not needed, and validation on prompts has nothing to score with).
        dpo: DPO hyperparameters (``beta``, ``loss_type``, ``label_smoothing``, ...).
        **kwargs: the options every RL module takes (:class:`~flan_rlhf.on_policy.OnPolicyModule`):
            ``lora``, ``generation``, ``truncate_prompt_tokens``, ``export_dir``, ...
    """

    ALGORITHM = "DPO"
    SETTINGS_KEY = "dpo"
    WITH_VALUE_HEAD = False
    LOSS_KEYS = DPO_LOSS_KEYS
    PROGRESS_KEYS = ("env/reward_mean", "objective/kl", "dpo/loss", "rewards/accuracies")
    LEARNING_RATE_KEY = "dpo/learning_rate"
    settings: DPOSettings

    def __init__(self, policy: PolicySpec, reward: Reward | None = None, dpo: DPOSettings = DPOSettings(), **kwargs):
        super().__init__(policy=policy, reward=reward, settings=dpo, **kwargs)

    @property
    def _average_logps(self) -> bool:
        """IPO regresses per-token mean log-probs (TRL's choice), DPO uses their sums."""
        return self.settings.loss_type == "ipo"

    # ------------------------------------------------------------------ stored pairs
    def training_iteration(self, batch: dict[str, Any], optimizer) -> dict[str, float]:
        """Stored pairs (``chosen`` in the batch) or prompts to sample, rank and pair."""
        if "chosen" in batch:
            return self.stored_pairs_iteration(batch, optimizer)
        self._require_reward("sample and rank responses to the data's prompts")
        return super().training_iteration(batch, optimizer)

    def stored_pairs_iteration(self, batch: dict[str, Any], optimizer) -> dict[str, float]:
        """One step on a batch of stored pairs: the reference once, then the pair update."""
        t0 = time.perf_counter()
        pairs = self._tokenize_stored(batch)
        reference = pair_logps(self.actor, pairs, self._decoder_start, self._average_logps, reference=True)
        stats = self.pair_update(pairs, reference, optimizer, self.global_step, sampled=False)
        stats["dpo/pairs"] = float(pairs.n_pairs)
        stats["time/update_s"] = time.perf_counter() - t0
        return stats

    def _tokenize_stored(self, batch: dict[str, Any]) -> PairTokens:
        if "prompt" not in batch:
            raise DataConfigError(PROMPT_COLUMN_NEEDED)
        return tokenize_preference_pairs(self.tokenizer, batch["prompt"], batch["chosen"], batch["rejected"],
                                         self.truncate_prompt_tokens, self.settings.max_response_tokens, self.device)

    # ------------------------------------------------------------------ sampled pairs
    def rollout_rows(self, per_prompt: list) -> list:
        return repeat_per_prompt(per_prompt, self.settings.samples_per_prompt)

    def training_targets(self, rollout: Rollout, scores: torch.Tensor, kl_coef: float
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """Each prompt's best and worst response by the shaped ``scores`` ``(batch,)``, with their reference
        log-probs from the rollout's reference pass. Returns ``chosen_rows``, ``rejected_rows`` ``(n_pairs,)``
        and ``reference_chosen``, ``reference_rejected`` ``(n_pairs,)``; the per-token KL (k1) of the rollout."""
        k = self.settings.samples_per_prompt
        kl = ppo.response_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask, self.settings.kl_estimator)
        chosen_rows, rejected_rows, has_pair = dpo.best_and_worst_of_groups(scores.float(), k)
        reference = dpo.sequence_logps(rollout.ref_logprobs, rollout.mask, self._average_logps)
        spread = group_reward_statistics(group_rewards(scores.float(), k))
        targets = {"chosen_rows": chosen_rows, "rejected_rows": rejected_rows, "weights": has_pair.float(),
                   "reference_chosen": reference[chosen_rows], "reference_rejected": reference[rejected_rows]}
        stats = {"group/reward_std": spread["reward_std"].item(),
                 "group/frac_reward_zero_std": spread["frac_reward_zero_std"].item()}
        return targets, kl, stats

    def ppo_update(self, rollout: Rollout, targets: dict[str, torch.Tensor], optimizer, iteration: int) -> dict[str, float]:
        """The pair update on this iteration's sampled pairs (none when every group tied)."""
        pairs = pairs_from_rollout(rollout, targets["chosen_rows"], targets["rejected_rows"], targets["weights"])
        reference = targets["reference_chosen"], targets["reference_rejected"]
        stats = self.pair_update(pairs, reference, optimizer, iteration, sampled=True)
        stats["dpo/pairs"] = pairs.weights.sum().item()
        return stats

    # ------------------------------------------------------------------ the update both share
    def pair_update(self, pairs: PairTokens, reference: tuple[torch.Tensor, torch.Tensor], optimizer, iteration: int,
                    sampled: bool) -> dict[str, float]:
        """``ppo_epochs`` passes over ``pairs`` in minibatches of ``mini_batch_size`` pairs, each a DPO/IPO step.

        Args:
            pairs: ``n`` prompts with their chosen and rejected responses.
            reference: the reference's ``(chosen, rejected)`` log-probs, each ``(n,)`` (sums, or means for IPO).
            iteration: seeds the minibatch order (reproducible, and the same after a resume).
            sampled: the pairs are the policy's samples: its log-probs are taken under the distribution they
                were drawn from (``generation``'s temperature and EOS ban, as their reference log-probs);
                ``False`` (stored pairs): the model's own softmax.
        Returns:
            the mean statistics of the accepted minibatches (:data:`DPO_LOSS_KEYS`) and the guard counters.
            A non-finite loss skips its accumulation group's step, on the device (no host read per minibatch).
        """
        s = self.settings
        tally = UpdateTally(self.device, self.LOSS_KEYS)
        n = pairs.n_pairs  # the same on every process (tied groups keep a weight-0 slot), so all make the same passes
        orders = self.epoch_orders(n, iteration)
        lengths = pairs.lengths()
        never = torch.zeros((), dtype=torch.bool, device=self.device)
        optimizer.zero_grad()
        for order in orders:
            for start in range(0, n, s.mini_batch_size):
                rows = order[start:start + s.mini_batch_size]
                minibatch = pairs.select(rows, lengths)
                idx = torch.tensor(rows, device=self.device)
                policy = pair_logps(self.actor, minibatch, self._decoder_start, self._average_logps,
                                    sampling=self.generation if sampled else None,
                                    eos_token_id=self.tokenizer.eos_token_id)
                loss, stats = self._objective(policy, (reference[0][idx], reference[1][idx]), minibatch.weights)
                nonfinite, has_pairs = self._any_rank(torch.stack([~torch.isfinite(loss.detach()),
                                                                   minibatch.weights.sum() > 0]))
                skip = tally.add_minibatch(nonfinite, never, never, stats, empty=~has_pairs)
                self.backward_minibatch(loss, skip, optimizer, tally)
        if tally.group_size:
            self._optimizer_step(optimizer, tally)
        stats = tally.read()
        # the clipped-ratio guards do not exist here: no ratio threshold, no target KL
        stats.pop("guards/ratio_skipped"), stats.pop("guards/early_stopped")
        stats["dpo/updates"] = stats.pop("ppo/updates")
        return stats

    def _objective(self, policy: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                   weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted mean DPO/IPO loss of ``n`` pairs and its statistics (:data:`DPO_LOSS_KEYS`), from the
        policy's and the reference's ``(chosen, rejected)`` log-probs, each ``(n,)``; ``weights`` ``(n,)``."""
        s = self.settings
        losses = dpo.preference_loss(*policy, *reference, s.beta, s.loss_type, s.label_smoothing)
        # a placeholder's loss is 0 * its value: where, not a product, so a non-finite one cannot leak
        loss = dpo.weighted_mean(torch.where(weights > 0, losses, 0.0), weights)
        return loss, {"dpo/loss": loss, **dpo.preference_statistics(*policy, *reference, s.beta, weights)}

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Held-out stored pairs: the DPO statistics (``val/rewards/accuracies``, ...), and the monitors of
        responses sampled for their prompts; prompts: sampling and scoring."""
        if "chosen" in batch:
            return self._evaluate_pairs(batch, batch_idx, "val")
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As :meth:`validation_step`, logged under ``test/``."""
        if "chosen" in batch:
            return self._evaluate_pairs(batch, batch_idx, "test")
        return super().test_step(batch, batch_idx)

    def _evaluate_pairs(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        self._log_pair_statistics(batch, stage)
        if self.monitors:  # training on stored pairs samples nothing: sample the held-out prompts for the monitors
            self.seed_iteration(EVAL_SEED_OFFSET + batch_idx)
            rollout = self.rollout(batch["prompt"], self.eval_generation, with_reference=False, scored=False)
            self._log_monitors(rollout, None, stage)

    def _log_pair_statistics(self, batch: dict[str, Any], stage: str) -> None:
        """``<stage>/dpo/loss`` and ``<stage>/rewards/*``, ``<stage>/logps/*`` of a batch of stored pairs."""
        pairs = self._tokenize_stored(batch)
        with torch.no_grad():
            reference = pair_logps(self.actor, pairs, self._decoder_start, self._average_logps, reference=True)
            policy = pair_logps(self.actor, pairs, self._decoder_start, self._average_logps)
            _, stats = self._objective(policy, reference, pairs.weights)
        self.log_dict({f"{stage}/{key}": value for key, value in stats.items()}, on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=pairs.n_pairs, prog_bar=False)

    def score_rollout(self, prompts: list[str], texts: list[str], references: list[list[str]] | None = None):
        """The RL modules' scoring, refused in one line when there is no reward (stored-pair training)."""
        self._require_reward("score sampled responses")
        return super().score_rollout(prompts, texts, references)

    def check_datamodule(self, datamodule: Any) -> None:
        """Refuse, before any model loads, data this module cannot train on (the CLI calls this).

        Raises:
            MissingRewardError: prompts to sample from, but no reward to rank the samples.
            DataConfigError: stored pairs without a prompt column.
        """
        stored_pairs = hasattr(datamodule, "chosen_column")
        if not stored_pairs and datamodule is not None:
            self._require_reward("sample and rank responses to the data's prompts")
        if stored_pairs and getattr(datamodule, "prompt_column", None) is None and not getattr(datamodule, "split_prompt", False):
            raise DataConfigError(PROMPT_COLUMN_NEEDED)

    def _require_reward(self, purpose: str) -> None:
        if self.reward is None:
            raise MissingRewardError(
                f"DPO was given prompts, and needs a reward to {purpose}: set --model.init_args.reward (e.g. "
                "flan_rlhf.rewards.ProfanityReward), or give it stored pairs (flan_rlhf.reward_model.PreferenceDataModule)")
