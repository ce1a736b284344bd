"""Typed settings groups of the RL modules; LightningCLI turns each field into a YAML key/flag."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationSettings:
    """How responses are decoded: training rollouts (``generation``) and validate/test/predict, ``compare``
    and ``generate`` (``eval_generation``, the ``generate`` command's flags).

    Training rollouts must be draws from the distribution the log-probs describe, or the KL
    estimate and the importance ratio are biased (TRL #235: mismatched settings make the KL
    negative). So training takes sampling, ``temperature`` (log-probs use the same
    ``logits / temperature``; N implementation details #7) and ``min_new_tokens`` (log-probs use
    the same EOS ban), and :func:`check_generation_settings` refuses the rest there.

    Attributes:
        max_new_tokens: longest response, in tokens.
        min_new_tokens: shortest response: EOS is banned before this many tokens (in training the
            log-probs of the policy and the reference are taken with the same ban).
        temperature: softmax temperature.
        top_k: sample from the k most likely tokens; 0 disables. Evaluation only: truncation draws
            from a renormalised head of the softmax, and a token outside the reference's top-k has
            log-prob -inf under it.
        top_p: nucleus sampling mass; 1.0 disables. Evaluation only, as ``top_k``.
        do_sample: sample (True) or decode greedily / by beam search (False). Training samples.
        num_beams: beam search width; 1 disables. Evaluation only.
        repetition_penalty: CTRL's penalty (Keskar et al. 2019) on tokens already in the response;
            1.0 disables. Evaluation only.
        no_repeat_ngram_size: ban every token that would repeat an n-gram of this size; 0 disables.
            Evaluation only.
        length_penalty: beam search's exponent on the length a beam's log-prob sum is divided by
            (> 0 favours longer responses); needs ``num_beams`` > 1. Evaluation only.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = True
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0

    @property
    def mode(self) -> str:
        """``sampled``, ``greedy``, ``beam search`` or ``beam sampling`` (reports, summaries)."""
        if self.num_beams > 1:
            return "beam sampling" if self.do_sample else "beam search"
        return "sampled" if self.do_sample else "greedy"

    @property
    def needs_hf_generate(self) -> bool:
        """True when only transformers' ``generate`` decodes these settings (beam search, repetition
        penalty, n-gram blocking); the package's sampler draws the rest."""
        return self.num_beams > 1 or self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def generate_kwargs(self) -> dict:
        """These settings as keyword arguments of transformers' ``generate`` (the token ids are the caller's)."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens, do_sample=self.do_sample,
                      num_beams=self.num_beams, repetition_penalty=self.repetition_penalty,
                      no_repeat_ngram_size=self.no_repeat_ngram_size, use_cache=True)
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:  # None: generate's defaults would otherwise warn that they have no effect when not sampling
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs


#: Decoding settings training refuses, each with its value that changes nothing and why it biases training.
TRAINING_REFUSES: dict[str, tuple[object, str]] = {
    "do_sample": (True, "greedy decoding gives no draws from the policy, which the policy gradient and the KL "
                        "estimate need"),
    "num_beams": (1, "beam search keeps likely sequences instead of drawing from the policy"),
    "repetition_penalty": (1.0, "it rescales the logits of tokens already in the response"),
    "no_repeat_ngram_size": (0, "it bans tokens that would repeat an n-gram"),
    "top_k": (0, "truncation draws from a renormalised head of the softmax, and a token outside the "
                 "reference's top-k has log-prob -inf under it"),
    "top_p": (1.0, "truncation draws from a renormalised head of the softmax, and a token outside the "
                   "reference's nucleus has log-prob -inf under it"),
}


def check_generation_settings(settings: GenerationSettings, prefix: str, training: bool) -> GenerationSettings:
    """``settings`` if valid for their use, else :class:`SettingsError` with one line naming the option.

    Args:
        prefix: what names an option in messages: ``generation.``, ``eval_generation.``, ``--`` (a command's flags).
        training: the settings decode training rollouts: only sampling from the softmax the log-probs
            come from (:data:`TRAINING_REFUSES` lists what is refused and why).
    """
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise SettingsError(message)

    s = settings
    require(isinstance(s.max_new_tokens, int) and s.max_new_tokens >= 1,
            f"{prefix}max_new_tokens is {s.max_new_tokens!r}; a response needs a token: use 1 or more")
    require(isinstance(s.min_new_tokens, int) and 0 <= s.min_new_tokens <= s.max_new_tokens,
            f"{prefix}min_new_tokens is {s.min_new_tokens!r}; use 0 to {prefix}max_new_tokens ({s.max_new_tokens})")
    require(s.temperature > 0, f"{prefix}temperature is {s.temperature!r}; use a positive number (1.0: the model's "
                               f"own softmax), or do_sample false for greedy decoding")
    require(s.top_k >= 0, f"{prefix}top_k is {s.top_k!r}; use 0 (off) or a positive count")
    require(0 < s.top_p <= 1, f"{prefix}top_p is {s.top_p!r}; use a mass in (0, 1] (1.0: off)")
    require(isinstance(s.num_beams, int) and s.num_beams >= 1, f"{prefix}num_beams is {s.num_beams!r}; use 1 (off) or more")
    require(s.repetition_penalty > 0, f"{prefix}repetition_penalty is {s.repetition_penalty!r}; use a positive number "
                                      f"(1.0: off, above 1 discourages repeats)")
    require(isinstance(s.no_repeat_ngram_size, int) and s.no_repeat_ngram_size >= 0,
            f"{prefix}no_repeat_ngram_size is {s.no_repeat_ngram_size!r}; use 0 (off) or an n-gram size")
    require(s.length_penalty == 1.0 or s.num_beams > 1,
            f"{prefix}length_penalty is {s.length_penalty!r} but it acts only in beam search; set {prefix}num_beams "
            f"above 1, or leave length_penalty at 1.0")
    if training:
        for name, (neutral, why) in TRAINING_REFUSES.items():
            value = getattr(s, name)
            require(value == neutral,
                    f"{prefix}{name} is {value!r} but training rollouts must be draws from the softmax the log-probs "
                    f"and KL are computed from, and {why}; keep {prefix}{name} at {neutral!r} and set it in "
                    f"eval_generation (validate, test, predict, compare) or on `flan-rlhf generate`")
    return settings


@dataclass
class UpdateSettings:
    """What PPO, RLOO and GRPO share: the optimiser, clipped-ratio passes, KL accounting, guards, shaping.

    Attributes:
        learning_rate: AdamW learning rate (TRL default 1.41e-5; LoRA usually wants ~1e-4..5e-4).
        weight_decay: AdamW weight decay.
        ppo_epochs: passes over each rollout batch. 1 pass with one optimiser step per rollout
            (``mini_batch_size x gradient_accumulation_steps`` >= its responses) is on-policy
            REINFORCE: the ratio is 1; smaller minibatches make every later step off-policy (clipped).
        mini_batch_size: responses per gradient step (per process). PPO samples one response per
            prompt; RLOO/GRPO sample ``samples_per_prompt``, so a batch of B prompts holds B x k rows.
        gradient_accumulation_steps: minibatches whose gradients are summed before a step.
        cliprange: policy ratio clip epsilon.
        adaptive_kl: adaptive KL controller (Ziegler et al. 2019) if True, fixed otherwise.
        init_kl_coef: initial (or fixed) KL coefficient (beta).
        kl_target: target of the adaptive controller, in summed per-sequence KL (TRL: 6).
        kl_horizon: horizon of the adaptive controller, in samples (TRL: 10000).
        kl_estimator: per-token KL estimator: ``kl`` (logp - ref), ``abs``, ``mse`` or ``k3`` (exp(ref - logp) - 1 - (ref - logp), never negative).
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


@dataclass
class PPOSettings(UpdateSettings):
    """PPO hyperparameters. Defaults are TRL 0.11's PPOConfig, so known recipes carry over.

    Attributes:
        cliprange_value: value clip range around the rollout values.
        vf_coef: weight of the value loss in the total loss.
        gamma: discount factor of GAE.
        lam: GAE lambda.
        whiten_advantages: normalise advantages per rollout batch (N details #3).
    """

    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True


#: Where a critic-free module puts the KL to the reference.
KL_PENALTIES = ("reward", "loss")

#: Estimators whose gradient, as a loss term on tokens sampled from the policy, is the KL's gradient in
#: expectation: k3 (GRPO's) and k2 (``mse``). k1's (``kl``) is the score function, 0 in expectation, and
#: ``abs`` follows only the sign (http://joschu.net/blog/kl-approx.html; TRL's GRPO uses k3).
KL_LOSS_ESTIMATORS = ("k3", "mse")


@dataclass
class GroupSettings(UpdateSettings):
    """What RLOO and GRPO add: k responses per prompt, judged against each other (no value head).

    Attributes:
        samples_per_prompt: k, responses sampled per prompt (>= 2); the k of a prompt form one
            group, kept whole on one process.
        kl_penalty: ``reward``: each response's score loses ``beta * sum_t KL_t`` before the group
            baseline (RLOO's paper and TRL's RLOOTrainer); ``loss``: the score is used alone and
            ``beta * KL`` (per token, ``kl_estimator``, aggregated like the policy loss) is added
            to the loss (GRPO's paper); needs ``kl_estimator`` ``k3`` or ``mse``.
        loss_aggregation: how per-token losses become one number: ``token`` (mean over every
            response token of the minibatch: long responses weigh more) or ``sequence`` (mean
            per response, then over responses: each response weighs the same).
    """

    samples_per_prompt: int = 4
    kl_penalty: str = "reward"
    loss_aggregation: str = "token"


@dataclass
class RLOOSettings(GroupSettings):
    """RLOO hyperparameters (Ahmadian et al. 2024: k = 4; TRL's RLOOConfig: KL 0.05 in the reward,
    4 passes, token-mean loss). The advantage is the score minus the mean of the other k - 1.

    Attributes:
        ppo_epochs: passes over each rollout batch (TRL RLOOConfig.num_ppo_epochs: 4).
        adaptive_kl: fixed KL coefficient by default, as TRL's RLOO.
        init_kl_coef: beta, the KL coefficient (TRL RLOOConfig.kl_coef: 0.05).
    """

    ppo_epochs: int = 4
    adaptive_kl: bool = False
    init_kl_coef: float = 0.05


@dataclass
class GRPOSettings(GroupSettings):
    """GRPO hyperparameters (Shao et al. 2024: group-normalised advantage, k3 KL as a loss term,
    per-sequence loss mean; TRL's GRPOConfig: 8 generations, beta 0.04, one pass).

    Attributes:
        samples_per_prompt: k, responses per prompt (TRL GRPOConfig.num_generations: 8).
        ppo_epochs: passes over each rollout batch (TRL GRPOConfig.num_iterations: 1).
        adaptive_kl: fixed KL coefficient by default, as GRPO.
        init_kl_coef: beta, the KL coefficient (TRL GRPOConfig.beta: 0.04).
        kl_estimator: per-token KL estimator (``kl``, ``abs``, ``mse`` or ``k3``); ``k3``, the
            paper's (unbiased and never negative), by default.
        kl_penalty: ``loss`` (the paper's, by default): the KL is a loss term; ``reward``: taken
            from each score before the group baseline.
        loss_aggregation: ``sequence`` (the paper's 1/|o_i| per response, then the mean, by
            default) or ``token`` (mean over every response token; DAPO's).
        scale_rewards: divide each group's centred rewards by its std (GRPO); ``false`` keeps
            them centred only, the advantage of Dr. GRPO (Liu et al. 2025; its other change, a
            constant instead of per-response length normaliser, is not offered: ``token`` is DAPO's).
    """

    samples_per_prompt: int = 8
    ppo_epochs: int = 1
    adaptive_kl: bool = False
    init_kl_coef: float = 0.04
    kl_estimator: str = "k3"
    kl_penalty: str = "loss"
    loss_aggregation: str = "sequence"
    scale_rewards: bool = True


@dataclass
class DPOSettings:
    """DPO hyperparameters (Rafailov et al. 2023; IPO: Azar et al. 2023), for pairs from a file and from the
    policy's own samples. Defaults follow TRL's DPOConfig where it has one.

    Attributes:
        beta: the strength of the implicit KL to the reference (TRL: 0.1); higher keeps the policy closer.
        loss_type: ``sigmoid`` (DPO) or ``ipo`` (IPO's squared loss on per-token mean log-probs).
        label_smoothing: conservative DPO: the chance a pair's label is wrong (TRL: 0; ``sigmoid`` only).
        learning_rate: AdamW learning rate (LoRA usually wants ~1e-4..5e-4; full fine-tuning ~1e-6).
        weight_decay: AdamW weight decay.
        max_grad_norm: global gradient-norm clip; ``None`` disables.
        max_response_tokens: pairs from a file: chosen and rejected responses are cut to this many
            tokens (``</s>`` included). Sampled pairs are as long as ``generation.max_new_tokens``.
        samples_per_prompt: pairs from samples: k responses per prompt; the best and the worst by the
            reward make its pair (no pair when all k score the same).
        ppo_epochs: passes over each batch's pairs, stored or sampled (1: every pair once; on-policy
            for sampled pairs).
        mini_batch_size: pairs per gradient step (per process); a batch of more pairs takes several steps.
        gradient_accumulation_steps: minibatches whose gradients are summed per optimiser step.
        no_eos_penalty: pairs from samples: subtracted from the score of a response without EOS
            before ranking; ``None`` off.
        kl_stop: stop the run when the sampled responses' KL to the reference (``objective/kl``)
            exceeds this. ``None`` disables.
        max_nonfinite_in_a_row: consecutive iterations with NaN/inf rewards, log-probs or loss (each
            skipped) before the run stops with an error naming the cause.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_response_tokens: int = 128
    samples_per_prompt: int = 4
    ppo_epochs: int = 1
    mini_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    no_eos_penalty: float | None = None
    kl_stop: float | None = None
    max_nonfinite_in_a_row: int = 3

    # What the shared on-policy machinery reads and DPO fixes (class attributes, not options): beta is
    # the KL coefficient and it does not adapt; rewards only rank samples, so shaping them changes nothing.
    adaptive_kl = False
    kl_estimator = "kl"
    score_normalize = False
    score_scale = 1.0
    score_clip = None

    @property
    def init_kl_coef(self) -> float:
        """The KL coefficient the run logs (``objective/kl_coef``): DPO's is ``beta``."""
        return self.beta


#: Every RL method by its name: its module is ``<NAME>Module`` (``flan_rlhf.module.PPOModule``,
#: ``flan_rlhf.critic_free.RLOOModule``, ...) and the name is also its settings group's key
#: (``--model.rloo.*``, the checkpoint's ``hyper_parameters["rloo"]``).
METHOD_SETTINGS: dict[str, type] = {"ppo": PPOSettings, "rloo": RLOOSettings, "grpo": GRPOSettings, "dpo": DPOSettings}


class SettingsError(ValueError):
    """An RL module's settings hold a value the algorithm cannot run with (the message names the fix)."""


def check_update_settings(settings: UpdateSettings | DPOSettings) -> UpdateSettings | DPOSettings:
    """``settings`` if every choice and count is valid, else :class:`SettingsError` with one line."""
    # imported here: the settings dataclasses stay free of torch, so commands' --help starts fast
    from flan_rlhf.dpo import check_loss_settings
    from flan_rlhf.group_advantages import check_group_size
    from flan_rlhf.ppo import KL_ESTIMATORS, LOSS_AGGREGATIONS

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise SettingsError(message)

    for name in ("ppo_epochs", "mini_batch_size", "gradient_accumulation_steps"):
        value = getattr(settings, name)
        require(isinstance(value, int) and value >= 1, f"{name} is {value!r}; it counts passes or rows: use 1 or more")
    require(settings.kl_estimator in KL_ESTIMATORS,
            f"kl_estimator {settings.kl_estimator!r} is unknown; use one of {', '.join(KL_ESTIMATORS)}")
    if isinstance(settings, (GroupSettings, DPOSettings)):
        try:
            check_group_size(settings.samples_per_prompt, "samples_per_prompt")
        except ValueError as err:
            raise SettingsError(str(err)) from None
    if isinstance(settings, DPOSettings):
        try:
            check_loss_settings(settings.beta, settings.loss_type, settings.label_smoothing)
        except ValueError as err:
            raise SettingsError(str(err)) from None
        require(isinstance(settings.max_response_tokens, int) and settings.max_response_tokens >= 2,
                f"max_response_tokens is {settings.max_response_tokens!r}; a response needs a token and </s>: use 2 or more")
    if isinstance(settings, GroupSettings):
        require(settings.kl_penalty in KL_PENALTIES,
                f"kl_penalty {settings.kl_penalty!r} is unknown; use one of {', '.join(KL_PENALTIES)}")
        require(settings.kl_penalty != "loss" or settings.kl_estimator in KL_LOSS_ESTIMATORS,
                f"kl_penalty 'loss' with kl_estimator {settings.kl_estimator!r} does not pull the policy towards the "
                f"reference (its gradient is not the KL's); use kl_estimator k3 (or mse), or kl_penalty reward")
        require(settings.loss_aggregation in LOSS_AGGREGATIONS,
                f"loss_aggregation {settings.loss_aggregation!r} is unknown; use one of {', '.join(LOSS_AGGREGATIONS)}")
    return settings
