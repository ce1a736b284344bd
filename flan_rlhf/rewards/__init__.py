"""Reward sources behind one interface (:class:`Reward`): text in, scores out, higher is better.

Offline out of the box: :class:`ProfanityReward`, :class:`VaderReward`, :class:`WordListReward`. Needing a download (or
a local copy): :class:`DetoxifyReward`, :class:`ClassifierReward`,
:class:`SentimentClassifierReward`. Trained here: :class:`PreferenceReward` (the folder that
:class:`flan_rlhf.reward_model.PreferenceRewardModel` exports). Against each row's references (the
data's ``reference_columns``): :class:`RougeReward`, :class:`BleuReward`. Combine with :class:`CompositeReward`.
"""
from __future__ import annotations

from flan_rlhf.rewards.base import Reward, RewardOutputError, RewardReferencesError, check_scores
from flan_rlhf.rewards.classifier import ClassifierReward, label_index
from flan_rlhf.rewards.composite import CompositeReward
from flan_rlhf.rewards.detoxify_reward import DETOXIFY_MODEL_TYPES, DetoxifyReward
from flan_rlhf.rewards.preference_reward import PreferenceReward
from flan_rlhf.rewards.profanity import ProfanityReward
from flan_rlhf.rewards.reference import BleuReward, RougeReward
from flan_rlhf.rewards.sentiment import SentimentClassifierReward, VaderReward
from flan_rlhf.rewards.word_list import WordListReward

__all__ = [
    "BleuReward",
    "ClassifierReward",
    "CompositeReward",
    "DETOXIFY_MODEL_TYPES",
    "DetoxifyReward",
    "PreferenceReward",
    "ProfanityReward",
    "Reward",
    "RewardOutputError",
    "RewardReferencesError",
    "RougeReward",
    "SentimentClassifierReward",
    "VaderReward",
    "WordListReward",
    "check_scores",
    "label_index",
]
