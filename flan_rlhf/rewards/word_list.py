"""A word-list reward: 1 for a response free of the listed words, 0 for one that holds any.

Cheap, offline and transparent, it makes a good monitor (``--model.init_args.monitors``) beside a
learned reward: a policy that games a profanity classifier still shows here when it keeps the
insults the classifier stopped seeing. Matching is :class:`flan_rlhf.eval.metrics.InsultMatcher`'s
(whole words, multi-word entries, and fragments of ``min_fragment`` letters or more), the same
rule as the report's ``insult_fraction``, so the monitor's mean is ``1 - insult_fraction``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from flan_rlhf.eval.metrics import InsultMatcher
from flan_rlhf.rewards.base import Reward, RewardOptionError
from flan_rlhf.rewards.text_batches import texts_to_score


class WordListReward(Reward):
    """Reward ``1.0`` when a response holds none of ``words`` (nor a fragment of one), else ``0.0``.

    Args:
        words: the listed words or phrases (case-insensitive; letters only are compared).
        min_fragment: a run of this many letters of a listed word inside a response word counts too
            (``idio`` for ``idiot``); a large value (e.g. 100) matches whole words only.
        name: component name in logs (``val/monitor/<name>`` as a monitor).
        score_prompt: check ``prompt + "\\n" + response`` instead of the response alone.
    """

    def __init__(self, words: list[str], min_fragment: int = 4, name: str = "no_listed_words",
                 score_prompt: bool = False) -> None:
        try:
            self._matcher = InsultMatcher(list(words) if not isinstance(words, str) else words, min_fragment)
        except ValueError as err:
            raise RewardOptionError(f"WordListReward: {err}") from None
        self.words = list(words)
        self.min_fragment = int(min_fragment)
        self.name = name
        self.score_prompt = score_prompt

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: 1 - flag}``, float32 ``(batch,)``: 1.0 for a clean response."""
        texts = texts_to_score(prompts, responses, self.score_prompt)
        return {self.name: torch.tensor([0.0 if self._matcher(text) else 1.0 for text in texts], dtype=torch.float32)}
