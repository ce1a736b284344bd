"""Reward models trained here from preference pairs (Bradley-Terry), and the pairs they learn from.

The trained folder is scored by :class:`flan_rlhf.rewards.PreferenceReward`.
"""
from flan_rlhf.reward_model.data import PreferenceDataModule
from flan_rlhf.reward_model.model import PreferenceRewardModel, bradley_terry_loss, pairwise_accuracy
from flan_rlhf.reward_model.synthetic import (
    TINY_REWARD_MODEL_CONFIG,
    SyntheticPreferenceDataModule,
    make_preference_pairs,
)

__all__ = [
    "PreferenceDataModule",
    "PreferenceRewardModel",
    "SyntheticPreferenceDataModule",
    "TINY_REWARD_MODEL_CONFIG",
    "bradley_terry_loss",
    "make_preference_pairs",
    "pairwise_accuracy",
]
