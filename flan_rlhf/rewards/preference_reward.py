"""Reward = the scalar output of a preference-trained reward model folder.

Kept apart from :mod:`flan_rlhf.reward_model.model` (the LightningModule that trains it) so
that scoring with it does not import Lightning.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from flan_rlhf.rewards.base import Reward, RewardOptionError
from flan_rlhf.rewards.text_batches import freeze_for_inference, sequence_classifier_logits, texts_to_score

# Written next to the exported model: how the model was trained, so scoring can match it.
EXPORT_METADATA_FILE = "flan_rlhf_reward.json"


class PreferenceReward(Reward):
    """Reward = the scalar output of a reward model exported by :class:`PreferenceRewardModel`.

    Args:
        path: the exported folder (or any 1-output ``AutoModelForSequenceClassification`` folder/id).
        score_prompt: encode ``(prompt, response)`` as a text pair instead of the response alone.
            ``None`` (default) follows how the model was trained (``flan_rlhf_reward.json``), and
            scores the response alone when that is unknown. Scoring the prompt matters only when the
            model was trained with it: the prompt is identical for all samples of a prompt and
            usually longer than the response, so a model that never learnt to discount it lets it
            dominate the score; and since Bradley-Terry only fixes differences between responses to
            the same prompt, a per-prompt offset is noise to PPO.
        name: component name in logs.
        batch_size: texts per forward pass.
        max_length: truncate inputs to this many tokens (default: the value used in training).
    """

    def __init__(
        self,
        path: str,
        score_prompt: bool | None = None,
        name: str = "preference",
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise RewardOptionError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
        self.path = path
        self.score_prompt = score_prompt
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length
        self._model = None
        self._tokenizer = None

    def setup(self, device: torch.device | str = "cpu") -> "PreferenceReward":
        """Load the folder once (eval mode, no grads) and move the model to ``device``."""
        if self._model is None:
            from flan_rlhf.rewards.classifier import load_sequence_classifier

            model, tokenizer = load_sequence_classifier(self.path)
            if model.config.num_labels != 1:
                raise ValueError(
                    f"reward model {self.path!r} has {model.config.num_labels} outputs, expected 1: "
                    "export one with PreferenceRewardModel or use ClassifierReward with a label"
                )
            metadata_file = Path(self.path) / EXPORT_METADATA_FILE
            metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
            if self.score_prompt is None:
                self.score_prompt = bool(metadata.get("trained_with_prompt"))
            if self.max_length is None:
                self.max_length = metadata.get("max_length", 512)
            self._model = freeze_for_inference(model)
            self._tokenizer = tokenizer
        self._model.to(device)
        return self

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: reward model output}``, shape ``(batch,)``."""
        if self._model is None:
            self.setup()
        responses = texts_to_score(None, responses)
        if self.score_prompt:
            if len(prompts) != len(responses):
                raise ValueError(
                    f"got {len(prompts)} prompts for {len(responses)} responses: pass one prompt per response"
                )
            texts, pairs = texts_to_score(None, prompts), responses
        else:
            texts, pairs = responses, None
        logits = sequence_classifier_logits(
            self._model, self._tokenizer, texts, self.batch_size, self.max_length, text_pairs=pairs
        )
        return {self.name: logits[:, 0]}
