"""What every on-policy RL module shares: rollout -> score -> guards -> advantages -> clipped updates.

:class:`OnPolicyModule` samples, scores, guards, keeps the KL controller, runs ``ppo_epochs``
passes of clipped-ratio minibatch updates, logs, checkpoints (exact resume) and exports. A
subclass says only what differs between algorithms: how prompts (and their references) become
rollout rows (:meth:`~OnPolicyModule.rollout_rows`), the per-token training targets of each row
(:meth:`~OnPolicyModule.training_targets`) and a minibatch's loss
(:meth:`~OnPolicyModule.minibatch_loss`). PPO (:mod:`flan_rlhf.module`) and RLOO / GRPO
(:mod:`flan_rlhf.critic_free`) are such subclasses.

One ``training_step`` is one iteration (one rollout batch and all its epochs of minibatch
updates), and ``trainer.global_step`` counts iterations (see :mod:`flan_rlhf.step_counting`).
The math lives in :mod:`flan_rlhf.ppo` and :mod:`flan_rlhf.group_advantages`.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
import torch

from flan_rlhf import ppo
from flan_rlhf.checkpointing import CheckpointError, capture_rng_states, restore_rng_states, state_dict_mismatch
from flan_rlhf.reward_shaping import RewardShaper
from flan_rlhf.evaluation_step import EvaluationMixin
from flan_rlhf.guards import NonFiniteGuard
from flan_rlhf.optim import adamw, lr_schedule, step_unless
from flan_rlhf.model_card import reward_description
from flan_rlhf.output_dirs import GuardedExportMixin
from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec, PromptLimitOfPolicy, load_policy_model
from flan_rlhf.logger_outputs import log_histograms, log_samples, takes_histograms
from flan_rlhf.rewards.base import Reward, check_monitors
from flan_rlhf.rollout import Rollout, collect_experience, response_mask, sampling_logits, shift_right, tokenize_prompts
from flan_rlhf.sharding import full_state_dict, gathered_weights, is_sharded, load_full_state_dict, shard_actor
from flan_rlhf.settings import GenerationSettings, UpdateSettings, check_generation_settings, check_update_settings
from flan_rlhf.step_counting import count_as_one_step
from flan_rlhf.update_tally import UpdateTally
from flan_rlhf.t5_fused import set_fused_kernels
from flan_rlhf.tokens import text_within_limit

log = logging.getLogger(__name__)


class OnPolicyModule(GuardedExportMixin, EvaluationMixin, PromptLimitOfPolicy, L.LightningModule):
    """On-policy RL of a seq2seq policy with LoRA against a reward; subclasses choose the algorithm.

    Args:
        policy: where the policy weights and tokenizer come from.
        reward: the reward source (``flan_rlhf.rewards.*``), higher is better.
        lora: LoRA settings; ``null`` for full fine-tuning (a frozen copy is the reference).
        generation: rollout sampling settings: sampling, ``temperature`` and ``min_new_tokens`` only (what
            biases the KL or the ratio, such as top-k or beam search, is refused with its reason).
        settings: the algorithm's hyperparameters (a subclass passes its own group, e.g. ``ppo``).
        truncate_prompt_tokens: the model's prompt cap in tokens (``</s>`` included). The data module
            cuts the inserted text of a longer prompt to fit (template kept, counted in its data line);
            a prompt that still arrives longer is cut at its end here, counted in
            ``data/truncated_prompts`` and warned about.
        gradient_checkpointing: recompute activations in backward to save memory.
        warmup_steps: linear learning-rate warm-up, in iterations.
        sampling_seed: base of the per-iteration sampling seed (``seed``, iteration, rank), which makes
            every iteration reproducible and a resumed run identical to an uninterrupted one.
        log_samples_every_n_steps: every N iterations, a table of (prompt, response, reward, components,
            kl) rows goes to every logger in its own form (:mod:`flan_rlhf.logger_outputs`); 0 disables.
        num_log_samples: rows in that table.
        log_histograms_every_n_steps: every N iterations, histograms of the rollout's rewards
            (``env/reward_dist``), per-response KL (``objective/kl_dist``), response lengths
            (``tokens/responses_dist``) and per-token policy ratios of the update (``ppo/policy/ratio``),
            TRL's tags, go to the loggers that draw them (TensorBoard, W&B); 0 disables.
        monitors: rewards that are not trained on, scored on every validation/test sample and logged as
            ``val/monitor/<name>`` (``test/...``), so reward hacking shows during training (e.g. VADER
            sentiment or an insult-word share beside a profanity reward). Names must differ from the
            training reward's and its components'.
        export_dir: at the end of ``fit``, save the LoRA adapter (peft format), value head (PPO)
            and tokenizer here (rank 0). ``null`` disables. A folder that already holds anything but
            an earlier export of this same run is refused before training starts
            (:mod:`flan_rlhf.output_dirs`).
        overwrite_export_dir: allow replacing an earlier flan-rlhf export of another run in
            ``export_dir``. Never replaces a folder holding files flan-rlhf did not write.
        eval_generation: decoding settings for validate/test/predict and ``compare``: any of
            :class:`~flan_rlhf.settings.GenerationSettings` (greedy, beam search, top-k/top-p, repetition
            penalty, n-gram blocking, length penalty); ``null`` reuses ``generation``.
        fused_kernels: T5-family policies sample, score and train through
            :mod:`flan_rlhf.t5_fused` (the same arithmetic as Hugging Face's forward in fewer ops;
            equality tested). ``false`` runs the model's own ``forward`` everywhere. Always off
            under FSDP / DeepSpeed / ModelParallel strategies.
    """

    # settings the stored weights depend on: resuming with other values stops (flan_rlhf.resume_settings)
    FIXED_BY_CHECKPOINT = ("policy.t5_config", "lora.r", "lora.alpha", "lora.target_modules")
    #: the algorithm's name in exports and model cards, and its settings' key (``--model.<key>.*``)
    ALGORITHM = "on-policy RL"
    SETTINGS_KEY = "settings"
    #: whether the actor has a value head (a critic)
    WITH_VALUE_HEAD = False
    #: the minibatch statistics :meth:`minibatch_loss` returns, summed by :class:`UpdateTally`
    LOSS_KEYS: tuple[str, ...] = ()
    #: the statistics an iteration shows in the progress bar (when it logs them)
    PROGRESS_KEYS: tuple[str, ...] = ("env/reward_mean", "objective/kl")
    #: the tag of the learning rate, logged every iteration
    LEARNING_RATE_KEY = "ppo/learning_rate"

    def __init__(
        self,
        policy: PolicySpec,
        reward: Reward,
        settings: UpdateSettings,
        lora: LoraSettings | None = LoraSettings(),
        generation: GenerationSettings = GenerationSettings(),
        truncate_prompt_tokens: int = 512,
        gradient_checkpointing: bool = False,
        warmup_steps: int = 0,
        sampling_seed: int = 0,
        log_samples_every_n_steps: int = 10,
        num_log_samples: int = 4,
        log_histograms_every_n_steps: int = 10,
        monitors: list[Reward] | None = None,
        export_dir: str | None = None,
        overwrite_export_dir: bool = False,
        eval_generation: GenerationSettings | None = None,
        fused_kernels: bool = True,
    ):
        super().__init__()
        # the subclass's arguments too (Lightning collects every __init__ frame), without this copy of them
        self.save_hyperparameters(ignore=["reward", "settings", "monitors"])
        self.automatic_optimization = False
        self.policy_spec = policy
        self.reward = reward
        self.monitors = check_monitors(reward, monitors)
        self.lora = lora
        self.generation = check_generation_settings(generation, "generation.", training=True)
        self.eval_generation = check_generation_settings(eval_generation or generation, "eval_generation.",
                                                         training=False)
        self.settings = check_update_settings(settings)
        self.truncate_prompt_tokens = truncate_prompt_tokens
        self.sampling_seed = sampling_seed
        self.kl_controller = _make_kl_controller(self.settings)
        self.shaper = RewardShaper(self.settings.score_normalize, self.settings.score_scale, self.settings.score_clip)
        self.guard = NonFiniteGuard(self.settings.max_nonfinite_in_a_row)
        self.actor: ActorCritic | None = None
        self.tokenizer = None
        self._reward_ready = False
        self._resumed_from: str | None = None
        self._warned_prompt_cut = False
        self._warned_no_table: set[str] = set()
        self._ratio_log: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (ratio, mask) per minibatch when due
        # LoRA checkpoints hold only what training changes; the frozen base is re-loaded.
        self.strict_loading = False

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the actor-critic once (Lightning calls this before restoring a checkpoint)."""
        if self.actor is not None:
            return
        model, self.tokenizer = load_policy_model(self.policy_spec, self.tokenizer)
        self.actor = ActorCritic(model, self.lora, self.hparams.gradient_checkpointing, self.WITH_VALUE_HEAD)
        # a weight read outside the wrapped forward is a shard under FSDP/DeepSpeed: their own forward then
        fused = self.hparams.fused_kernels and not (self._trainer is not None and shards_weights(self.trainer.strategy))
        for part in (self.actor.base_model, self.actor.frozen_reference):
            if part is not None:
                set_fused_kernels(part, fused)
        if self._device_mesh is not None:  # ModelParallelStrategy (FSDP2Strategy): FSDP2 over its data-parallel dimension
            if self._device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(f"ModelParallelStrategy with tensor_parallel_size {self._device_mesh['tensor_parallel'].size()}: "
                                 "flan-rlhf shards data parallel only - use strategy flan_rlhf.sharded_strategy.FSDP2Strategy "
                                 "(configs/fsdp.yaml)")
            shard_actor(self.actor, self._device_mesh["data_parallel"])

    def _ensure_reward(self) -> None:
        if not self._reward_ready:
            for reward in (self.reward, *self.monitors):
                if reward is not None:
                    reward.setup(self.device)
            self._reward_ready = True

    def configure_optimizers(self):
        params = [p for p in self.actor.parameters() if p.requires_grad]
        optimizer = adamw(params, self.settings.learning_rate, self.settings.weight_decay)
        scheduler = lr_schedule(optimizer, max(0, self.hparams.warmup_steps))  # stepped once per iteration
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ rollout
    def seed_iteration(self, iteration: int, salt: int = 0) -> int:
        """Seed the global RNGs from (seed, iteration, rank) so each iteration is reproducible."""
        rank = self.global_rank if self._trainer is not None else 0
        seed = (self.sampling_seed * 1_000_003 + iteration * 7_919 + rank * 104_729 + salt) % (2**31 - 1)
        torch.manual_seed(seed)
        return seed

    def rollout(
        self, prompts: list[str], settings: GenerationSettings, with_reference: bool = True, scored: bool = True,
        references: list[list[str]] | None = None,
    ) -> Rollout:
        """Sample responses for ``prompts``, evaluate them under policy, value head (if any) and reference, and score them.

        The policy's log-probs, values and entropy come from the sampling pass itself and only
        the reference needs a teacher-forced forward (:func:`flan_rlhf.rollout.collect_experience`).
        ``scored=False`` skips the reward (``Rollout.scores`` is then ``None``). ``references``
        (one list of reference texts per prompt) go to a reward that compares responses with them.
        """
        input_ids, attention_mask, prompt_cut = tokenize_prompts(
            self.tokenizer, prompts, self.truncate_prompt_tokens, self.device
        )
        if any(prompt_cut):
            prompts = self._note_prompts_cut(prompts, prompt_cut)
        # FSDP2Strategy(rollout_weights="gathered"): one all-gather per unit per rollout, not per layer per token
        gather = self._trainer is not None and getattr(self.trainer.strategy, "rollout_weights", "gathered") == "gathered"
        with gathered_weights(self.actor) if gather else nullcontext():
            responses, logprobs, values, ref_logprobs, entropy = collect_experience(
                self.actor, input_ids, attention_mask, settings, self.tokenizer, self._decoder_start, with_reference
            )
        mask = response_mask(responses, self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(responses * mask.long() + self.tokenizer.pad_token_id * (1 - mask.long()),
                                            skip_special_tokens=True)
        scores, components = self.score_rollout(list(prompts), texts, references) if scored else (None, {})
        return Rollout(input_ids, attention_mask, responses, mask, logprobs,
                       ref_logprobs if ref_logprobs is not None else torch.zeros_like(logprobs),
                       values, entropy, list(prompts), texts, prompt_cut, scores, components)

    def _note_prompts_cut(self, prompts: list[str], prompt_cut: list[bool]) -> list[str]:
        """The prompts as encoded (cut ones shortened to what the model keeps), after one warning per run.

        Prompts from :class:`~flan_rlhf.data.PromptDataModule` are cut on their inserted text
        before they get here; this is the safety net for prompts from elsewhere, and it takes the
        end of the prompt, template included.
        """
        if not self._warned_prompt_cut:
            self._warned_prompt_cut = True
            rank_zero_warn(
                f"{sum(prompt_cut)} of {len(prompts)} prompts in a batch are longer than "
                f"truncate_prompt_tokens={self.truncate_prompt_tokens} and lose their end (a template's tail "
                "such as 'Summary:' included); feed prompts through PromptDataModule, which cuts the inserted "
                "text instead, or raise --model.truncate_prompt_tokens (counted in data/truncated_prompts)"
            )
        return [text_within_limit(self.tokenizer, prompt, self.truncate_prompt_tokens) if cut else prompt
                for prompt, cut in zip(prompts, prompt_cut)]

    def score_rollout(self, prompts: list[str], texts: list[str], references: list[list[str]] | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Raw reward ``(batch,)`` on this device and each component ``(batch,)`` for decoded responses
        (``references``: one list per response, for a reward that needs them)."""
        self._ensure_reward()
        scores, components = self.reward.score(prompts, texts, references)
        return scores.to(self.device), components

    def shaped_scores(self, rollout: Rollout) -> torch.Tensor:
        """Scores after the no-EOS penalty and :class:`RewardShaper` (normalise, scale, clip); ``(batch,)``.

        The running moments are updated with the scores of all processes, so every rank
        normalises identically.
        """
        scores = rollout.scores.clone()
        if self.settings.no_eos_penalty is not None:
            has_eos = (rollout.responses == self.tokenizer.eos_token_id).any(dim=1)
            scores = torch.where(has_eos, scores, scores - self.settings.no_eos_penalty)
        if self.shaper.normalize:
            self.shaper.update(self.all_gather(scores).reshape(-1))
        return self.shaper(scores, update=False)

    @property
    def _decoder_start(self) -> int:
        config = self.actor.base_model.config
        start = getattr(config, "decoder_start_token_id", None)
        return self.tokenizer.pad_token_id if start is None else int(start)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        super().on_train_start()  # refuses an export folder that the end of fit would lose
        if self._resumed_from is not None:
            if self.global_rank == 0:  # one line, on stdout (a logging call too would print it twice)
                print(f"resumed from step {self.global_step} ({self._resumed_from})", flush=True)
            self._resumed_from = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        with count_as_one_step(optimizer):
            stats = self.training_iteration(batch, optimizer)
        scheduler.step()
        stats[self.LEARNING_RATE_KEY] = optimizer.param_groups[0]["lr"]
        shown = {key: stats.pop(key) for key in self.PROGRESS_KEYS if key in stats}
        size = len(batch["prompt"])
        self.log_dict(shown, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True, batch_size=size)
        self.log_dict(stats, on_step=True, on_epoch=False, prog_bar=False, sync_dist=True, batch_size=size)

    def training_iteration(self, batch: dict[str, Any], optimizer) -> dict[str, float]:
        """One iteration on one training batch (its optimiser steps); returns the statistics to log."""
        return self.ppo_iteration(batch["prompt"], optimizer, batch.get("references"))

    def ppo_iteration(self, prompts: list[str], optimizer, references: list[list[str]] | None = None) -> dict[str, float]:
        """One iteration on a batch of ``prompts`` (and their ``references``, one list per prompt, for a reward
        that needs them): rollout, guards, targets, update; returns the statistics to log."""
        s = self.settings
        iteration = self.global_step
        self.seed_iteration(iteration)
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout = self.rollout(self.rollout_rows(prompts), self.generation,
                                   references=None if references is None else self.rollout_rows(references))
        t_rollout = time.perf_counter() - t0
        raw = rollout.scores.float()
        stats: dict[str, float] = {
            "env/reward_mean": _finite_mean(raw),
            "env/reward_std": _finite_std(raw),
            "tokens/response_len_mean": rollout.mask.sum(1).float().mean().item(),
            "data/truncated_prompts": float(rollout.n_truncated),
            "objective/kl_coef": float(self.kl_controller.value),
        }
        for name, value in rollout.components.items():
            stats[f"env/reward/{name}_mean"] = _finite_mean(value.float())

        scores = self.shaped_scores(rollout)
        cause = self._nonfinite_cause(rollout, scores)
        stats["guards/nonfinite_skipped"] = float(self.guard.total_skipped)
        if cause is not None:
            self.guard.record_skip(cause)  # raises after max_nonfinite_in_a_row in a row
            stats["guards/nonfinite_skipped"] = float(self.guard.total_skipped)
            stats.update({"time/rollout_s": t_rollout, "time/update_s": 0.0})
            return stats
        self.guard.record_ok()

        kl_coef = float(self.kl_controller.value)
        targets, kl, target_stats = self.training_targets(rollout, scores, kl_coef)
        mean_kl = self._global_mean(kl.sum(dim=1))
        stats.update({
            "objective/kl": mean_kl,
            "objective/entropy": (rollout.entropy * rollout.mask).sum(1).mean().item(),
            **target_stats,
        })
        if self.kl_in_reward:
            stats["ppo/mean_non_score_reward"] = ppo.mean_non_score_reward(mean_kl, kl_coef)

        histograms_due = self._histograms_due(iteration)
        self._ratio_log = [] if histograms_due else None
        t1 = time.perf_counter()
        stats.update(self.ppo_update(rollout, targets, optimizer, iteration))
        stats["time/rollout_s"] = t_rollout
        stats["time/update_s"] = time.perf_counter() - t1

        self.kl_controller.update(mean_kl, len(rollout.prompts) * self.trainer.world_size if self._trainer
                                  else len(rollout.prompts))
        if s.kl_stop is not None and mean_kl > s.kl_stop:
            key = self.SETTINGS_KEY
            message = (f"stopping: rollout KL {mean_kl:.3f} exceeded {key}.kl_stop={s.kl_stop} at iteration {iteration} "
                       f"- lower {key}.learning_rate or raise {key}.init_kl_coef")
            log.error(message)
            print(message, flush=True)
            self.trainer.should_stop = True
        if histograms_due:
            self._log_rollout_histograms(rollout, kl, iteration)
        self._maybe_log_samples(rollout, iteration, kl)
        return stats

    # ------------------------------------------------------------------ what an algorithm defines
    @property
    def kl_in_reward(self) -> bool:
        """Whether the KL penalty is part of the reward (PPO, RLOO with ``kl_penalty: reward``): then
        ``ppo/mean_non_score_reward`` is logged."""
        return False

    def rollout_rows(self, per_prompt: list) -> list:
        """The rollout's rows from one entry per prompt (its text, its references): one row per prompt here;
        critic-free methods repeat each entry k times."""
        return list(per_prompt)

    def training_targets(self, rollout: Rollout, scores: torch.Tensor, kl_coef: float
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, float]]:
        """What the loss of each row needs besides the rollout, from the shaped ``scores`` ``(batch,)``.

        Returns:
            targets: ``(batch, response_len)`` tensors by name (e.g. ``advantages``), sliced per
                minibatch beside the rollout's own tensors and handed to :meth:`minibatch_loss`;
            kl: ``(batch, response_len)`` per-token KL estimate of the rollout (0 off the
                response), whose per-sequence sum is logged as ``objective/kl`` and drives the
                KL controller and ``kl_stop``;
            stats: extra scalars to log.
        """
        raise NotImplementedError

    def minibatch_loss(self, mb: dict[str, torch.Tensor], logprobs: torch.Tensor, values: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one minibatch, with no host reads.

        Args:
            mb: the minibatch (:func:`_minibatch`): rollout tensors and targets, ``(mb, len')``.
            logprobs: the current policy's log-probs of ``mb["responses"]``, ``(mb, len')``, with grad.
            values: the value head's output ``(mb, len')`` (``None`` without a value head).
        Returns:
            ``(loss, approx_kl, stats)``: the scalar to back-propagate, the approximate KL to the
            rollout policy (for ``target_kl``), and 0-dim statistics keyed by :attr:`LOSS_KEYS`
            except ``ppo/policy/ratio_mean`` (added by the caller).
        """
        raise NotImplementedError

    def ppo_update(self, rollout: Rollout, targets: dict[str, torch.Tensor], optimizer, iteration: int) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped-ratio minibatch updates over one rollout batch.

        The minibatch loop (:meth:`ppo_epoch`) reads nothing from the device: its guard decisions
        (non-finite loss, ratio threshold, target KL) stay tensors and skip an optimiser step on
        the device (:func:`flan_rlhf.optim.step_unless`). Everything the host needs is read here,
        once per iteration, plus one read per epoch when ``target_kl`` is set (to stop early).
        Decisions are OR-ed across processes, so every rank steps (or skips) alike.
        """
        s = self.settings
        batch_size = rollout.responses.shape[0]
        orders = self.epoch_orders(batch_size, iteration)
        # row lengths read once per iteration, so trimming a minibatch's padding needs no device read
        lengths = (rollout.attention_mask.sum(1).long().tolist(), rollout.mask.sum(1).long().tolist())
        ppo.check_token_ids(rollout.responses, self.actor.vocab_size)
        decoder_input_ids = shift_right(rollout.responses, self._decoder_start)
        tally = UpdateTally(self.device, self.LOSS_KEYS)
        optimizer.zero_grad()
        for order in orders:
            self.ppo_epoch(order, rollout, decoder_input_ids, targets, lengths, optimizer, tally)
            if s.target_kl is not None and bool(tally.stopped):  # one read per epoch, only with target_kl
                break
        if tally.group_size:
            self._optimizer_step(optimizer, tally)
        return tally.read()

    def ppo_epoch(self, order: list[int], rollout: Rollout, decoder_input_ids: torch.Tensor,
                  targets: dict[str, torch.Tensor], lengths: tuple[list[int], list[int]], optimizer,
                  tally: "UpdateTally") -> None:
        """One pass of minibatch updates over the rows in ``order``; no host reads (see :meth:`ppo_update`).

        A skipped minibatch still runs its backward, on a zero loss, so every rank makes the same
        passes and no branch needs a device value; its step is then skipped on the device.
        """
        s = self.settings
        prompt_lengths, response_lengths = lengths
        never = torch.zeros((), dtype=torch.bool, device=self.device)  # a guard that is switched off
        for start in range(0, len(order), s.mini_batch_size):
            rows = order[start:start + s.mini_batch_size]
            longest = (max(prompt_lengths[i] for i in rows), max(response_lengths[i] for i in rows))
            idx = torch.tensor(rows, device=self.device)
            mb = _minibatch(rollout, decoder_input_ids, targets, idx, longest)
            logits, vpred = self.actor(mb["input_ids"], mb["attention_mask"], mb["decoder_input_ids"])
            # No input checks in the loop (each reads the device): ppo_update checked the token ids and
            # training_targets that every row has a response token, so no minibatch mask is empty.
            scaled = sampling_logits(logits, self.generation.temperature, self.generation.min_new_tokens,
                                     self.tokenizer.eos_token_id)  # the distribution the rollout drew from
            logprobs = ppo.logprobs_from_logits(scaled, mb["responses"], check=False)
            loss, approx_kl, loss_stats = self.minibatch_loss(mb, logprobs, vpred)
            if self._ratio_log is not None:  # histograms due this iteration: kept on the device, read once after
                self._ratio_log.append((torch.exp(logprobs.detach() - mb["logprobs"]), mb["mask"]))
            ratio_mean = ppo.masked_ratio_mean(logprobs.detach(), mb["logprobs"], mb["mask"], check=False)
            nonfinite, too_far, kl_exceeded = self._any_rank(torch.stack([
                ~torch.isfinite(loss.detach()),
                ratio_mean > s.ratio_threshold if s.ratio_threshold is not None else never,
                approx_kl > s.target_kl if s.target_kl is not None else never,
            ]))
            skip = tally.add_minibatch(nonfinite, too_far, kl_exceeded, {**loss_stats, "ppo/policy/ratio_mean": ratio_mean})
            self.backward_minibatch(loss, skip, optimizer, tally)

    def epoch_orders(self, rows: int, iteration: int) -> list[list[int]]:
        """``ppo_epochs`` shuffles of ``range(rows)``, seeded by ``iteration`` (the same after a resume), as host
        lists: a CPU generator, every epoch's order in one conversion."""
        generator = torch.Generator().manual_seed(self.seed_iteration(iteration, salt=1))
        return torch.stack([torch.randperm(rows, generator=generator) for _ in range(self.settings.ppo_epochs)]).tolist()

    def backward_minibatch(self, loss: torch.Tensor, skip: torch.Tensor, optimizer, tally: "UpdateTally") -> None:
        """Back-propagate one minibatch's ``loss`` (a zero when ``skip``, so every rank makes the same passes),
        then step once the accumulation group is full; no host read."""
        # torch.where, not loss * 0: a skipped non-finite loss must not turn the zero into NaN
        self.manual_backward(torch.where(skip, torch.zeros_like(loss), loss) / self.settings.gradient_accumulation_steps)
        if tally.group_size == self.settings.gradient_accumulation_steps:
            self._optimizer_step(optimizer, tally)

    def _optimizer_step(self, optimizer, tally: "UpdateTally") -> None:
        """Clip and step unless every minibatch of the accumulation group was skipped or one was
        non-finite (its gradients are then NaN: the whole group is dropped, as AMP's GradScaler does)."""
        if self.settings.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.settings.max_grad_norm, gradient_clip_algorithm="norm")
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        step_unless(optimizer, tally.end_group(), scaler=scaler)
        optimizer.zero_grad()

    # ------------------------------------------------------------------ guards & sync
    def _nonfinite_cause(self, rollout: Rollout, scores: torch.Tensor) -> str | None:
        """Name the first non-finite input of the update, agreed across ranks; ``None`` if all finite."""
        checks = [
            (f"reward '{self.reward.name}' returned NaN/inf scores", scores),
            ("value head produced NaN/inf values", rollout.values),  # zeros without a value head
            ("policy log-probs are NaN/inf", rollout.logprobs),
            ("reference log-probs are NaN/inf", rollout.ref_logprobs),
        ]
        nonfinite = self._any_rank(torch.stack([~torch.isfinite(tensor).all() for _, tensor in checks])).tolist()
        return next((cause for (cause, _), bad in zip(checks, nonfinite) if bad), None)

    def _any_rank(self, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` (a bool tensor ``(n,)``) OR-ed over all processes, on the device (no host read)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags.float(), reduce_op="max") > 0
        return flags

    def _global_mean(self, values: torch.Tensor) -> float:
        """Mean of ``values`` over all processes' batches."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values.float().mean().item()
        return self.all_gather(values.float()).mean().item()

    # ------------------------------------------------------------------ logging
    def _maybe_log_samples(self, rollout: Rollout, iteration: int, kl: torch.Tensor) -> None:
        """Every ``log_samples_every_n_steps`` iterations (process 0): the first ``num_log_samples`` rows of
        the rollout, with their reward, its components (when there are several) and KL ``kl`` ``(batch, len)``
        summed, to every logger in its own form (:func:`flan_rlhf.logger_outputs.log_samples`)."""
        every = self.hparams.log_samples_every_n_steps
        if not every or iteration % every or self._trainer is None or self.global_rank != 0 or not self.loggers:
            return
        n = self.hparams.num_log_samples
        components = list(rollout.components) if len(rollout.components) > 1 else []
        columns = ["prompt", "response", "reward", *components, "kl"]
        values = [rollout.scores[:n], *(rollout.components[name][:n] for name in components), kl[:n].sum(1)]
        numbers = torch.stack([v.detach().float().cpu() for v in values], dim=1).tolist()  # one read
        rows = [[prompt, text, *row] for prompt, text, row in zip(rollout.prompts[:n], rollout.texts[:n], numbers)]
        for name in log_samples(self.loggers, columns, rows, iteration):
            if name not in self._warned_no_table:
                self._warned_no_table.add(name)
                rank_zero_warn(f"{name} takes no sample table: samples go to TensorBoard, CSV, W&B and MLflow "
                               "loggers only (its scalars are logged as usual)")

    def _histograms_due(self, iteration: int) -> bool:
        every = self.hparams.log_histograms_every_n_steps
        return bool(every) and iteration % every == 0 and self._trainer is not None and self.global_rank == 0 \
            and takes_histograms(self.loggers)

    def _log_rollout_histograms(self, rollout: Rollout, kl: torch.Tensor, iteration: int) -> None:
        """TRL's distributions of this process's rollout: rewards, per-response KL, response lengths, and the
        per-token policy ratios of every minibatch pass (response tokens only)."""
        ratios = self._ratio_log or []
        self._ratio_log = None
        values = {
            "env/reward_dist": rollout.scores,
            "objective/kl_dist": kl.sum(1),
            "tokens/responses_dist": rollout.mask.sum(1),
        }
        if ratios:
            values["ppo/policy/ratio"] = torch.cat([ratio[mask.bool()] for ratio, mask in ratios])
        log_histograms(self.loggers, values, iteration)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        kept = self.checkpointed_keys(state)
        for key in list(state):
            if key not in kept:
                del state[key]
        if self.actor.frozen_reference is not None and self.base_is_checkpointed:  # sharded: all gather, process 0 writes
            checkpoint["flan_rlhf_reference"] = (full_state_dict(self.actor.frozen_reference)
                                                 if is_sharded(self.actor) else self.actor.frozen_reference.state_dict())
        checkpoint["flan_rlhf"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "shaper": self.shaper.state_dict(),
            "guard": self.guard.state_dict(),
            "vocab_size": len(self.tokenizer),
            "reward": reward_description(self.reward),  # for the model card of a later `flan-rlhf export`
            # tensors, strings and plain numbers only: the checkpoint loads with torch.load(weights_only=True)
            "rng": capture_rng_states(),
        }

    def checkpointed_keys(self, keys) -> set[str]:
        """Which of the module's ``state_dict`` keys a checkpoint keeps: not the full fine-tuning reference
        (saved apart, whole, when the base was built from ``t5_config``), and with LoRA over a base that
        loads again from its name, only the trainable tensors (LoRA, value head)."""
        trainable = {f"actor.{k}" for k in self.actor.trainable_state_dict()}
        return {key for key in keys if not key.startswith("actor.frozen_reference.")
                and (not self.actor.uses_lora or self.base_is_checkpointed or key in trainable)}

    @property
    def base_is_checkpointed(self) -> bool:
        """Built from ``t5_config`` (no name to load it from again): the base weights are part of the run's state."""
        return self.policy_spec.name_or_path is None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.configure_model()
        trainable = {f"actor.{k}" for k in self.actor.trainable_state_dict()}
        problem = state_dict_mismatch(checkpoint.get("state_dict", {}), self.state_dict(), required=trainable)
        if problem is None:
            stored_vocab = (checkpoint.get("flan_rlhf") or {}).get("vocab_size")
            if stored_vocab is not None and stored_vocab != len(self.tokenizer):
                problem = f"its tokenizer had {stored_vocab} tokens, this run's has {len(self.tokenizer)}"
        if problem is not None:
            raise CheckpointError(f"checkpoint does not fit this model: {problem} - resume with the policy, lora and "
                                  "tokenizer settings it was trained with, or start a fresh run without --ckpt_path")
        if "flan_rlhf_reference" in checkpoint and self.actor.frozen_reference is not None:
            load_full_state_dict(self.actor.frozen_reference, checkpoint["flan_rlhf_reference"])
        extra = checkpoint.get("flan_rlhf")
        if extra:
            self.kl_controller.load_state_dict(extra["kl_controller"])
            self.shaper.load_state_dict(extra["shaper"])
            self.guard.load_state_dict(extra["guard"])
            restore_rng_states(extra["rng"])
        if self._trainer is not None and self.trainer.state.fn == "fit":
            self._resumed_from = str(self.trainer.ckpt_path)

    def export_target(self) -> tuple[str | None, bool, str]:
        return self.hparams.export_dir, self.hparams.overwrite_export_dir, "--model.init_args.overwrite_export_dir true"

    def on_fit_end(self) -> None:
        """Write the export (``export_dir``) when ``fit`` ends, also when a resumed run had no iteration
        left to train (Lightning then skips ``on_train_start``/``on_train_end`` but not this hook), so a
        run killed after its last checkpoint is finished by ``--ckpt_path last``."""
        if self._resumed_from is not None and self.global_rank == 0:  # on_train_start did not run
            print(f"resumed from step {self.global_step} ({self._resumed_from}): training was already complete, "
                  "writing the end-of-fit files", flush=True)
        self._resumed_from = None
        if not self.hparams.export_dir:
            return
        actor = self.actor
        if is_sharded(actor):  # every process gathers; process 0 writes the full weights from an unsharded twin
            state = full_state_dict(actor)
            actor = self._unsharded_actor(state) if self.global_rank == 0 else None
        if self.global_rank == 0:
            self._write_export(actor)

    def _unsharded_actor(self, state: dict[str, torch.Tensor]) -> ActorCritic:
        """A plain (unsharded) actor on the CPU holding ``state``, every weight of this one (``full_state_dict``)."""
        model, _ = load_policy_model(self.policy_spec, self.tokenizer)
        actor = ActorCritic(model, self.lora, with_value_head=self.WITH_VALUE_HEAD)
        actor.load_state_dict(state)
        return actor

    def _write_export(self, actor: ActorCritic) -> None:
        from flan_rlhf.model_card import facts_from_settings, write_card
        from flan_rlhf.policy import save_adapter

        manifest = {"format": "adapter" if self.actor.uses_lora else "full model",
                    "written_by": f"flan-rlhf fit ({type(self).__name__})", "global_step": self.global_step}
        facts = facts_from_settings("adapter" if self.actor.uses_lora else "full model", self.policy_spec, self.lora,
                                    self.settings, reward_description(self.reward), steps=self.global_step,
                                    algorithm=self.ALGORITHM)
        with self.export_folder(manifest) as folder:
            save_adapter(actor, self.tokenizer, folder, final_dir=self.export_target()[0])
            write_card(folder, facts, folder_name=self.export_target()[0])


def shards_weights(strategy) -> bool:
    """Whether a Lightning strategy shards parameters (FSDP, DeepSpeed, ModelParallel)."""
    names = [cls.__name__ for cls in type(strategy).__mro__]
    return any(key in name for name in names for key in ("FSDP", "DeepSpeed", "ModelParallel"))


def _make_kl_controller(settings: UpdateSettings):
    if settings.adaptive_kl:
        return ppo.AdaptiveKLController(settings.init_kl_coef, settings.kl_target, settings.kl_horizon)
    return ppo.FixedKLController(settings.init_kl_coef)


def _minibatch(rollout: Rollout, decoder_input_ids, targets: dict[str, torch.Tensor], idx: torch.Tensor,
               lengths: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Select rows ``idx`` of the rollout and of each target, and trim right padding (dynamic padding
    per minibatch).

    ``targets``: ``(batch, response_len)`` tensors from ``training_targets`` (PPO: ``advantages``,
    ``returns``). ``lengths``: the longest prompt and response among those rows,
    ``(prompt_len', response_len')`` (host integers, so trimming reads nothing from the device).
    Returns tensors of shape ``(mb, prompt_len')`` and ``(mb, response_len')``, and ``rows``: ``idx``.
    """
    prompt_len, response_len = lengths
    p = slice(0, prompt_len)
    r = slice(0, response_len)
    return {
        "input_ids": rollout.input_ids[idx][:, p],
        "attention_mask": rollout.attention_mask[idx][:, p],
        "decoder_input_ids": decoder_input_ids[idx][:, r],
        "responses": rollout.responses[idx][:, r],
        "mask": rollout.mask[idx][:, r],
        "logprobs": rollout.logprobs[idx][:, r],
        "ref_logprobs": rollout.ref_logprobs[idx][:, r],
        "values": rollout.values[idx][:, r],
        **{name: target[idx][:, r] for name, target in targets.items()},
        "rows": idx,
    }


def _finite_mean(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return finite.mean().item() if finite.numel() else float("nan")


def _finite_std(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return finite.std().item() if finite.numel() > 1 else 0.0
