"""validate / test / predict steps of the PPO module: sample, score, and measure quality.

Quality metrics are a :class:`flan_rlhf.eval.metrics.QualityMetrics` (a torchmetrics ``Metric``)
held by the module, so under DDP they are synchronised across processes when computed.
"""
from __future__ import annotations

from typing import Any

from flan_rlhf.eval.metrics import QualityMetrics
from flan_rlhf.ppo import sequence_kl
from flan_rlhf.rollout import Rollout, response_rows

EVAL_SEED_OFFSET = 1_000_000  # evaluation batches use seeds disjoint from training iterations


class EvaluationMixin:
    """Adds ``validation_step``, ``test_step`` and ``predict_step`` to the RL modules (:class:`~flan_rlhf.on_policy.OnPolicyModule`).

    Sampling uses ``eval_generation`` with a seed fixed per batch, so two evaluations of the
    same checkpoint see the same samples.
    """

    def _eval_metrics(self, stage: str) -> QualityMetrics:
        attr = f"_{stage}_text_metrics"
        if not hasattr(self, attr):
            # ROUGE-1/2/L(sum), BLEU, SacreBLEU; Lsum's sentence splitter ships with the package
            object.__setattr__(self, attr, QualityMetrics().to(self.device))  # not a submodule: not in checkpoints
        return getattr(self, attr)

    def _sample_and_score(self, batch: dict[str, Any], batch_idx: int):
        """Seeded sampling of one evaluation batch; returns the scored rollout and per-sequence KL ``(batch,)``."""
        self.seed_iteration(EVAL_SEED_OFFSET + batch_idx)
        rollout = self.rollout(batch["prompt"], self.eval_generation, references=batch.get("references"))
        kl = sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
        return rollout, kl

    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int, stage: str) -> None:
        rollout, kl = self._sample_and_score(batch, batch_idx)
        size = len(batch["prompt"])
        self.log(f"{stage}/reward_mean", rollout.scores.float().mean(), sync_dist=True, batch_size=size, prog_bar=True)
        self.log(f"{stage}/kl", kl.mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/response_len_mean", rollout.mask.sum(1).float().mean(), sync_dist=True, batch_size=size)
        for name, value in rollout.components.items():
            self.log(f"{stage}/reward/{name}_mean", value.float().mean(), sync_dist=True, batch_size=size)
        self._log_monitors(rollout, batch.get("references"), stage)
        references = batch.get("references")
        if references and all(len(r) > 0 for r in references):
            self._eval_metrics(stage).update(rollout.texts, references)

    def _monitor_scores(self, rollout: Rollout, references: list[list[str]] | None) -> dict[str, Any]:
        """Each monitor's score ``(batch,)`` of the rollout's responses, by name (``references``: one list per
        response, for a monitor that compares with them). Monitors are rewards that are watched, not trained
        on; empty when the module has none."""
        monitors = getattr(self, "monitors", ())
        if monitors:
            self._ensure_reward()
        return {monitor.name: monitor.score(rollout.prompts, rollout.texts, references)[0] for monitor in monitors}

    def _log_monitors(self, rollout: Rollout, references: list[list[str]] | None, stage: str) -> None:
        """``<stage>/monitor/<name>``: each monitor's mean score of the rollout's responses."""
        for name, scores in self._monitor_scores(rollout, references).items():
            self.log(f"{stage}/monitor/{name}", scores.float().mean(), sync_dist=True, batch_size=len(rollout.texts))

    def _log_text_metrics(self, stage: str) -> None:
        metrics = self._eval_metrics(stage)
        if metrics.update_count == 0:
            return
        for key, value in metrics.compute().items():  # rouge1/2/L/Lsum, bleu, sacrebleu (synced by the Metric)
            self.log(f"{stage}/{key}", value, sync_dist=False)
        metrics.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_text_metrics("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate_batch(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_text_metrics("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Rows ``{prompt_id, sample, prompt, response, references, reward, <component>..., kl, monitor/<name>...}``
        for the writer."""
        rollout, kl = self._sample_and_score(batch, batch_idx)
        monitors = {f"monitor/{name}": scores for name, scores in self._monitor_scores(rollout, batch.get("references")).items()}
        return response_rows(rollout, batch, {"reward": rollout.scores, **rollout.components, "kl": kl, **monitors})
