"""Rewards that compare a response with its row's reference texts: ROUGE and sentence BLEU.

They let a run optimise the task quality it reports, not only watch it, as RL4LMs' ROUGE and
BLEU reward functions do (Ramamurthy et al. 2023): combined with a toxicity reward in a
:class:`~flan_rlhf.rewards.CompositeReward` (``non_profanity + 0.5 * rougeL``) they keep a
policy from buying non-toxicity by cutting its summary short. The references are the data
module's ``reference_columns`` of each row, carried to the reward by the rollout (each of a
prompt's k responses gets its row's references). The scores are the very functions the reports
use (:func:`flan_rlhf.eval.metrics.rouge_per_sample`, :func:`~flan_rlhf.eval.metrics.bleu_statistics`),
so the reward and ``val/rougeL`` agree on every response.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from flan_rlhf.eval.metrics import bleu_from_statistics, bleu_statistics, rouge_per_sample, sacrebleu_tokenizer
from flan_rlhf.rewards.base import Reward, RewardOptionError

RougeKey = Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]
ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class RougeReward(Reward):
    """ROUGE F-measure of each response against its row's references, in ``[0, 1]``.

    With several references a response takes its best-matching one (torchmetrics'
    ``accumulate="best"``, the rules of the ``rouge-score`` package).

    Args:
        rouge_key: ``rouge1``, ``rouge2``, ``rougeL`` (longest common subsequence) or ``rougeLsum``
            (per sentence; the package's sentence splitter when nltk's punkt_tab is absent).
        use_stemmer: Porter-stem tokens before matching.
        name: component name in logs (``env/reward/<name>_mean``); default: the key.
    """

    needs_references = True

    def __init__(self, rouge_key: RougeKey = "rougeL", use_stemmer: bool = False, name: str | None = None) -> None:
        if rouge_key not in ROUGE_KEYS:
            raise RewardOptionError(f"rouge_key={rouge_key!r} is not a ROUGE key: use one of {list(ROUGE_KEYS)}")
        self.rouge_key = rouge_key
        self.use_stemmer = use_stemmer
        self.name = name or rouge_key

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """``{name: F-measure (batch,)}``; ``references`` holds one non-empty list per response."""
        scores = rouge_per_sample(list(responses), references, (self.rouge_key,), self.use_stemmer)[self.rouge_key]
        return {self.name: scores.float()}


class BleuReward(Reward):
    """Sentence BLEU of each response against its row's references, in ``[0, 1]``.

    Clipped n-gram precisions for n = 1..``n_gram`` and the brevity penalty against the
    reference closest in length (Papineni et al. 2002), add-one smoothed for n >= 2 (Lin & Och
    2004) so a short response that shares words with its reference is not 0.

    Args:
        n_gram: the highest n-gram order.
        tokenize: ``13a`` (sacrebleu's default tokenizer) or ``whitespace``.
        smoothing: ``add-one`` or ``none`` (plain BLEU: 0 when any order has no match).
        name: component name in logs.
    """

    needs_references = True

    def __init__(self, n_gram: int = 4, tokenize: Literal["13a", "whitespace"] = "13a",
                 smoothing: Literal["add-one", "none"] = "add-one", name: str = "bleu") -> None:
        if n_gram < 1:
            raise RewardOptionError(f"n_gram={n_gram}: use an n-gram order of at least 1, e.g. 4")
        if tokenize not in ("13a", "whitespace"):
            raise RewardOptionError(f"tokenize={tokenize!r}: use '13a' or 'whitespace'")
        if smoothing not in ("add-one", "none"):
            raise RewardOptionError(f"smoothing={smoothing!r}: use 'add-one' or 'none'")
        self.n_gram = n_gram
        self.tokenize = tokenize
        self.smoothing = smoothing
        self.name = name

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   references: Sequence[Sequence[str]]) -> dict[str, torch.Tensor]:
        """``{name: sentence BLEU (batch,)}``; ``references`` holds one non-empty list per response."""
        tokenizer = {"whitespace": str.split, "13a": sacrebleu_tokenizer()}[self.tokenize]
        statistics = bleu_statistics(list(responses), references, self.n_gram, tokenizer)
        return {self.name: bleu_from_statistics(statistics, self.n_gram, self.smoothing).float()}
