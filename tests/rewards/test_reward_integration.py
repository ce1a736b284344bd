"""Rewards inside PPO: composite components reach TensorBoard; a preference-trained RM drives a run."""
from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from flan_rlhf.module import PPOModule
from flan_rlhf.policy import LoraSettings
from flan_rlhf.reward_model import TINY_REWARD_MODEL_CONFIG, PreferenceRewardModel
from flan_rlhf.rewards import CompositeReward, PreferenceReward, ProfanityReward, VaderReward
from flan_rlhf.settings import GenerationSettings, PPOSettings
from tests.conftest import PROMPTS, ListPromptStream, tiny_policy_spec
from tests.test_cli import read_scalars


def _fit(reward, steps: int, logger=None, callbacks=()):
    module = PPOModule(policy=tiny_policy_spec(), reward=reward, lora=LoraSettings(r=4, alpha=8),
                       generation=GenerationSettings(max_new_tokens=8),
                       ppo=PPOSettings(learning_rate=1e-3, mini_batch_size=4, ppo_epochs=1), log_samples_every_n_steps=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger or False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1, callbacks=list(callbacks))
    trainer.fit(module, torch.utils.data.DataLoader(ListPromptStream(PROMPTS, 8), batch_size=None))
    return module, trainer


def test_composite_reward_logs_each_component_to_tensorboard(tmp_path):
    reward = CompositeReward([ProfanityReward(), VaderReward()], weights=[1.0, 0.5])
    _fit(reward, steps=2, logger=TensorBoardLogger(str(tmp_path), name="composite"))
    scalars = read_scalars(str(tmp_path))
    assert len(scalars["env/reward/non_profanity_mean"]) == 2
    assert len(scalars["env/reward/positivity_mean"]) == 2
    # the logged total is the weighted sum of the logged component means
    for total, tox, pos in zip(scalars["env/reward_mean"], scalars["env/reward/non_profanity_mean"],
                               scalars["env/reward/positivity_mean"]):
        assert math.isclose(total, tox + 0.5 * pos, rel_tol=1e-5, abs_tol=1e-6)


def test_ppo_runs_on_a_preference_trained_reward_model(tmp_path):
    reward_model = PreferenceRewardModel(model_config=TINY_REWARD_MODEL_CONFIG, tokenizer="byt5")
    reward_model.export(str(tmp_path / "rm"))
    reward = PreferenceReward(path=str(tmp_path / "rm"))
    seen: list[float] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["env/reward/preference_mean"]))

    module, trainer = _fit(reward, steps=2, callbacks=[Spy()])
    assert trainer.global_step == 2 and len(seen) == 2
    assert all(math.isfinite(value) for value in seen)
    # the same reward scores texts directly, one finite float per response
    prompts = ["a kind sentence", "a rude sentence"]
    direct = reward(prompts, ["thank you so much", "you are awful"])
    assert direct.shape == (2,) and torch.isfinite(direct).all()
