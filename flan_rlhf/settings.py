"""Typed settings groups of the PPO module; LightningCLI turns each field into a YAML key/flag."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """How responses are sampled during rollouts (and, with ``do_sample``, for evaluation).

    Attributes:
        max_new_tokens: longest response, in tokens.
        min_new_tokens: shortest response (EOS is suppressed before this).
        temperature: softmax temperature. Log-probs for PPO and KL are computed from logits
            divided by the same temperature, so the sampling distribution and the one being
            optimised agree (N implementation details #7; TRL #235: mismatched settings make
            KL negative).
        top_k: 0 disables top-k. Keep 0 for training: top-k/top-p warping makes the sampled
            distribution differ from the softmax the log-probs come from (a biased KL estimate),
            and a token outside the reference's top-k gets a reference log-prob of -inf.
        top_p: 1.0 disables nucleus sampling; same caveat as ``top_k``.
        do_sample: sample (True) or greedy (False). PPO needs sampling.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True


@dataclass
class PPOSettings:
    """PPO hyperparameters. Defaults are TRL 0.11's PPOConfig, so known recipes carry over.

    Attributes:
        learning_rate: AdamW learning rate (TRL default 1.41e-5; LoRA usually wants ~1e-4..5e-4).
        weight_decay: AdamW weight decay.
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: prompts per gradient step (per process).
        gradient_accumulation_steps: minibatches whose gradients are summed before a step.
        cliprange: policy ratio clip epsilon.
        cliprange_value: value clip range around the rollout values.
        vf_coef: weight of the value loss in the total loss.
        gamma: discount factor of GAE.
        lam: GAE lambda.
        whiten_advantages: normalise advantages per rollout batch (N details #3).
        adaptive_kl: adaptive KL controller (Ziegler et al. 2019) if True, fixed otherwise.
        init_kl_coef: initial (or fixed) KL coefficient.
        kl_target: target of the adaptive controller, in summed per-sequence KL (TRL: 6).
        kl_horizon: horizon of the adaptive controller, in samples (TRL: 10000).
        kl_estimator: per-token KL penalty estimator: ``kl`` (logp - ref), ``abs``, ``mse`` or ``k3`` (exp(ref - logp) - 1 - (ref - logp), never negative).
        max_grad_norm: global gradient-norm clip; ``None`` disables (not recommended).
        ratio_threshold: skip a minibatch (no gradient; no optimiser step if nothing else in its
            accumulation group counts) whose mean importance ratio over response tokens exceeds
            this (TRL: 10). ``None`` disables.
        target_kl: once a minibatch's approximate KL exceeds this, the iteration's later
            minibatches add nothing and no further epoch starts. ``None`` disables.
        kl_stop: stop the run when the rollout KL (``objective/kl``) exceeds this. ``None`` disables.
        max_nonfinite_in_a_row: consecutive iterations with NaN/inf in rewards, values or loss
            (each skipped) before the run stops with an error naming the cause.
        no_eos_penalty: subtracted from the score of responses that never emit EOS; ``None`` off.
        score_normalize: normalise scores by a running mean/std before the KL penalty.
        score_scale: multiply scores by this (after normalisation).
        score_clip: clip scores to ``[-score_clip, score_clip]`` (after scaling). ``None`` off.
    """

    learning_rate: float = 1.41e-5
    weight_decay: float = 0.0
    ppo_epochs: int = 4
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    adaptive_kl: bool = True
    init_kl_coef: float = 0.2
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "kl"
    max_grad_norm: float | None = 1.0
    ratio_threshold: float | None = 10.0
    target_kl: float | None = None
    kl_stop: float | None = None
    max_nonfinite_in_a_row: int = 3
    no_eos_penalty: float | None = None
    score_normalize: bool = False
    score_scale: float = 1.0
    score_clip: float | None = None
