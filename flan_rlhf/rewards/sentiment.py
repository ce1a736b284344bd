"""Positivity rewards: VADER (offline, rule-based) and any Hugging Face sentiment classifier.

VADER (Hutto & Gilbert, ICWSM 2014) is a sentiment lexicon plus rules for negation, boosters
and punctuation; ``vaderSentiment`` ships the lexicon in its wheel, so it runs offline. Its
``compound`` score is the normalised sum of valences, in ``[-1, 1]``.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from flan_rlhf.rewards.base import Reward
from flan_rlhf.rewards.classifier import ClassifierReward
from flan_rlhf.rewards.long_text import LongText
from flan_rlhf.rewards.text_batches import texts_to_score


class VaderReward(Reward):
    """Reward = VADER ``compound`` sentiment of each response, in ``[-1, 1]``; higher is more positive.

    Args:
        name: component name in logs.
        score_prompt: score ``prompt + "\\n" + response``. Off by default: the unchanged prompt's
            words would add the same valence to every sample and swamp the response's own.
    """

    def __init__(self, name: str = "positivity", score_prompt: bool = False) -> None:
        self.name = name
        self.score_prompt = score_prompt
        self._analyzer = None

    def setup(self, device: torch.device | str = "cpu") -> "VaderReward":
        """Build the analyzer once (reads the lexicon from the wheel). CPU only; ``device`` unused."""
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        return self

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: compound}``, float32 shape ``(batch,)``."""
        self.setup()
        texts = texts_to_score(prompts, responses, self.score_prompt)
        compound = [self._analyzer.polarity_scores(text)["compound"] for text in texts]
        return {self.name: torch.tensor(compound, dtype=torch.float32).reshape(len(texts))}


class SentimentClassifierReward(ClassifierReward):
    """A Hugging Face sentiment classifier's positive label as reward (needs the model downloaded).

    The defaults read the ``POSITIVE`` probability of the SST-2 DistilBERT; pick any other model
    and its positive label by name (e.g. ``cardiffnlp/twitter-roberta-base-sentiment-latest`` with
    ``label: positive``). All options are those of :class:`ClassifierReward`; with ``long_text:
    worst_chunk`` a text longer than the window scores as its least positive chunk.
    """

    def __init__(
        self,
        model: str = "distilbert/distilbert-base-uncased-finetuned-sst-2-english",
        label: str = "POSITIVE",
        output: Literal["logit", "prob"] = "prob",
        sign: Literal[1, -1] = 1,
        name: str = "positivity",
        tokenizer: str | None = None,
        batch_size: int = 32,
        max_length: int | None = 512,
        score_prompt: bool = False,
        local_files_only: bool = False,
        long_text: LongText = "worst_chunk",
    ) -> None:
        super().__init__(
            model=model,
            label=label,
            output=output,
            sign=sign,
            name=name,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            score_prompt=score_prompt,
            local_files_only=local_files_only,
            long_text=long_text,
        )
