"""Reward sources behind one interface (:class:`Reward`): higher is better.

Offline out of the box: :class:`ProfanityReward`, :class:`VaderReward`. Needing a download (or
a local copy): :class:`DetoxifyReward`, :class:`ClassifierReward`,
:class:`SentimentClassifierReward`. Trained here: :class:`PreferenceReward` (from
:class:`PreferenceRewardModel`). Combine with :class:`CompositeReward`; shape with
:class:`RewardShaper`.

The Lightning-based classes (``PreferenceRewardModel``, ``PreferenceDataModule``,
``SyntheticPreferenceDataModule``, ...) are imported on first access (PEP 562), so scoring
with a reward does not pay Lightning's import time.
"""
from __future__ import annotations

import importlib

from flan_rlhf.rewards.base import Reward, RewardOutputError, check_scores
from flan_rlhf.rewards.classifier import ClassifierReward, label_index
from flan_rlhf.rewards.composite import CompositeReward
from flan_rlhf.rewards.detoxify_reward import DETOXIFY_MODEL_TYPES, DetoxifyReward
from flan_rlhf.rewards.preference_reward import PreferenceReward
from flan_rlhf.rewards.profanity import ProfanityReward
from flan_rlhf.rewards.sentiment import SentimentClassifierReward, VaderReward
from flan_rlhf.rewards.shaping import RewardShaper

_LAZY = {
    "PreferenceDataModule": "flan_rlhf.rewards.preference",
    "PreferenceRewardModel": "flan_rlhf.rewards.preference",
    "bradley_terry_loss": "flan_rlhf.rewards.preference",
    "pairwise_accuracy": "flan_rlhf.rewards.preference",
    "SyntheticPreferenceDataModule": "flan_rlhf.rewards.synthetic_preferences",
    "TINY_REWARD_MODEL_CONFIG": "flan_rlhf.rewards.synthetic_preferences",
    "make_preference_pairs": "flan_rlhf.rewards.synthetic_preferences",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClassifierReward",
    "CompositeReward",
    "DETOXIFY_MODEL_TYPES",
    "DetoxifyReward",
    "PreferenceDataModule",
    "PreferenceReward",
    "PreferenceRewardModel",
    "ProfanityReward",
    "Reward",
    "RewardOutputError",
    "RewardShaper",
    "SentimentClassifierReward",
    "SyntheticPreferenceDataModule",
    "TINY_REWARD_MODEL_CONFIG",
    "VaderReward",
    "bradley_terry_loss",
    "check_scores",
    "label_index",
    "make_preference_pairs",
    "pairwise_accuracy",
]
