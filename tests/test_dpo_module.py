"""DPOModule: DPO / IPO from stored pairs and from the policy's own ranked samples (issue 28)."""
from __future__ import annotations

import lightning as L
import pytest
import torch

import flan_rlhf.dpo_module as dpo_module
from flan_rlhf.data.loading import DataConfigError
from flan_rlhf.dpo_module import DPOModule, MissingRewardError
from flan_rlhf.policy import LoraSettings
from flan_rlhf.reward_model.synthetic import SyntheticPreferenceDataModule
from flan_rlhf.settings import DPOSettings, GenerationSettings, SettingsError
from tests.conftest import ScriptedReward, TokenFractionReward, tiny_policy_spec
from tests.test_module import MetricsRecorder, assert_reward_rose, fit, trainable_copy


def make(reward=None, max_new_tokens: int = 8, truncate_prompt_tokens: int = 512,
         sampling: GenerationSettings | None = None, **overrides) -> DPOModule:
    """A DPOModule on the tiny policy (LoRA r 4): 4 samples per prompt, minibatches of 8 pairs, lr 5e-3."""
    settings = dict(learning_rate=5e-3, mini_batch_size=8, samples_per_prompt=4)
    settings.update(overrides)
    return DPOModule(tiny_policy_spec(), reward, DPOSettings(**settings), lora=LoraSettings(r=4, alpha=8),
                     generation=sampling or GenerationSettings(max_new_tokens=max_new_tokens),
                     log_samples_every_n_steps=0,
                     truncate_prompt_tokens=truncate_prompt_tokens)


def stored_pairs_trainer(steps: int, recorder: MetricsRecorder | None = None) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, val_check_interval=steps,
                     check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[recorder] if recorder else [])


STEPS = 20  # steps of the stored-pair learning test


def pairs_data() -> SyntheticPreferenceDataModule:
    """Kind replies chosen over rude ones: 192 training pairs; 64 held-out pairs generated with another seed."""
    return SyntheticPreferenceDataModule(num_train=192, num_val=64, batch_size=16, stream=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_on_stored_pairs_raises_the_held_out_chosen_over_rejected_accuracy(loss_type):
    """Before training the policy is the reference (LoRA B = 0): every implicit reward is 0 and no held-out
    pair is ranked right; after 20 steps of 16 pairs nearly all are, by a wide margin."""
    module = make(mini_batch_size=16, loss_type=loss_type, beta=0.1 if loss_type == "sigmoid" else 0.5,
                  learning_rate=2e-3)
    data = pairs_data()
    trainer = stored_pairs_trainer(STEPS, MetricsRecorder())
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert before["val/rewards/accuracies"] == 0.0 and before["val/rewards/margins"] == 0.0
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics
    assert after["val/rewards/accuracies"].item() >= 0.9, after
    # IPO regresses the gap to 1 / (2 beta), so its margin beta * gap heads for 0.5; DPO's grows without bound
    assert after["val/rewards/margins"].item() > (0.2 if loss_type == "ipo" else 1.0)  # measured: 0.29, 3.5
    assert after["val/logps/chosen"].item() - after["val/logps/rejected"].item() > \
        before["val/logps/chosen"] - before["val/logps/rejected"]
    assert trainer.global_step == STEPS


def test_test_on_stored_pairs_logs_the_pair_statistics_and_sampling_without_a_reward_is_refused():
    module = make(None)
    results = stored_pairs_trainer(1).test(module, datamodule=pairs_data(), verbose=False)[0]
    assert results["test/rewards/accuracies"] == 0.0 and "test/logps/chosen" in results  # untrained: all ties
    with pytest.raises(MissingRewardError, match="needs a reward to score sampled responses"):
        module.score_rollout(["a prompt"], ["a response"])


def test_each_stored_batch_is_one_step_with_trls_statistics():
    recorder = MetricsRecorder()
    module = make(mini_batch_size=8)  # 16 pairs per batch: two minibatches, two optimiser steps per training step
    stored_pairs_trainer(3, recorder).fit(module, datamodule=pairs_data())
    assert len(recorder.rows) == 3
    row = recorder.rows[-1]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "dpo/loss"):
        assert key in row, sorted(row)
    assert row["dpo/pairs"] == 16.0 and row["dpo/updates"] == 2.0 and row["dpo/learning_rate"] == pytest.approx(5e-3)
    assert not any(key.startswith("ppo/") for key in row) and "guards/ratio_skipped" not in row
    assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)


def spy(module, monkeypatch) -> dict:
    """Record the iteration's rollout, each minibatch's pair indices, and the inputs of every loss."""
    seen = {"selected": [], "losses": []}
    original_rollout = module.rollout
    original_select = dpo_module.PairTokens.select
    original_loss = dpo_module.dpo.preference_loss

    def spy_rollout(prompts, settings, **kwargs):
        seen["rollout"] = original_rollout(prompts, settings, **kwargs)
        return seen["rollout"]

    def spy_select(self, pairs, lengths):
        seen["selected"].append(list(pairs))
        return original_select(self, pairs, lengths)

    def spy_loss(*args, **kwargs):
        seen["losses"].append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
        return original_loss(*args, **kwargs)

    monkeypatch.setattr(module, "rollout", spy_rollout)
    monkeypatch.setattr(dpo_module.PairTokens, "select", spy_select)
    monkeypatch.setattr(dpo_module.dpo, "preference_loss", spy_loss)
    return seen


@pytest.mark.parametrize("sampling", [None, GenerationSettings(max_new_tokens=8, min_new_tokens=3, temperature=0.8)])
def test_each_sampled_pair_is_its_groups_best_and_worst_scored_by_policy_and_rollout_reference(monkeypatch, sampling):
    """Row by row: pair j of a minibatch is prompt g's best and worst sample by reward; its reference
    log-probs are the rollout's reference pass summed over that response; its policy log-probs those of
    a teacher-forced forward of that response (before the first step the policy is the sampler, so they
    equal the rollout's own log-probs, under the sampling temperature and EOS ban too)."""
    module = make(TokenFractionReward(), mini_batch_size=3, ppo_epochs=1, sampling=sampling)
    seen = spy(module, monkeypatch)
    fit(module, steps=1, batch_size=6)
    rollout = seen["rollout"]
    k = module.settings.samples_per_prompt
    grouped = rollout.scores.reshape(-1, k)
    best = torch.arange(6) * k + grouped.argmax(1)
    worst = torch.arange(6) * k + grouped.argmin(1)
    sums = lambda logprobs: (logprobs * rollout.mask).sum(1)  # noqa: E731
    assert sorted(i for rows in seen["selected"] for i in rows) == list(range(6))  # every group, once
    first = True
    for rows, (policy_c, policy_r, ref_c, ref_r, *_) in zip(seen["selected"], seen["losses"]):
        rows = torch.tensor(rows)
        torch.testing.assert_close(ref_c, sums(rollout.ref_logprobs)[best[rows]])
        torch.testing.assert_close(ref_r, sums(rollout.ref_logprobs)[worst[rows]])
        if first:  # nothing has stepped yet
            torch.testing.assert_close(policy_c, sums(rollout.logprobs)[best[rows]], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(policy_r, sums(rollout.logprobs)[worst[rows]], atol=1e-4, rtol=1e-4)
            first = False


def test_online_dpo_raises_a_reward_the_policy_can_move():
    recorder = MetricsRecorder()
    fit(make(TokenFractionReward()), steps=30, batch_size=8, callbacks=[recorder])
    first, last = assert_reward_rose(recorder)
    assert last > 2 * first
    assert all(row["dpo/pairs"] >= 1 for row in recorder.rows)


def test_groups_whose_samples_tie_make_no_pair_and_no_step():
    """A constant reward ranks nothing: every pair is a placeholder, no optimiser step is taken (Adam
    would otherwise move the weights on its moments alone) and nothing changes."""
    module = make(ScriptedReward([], fallback=0.5))
    recorder = MetricsRecorder()
    fit(module, steps=1, batch_size=4, callbacks=[recorder])
    before = trainable_copy(module)
    fit_more = recorder.rows[-1]
    assert fit_more["dpo/pairs"] == 0.0 and fit_more["dpo/updates"] == 0.0
    assert fit_more["group/frac_reward_zero_std"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in trainable_copy(module).items())
    lora_b = [v for k, v in before.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)  # never stepped from its zero init


def test_prompts_without_a_reward_and_pairs_without_prompts_are_refused_before_any_model_loads():
    from flan_rlhf.data import PromptDataModule
    from flan_rlhf.reward_model.data import PreferenceDataModule

    module = make(None)
    with pytest.raises(MissingRewardError, match="needs a reward to sample and rank") as err:
        module.check_datamodule(PromptDataModule(builtin="tiny"))
    assert isinstance(err.value, SettingsError) and "\n" not in str(err.value)
    with pytest.raises(DataConfigError, match="set --data.init_args.prompt_column"):
        module.check_datamodule(PreferenceDataModule(dataset="pairs.jsonl"))
    module.check_datamodule(PreferenceDataModule(dataset="pairs.jsonl", prompt_column="prompt"))
    assert module.actor is None  # nothing was loaded
    make(TokenFractionReward()).check_datamodule(PromptDataModule(builtin="tiny"))


@pytest.mark.parametrize("field, value, expected", [
    ("loss_type", "hinge", "loss_type 'hinge' is unknown"),
    ("beta", -1.0, "beta is -1.0"),
    ("samples_per_prompt", 1, "samples_per_prompt is 1"),
    ("max_response_tokens", 1, "max_response_tokens is 1"),
])
def test_settings_dpo_cannot_run_with_are_refused_in_one_line(field, value, expected):
    with pytest.raises(SettingsError, match=expected) as err:
        make(TokenFractionReward(), **{field: value})
    assert "\n" not in str(err.value)


def test_the_shipped_stored_pairs_config_fits_and_exports_a_dpo_adapter(tmp_path, monkeypatch):
    """``flan-rlhf fit --config configs/dpo_tiny.yaml`` as shipped (outputs under tmp_path): it trains on the
    synthetic pairs, reports held-out accuracy, and exports an adapter whose card names DPO."""
    from pathlib import Path

    from safetensors.torch import load_file

    from tests.conftest import run_command

    config = Path(__file__).resolve().parent.parent / "configs" / "dpo_tiny.yaml"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_command("fit", "--config", str(config), "--trainer.max_steps=20",
                                 "--trainer.val_check_interval=20")
    assert code == 0, (out + err)[-3000:]
    adapter = tmp_path / "artifacts" / "dpo_tiny" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0  # trained
    card = (adapter / "README.md").read_text()
    assert "- Method: DPO (RLHF) with LoRA" in card and "- Reward: none: stored preference pairs" in card
    assert "prefer the chosen over the rejected response" in card and "| dpo.beta | 0.1 |" in card
    assert list((tmp_path / "lightning_logs" / "dpo_tiny").glob("*/checkpoints/last.ckpt"))


def test_monitors_watch_responses_sampled_for_the_held_out_pairs_prompts():
    """Training on stored pairs samples nothing, so validation samples each held-out prompt for the monitors."""
    from tests.test_logger_outputs import Spy

    monitor = Spy("length")
    module = DPOModule(tiny_policy_spec(), None, DPOSettings(), lora=LoraSettings(r=4, alpha=8), monitors=[monitor],
                       generation=GenerationSettings(max_new_tokens=8), log_samples_every_n_steps=0)
    data = pairs_data()
    results = stored_pairs_trainer(1).validate(module, datamodule=data, verbose=False)[0]
    data.setup("validate")
    held_out = [row for batch in data.val_dataloader() for row in batch["prompt"]]
    assert [prompt for batch in monitor.prompts for prompt in batch] == held_out  # 64 prompts, 4 batches of 16
    lengths = [len(text) for batch in monitor.seen for text in batch]
    assert results["val/monitor/length"] == pytest.approx(sum(lengths) / len(lengths))
    assert "val/rewards/accuracies" in results  # the pair statistics as before
