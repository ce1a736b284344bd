"""Reward sources behind one interface (:class:`Reward`): text in, scores out, higher is better.

Offline out of the box: :class:`ProfanityReward`, :class:`VaderReward`. Needing a download (or
a local copy): :class:`DetoxifyReward`, :class:`ClassifierReward`,
:class:`SentimentClassifierReward`. Trained here: :class:`PreferenceReward` (the folder that
:class:`flan_rlhf.reward_model.PreferenceRewardModel` exports). Combine with :class:`CompositeReward`.
"""
from __future__ import annotations

from flan_rlhf.rewards.base import Reward, RewardOutputError, check_scores
from flan_rlhf.rewards.classifier import ClassifierReward, label_index
from flan_rlhf.rewards.composite import CompositeReward
from flan_rlhf.rewards.detoxify_reward import DETOXIFY_MODEL_TYPES, DetoxifyReward
from flan_rlhf.rewards.preference_reward import PreferenceReward
from flan_rlhf.rewards.profanity import ProfanityReward
from flan_rlhf.rewards.sentiment import SentimentClassifierReward, VaderReward

__all__ = [
    "ClassifierReward",
    "CompositeReward",
    "DETOXIFY_MODEL_TYPES",
    "DetoxifyReward",
    "PreferenceReward",
    "ProfanityReward",
    "Reward",
    "RewardOutputError",
    "SentimentClassifierReward",
    "VaderReward",
    "check_scores",
    "label_index",
]
