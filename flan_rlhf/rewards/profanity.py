"""Non-profanity reward from alt-profanity-check: the offline default.

alt-profanity-check ships a trained linear SVM (calibrated to a probability) over a
bag-of-words inside its wheel, so it needs no download and scores 64 sentences in ~3 ms.
It knows profanity and common insults, not subtle toxicity: use Detoxify or a hate-speech
classifier when those can be downloaded.
"""
from __future__ import annotations

from typing import Sequence

import torch

from flan_rlhf.rewards.base import Reward
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
    """

    def __init__(
        self, name: str = "non_profanity", batch_size: int = 256, score_prompt: bool = False
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
        self.name = name
        self.batch_size = batch_size
        self.score_prompt = score_prompt
        self._predict_prob = None

    def setup(self, device: torch.device | str = "cpu") -> "ProfanityReward":
        """Import the scorer once. It runs on CPU (scikit-learn); ``device`` is not used."""
        if self._predict_prob is None:
            from profanity_check import predict_prob

            self._predict_prob = predict_prob
        return self

    def toxicity(self, texts: Sequence[str]) -> torch.Tensor:
        """Probability that each text is profane, float32 tensor of shape ``(batch,)`` in ``[0, 1]``."""
        self.setup()
        texts = [str(text) for text in texts]
        scores: list[torch.Tensor] = [torch.zeros(0)]
        for chunk in batched(texts, self.batch_size):
            scores.append(torch.as_tensor(self._predict_prob(list(chunk)), dtype=torch.float32))
        return torch.cat(scores)

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: 1 - p(profane)}``, shape ``(batch,)``."""
        return {self.name: 1.0 - self.toxicity(texts_to_score(prompts, responses, self.score_prompt))}
