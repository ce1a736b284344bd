"""Non-profanity reward from alt-profanity-check: the offline default.

alt-profanity-check ships a trained linear SVM (calibrated to a probability) over a
bag-of-words inside its wheel, so it needs no download and scores 64 sentences in ~3 ms.
It knows profanity and common insults, not subtle toxicity: use Detoxify or a hate-speech
classifier when those can be downloaded.
"""
from __future__ import annotations

from typing import Sequence

import torch

from flan_rlhf.rewards.base import Reward, RewardOptionError
from flan_rlhf.rewards.long_text import LongText, check_long_text, score_by_worst_chunk
from flan_rlhf.rewards.text_batches import batched, texts_to_score


class ProfanityReward(Reward):
    """Reward ``1 - p(profane)`` per response, in ``[0, 1]``; higher is cleaner.

    Args:
        name: component name in logs (``env/reward/<name>_mean``).
        batch_size: texts per ``predict_prob`` call.
        score_prompt: score ``prompt + "\\n" + response`` instead of the response alone. Off by
            default: the prompt is the same for every sample of a prompt and usually longer than
            the response, so its words dominate the bag-of-words score and the reward stops
            telling the policy's responses apart (a toxic prompt would also punish a clean reply).
        long_text: ``worst_chunk`` (default): a text longer than ``window`` characters is split into
            chunks of at most ``window`` characters (whole sentences grouped while they fit, an
            over-long sentence cut at a word) and scored by its most profane chunk; a text that fits
            is scored exactly as with ``whole``. ``whole``: the text is one input, however long.
        window: characters per chunk (``long_text: worst_chunk``). alt-profanity-check reads a whole
            text, but its score of an insult shrinks as clean words join it: measured by ``python
            benchmarks/reward_limits.py`` (alt-profanity-check 1.9.1), half of 12 insults fall under
            0.5 once 53 clean characters precede them, and at the end of an N-character text 61% stay
            flagged at N = 80, 47% at 100, 8% at 500, while false positives on clean summaries are
            lowest at 80 to 100 (docs/rewards.md, "Measured limits"). Hence 80 characters.
    """

    def __init__(
        self,
        name: str = "non_profanity",
        batch_size: int = 256,
        score_prompt: bool = False,
        long_text: LongText = "worst_chunk",
        window: int = 80,
    ) -> None:
        if batch_size < 1:
            raise RewardOptionError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
        if window < 1:
            raise RewardOptionError(f"window must be >= 1 character, got {window}: pass a positive window, e.g. 80")
        self.name = name
        self.batch_size = batch_size
        self.score_prompt = score_prompt
        self.long_text = check_long_text(long_text)
        self.window = window
        self._predict_prob = None

    def setup(self, device: torch.device | str = "cpu") -> "ProfanityReward":
        """Import the scorer once. It runs on CPU (scikit-learn); ``device`` is not used."""
        if self._predict_prob is None:
            from profanity_check import predict_prob

            self._predict_prob = predict_prob
        return self

    def toxicity(self, texts: Sequence[str]) -> torch.Tensor:
        """Probability that each text is profane (its worst chunk's), float32 tensor ``(batch,)`` in ``[0, 1]``."""
        return self._worst_chunk_toxicity(texts_to_score(None, texts))

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: 1 - p(profane)}``, shape ``(batch,)``."""
        return {self.name: 1.0 - self._worst_chunk_toxicity(texts_to_score(prompts, responses, self.score_prompt))}

    def _worst_chunk_toxicity(self, texts: list[str]) -> torch.Tensor:
        """``(batch,)`` toxicities of texts already through :func:`texts_to_score`."""
        window = self.window if self.long_text == "worst_chunk" else None
        return score_by_worst_chunk(texts, self._predict, window, len, worst="max")

    def _predict(self, texts: list[str]) -> torch.Tensor:
        """``predict_prob`` of each text, ``batch_size`` at a time: float32 tensor ``(n,)``."""
        self.setup()
        scores: list[torch.Tensor] = [torch.zeros(0)]
        for chunk in batched(texts, self.batch_size):
            scores.append(torch.as_tensor(self._predict_prob(list(chunk)), dtype=torch.float32))
        return torch.cat(scores)
