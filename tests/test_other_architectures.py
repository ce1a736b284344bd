"""PPO on an encoder-decoder that is not T5 (BART): the generic paths (the model's own forward, its
KV cache) must give the same numbers the fused T5 paths give for T5."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import BartForConditionalGeneration, ByT5Tokenizer

from flan_rlhf import t5_fused
from flan_rlhf.module import PPOModule
from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec
from flan_rlhf.rollout import collect_experience, evaluate_responses, response_mask, tokenize_prompts
from flan_rlhf.settings import GenerationSettings, PPOSettings
from tests.conftest import PROMPTS, ListPromptStream, TokenFractionReward

BART_LORA = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def test_bart_rollout_statistics_equal_a_teacher_forced_forward(bart_dir):
    model = BartForConditionalGeneration.from_pretrained(bart_dir)
    tokenizer = ByT5Tokenizer()
    actor = ActorCritic(model, BART_LORA)
    with torch.no_grad():
        for name, param in actor.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    assert not t5_fused.is_fused_t5(actor.base_model)
    ids, mask, _ = tokenize_prompts(tokenizer, PROMPTS[:4], 64, "cpu")
    torch.manual_seed(0)
    responses, logprobs, values, ref, _ = collect_experience(actor, ids, mask, GenerationSettings(max_new_tokens=8),
                                                             tokenizer, tokenizer.pad_token_id)
    tf_logprobs, tf_values, tf_ref, _ = evaluate_responses(actor, ids, mask, responses, tokenizer.pad_token_id, 1.0)
    keep = response_mask(responses, tokenizer.eos_token_id).bool()
    assert (logprobs - tf_logprobs)[keep].abs().max() < 1e-4
    assert (values - tf_values)[keep].abs().max() < 1e-4
    assert torch.allclose(ref, tf_ref, atol=1e-5)
    assert (ref - logprobs)[keep].abs().max() > 1e-3  # the reference (adapters off) is another model


def test_bart_ppo_fit_runs_and_trains_the_adapter(bart_dir):
    module = PPOModule(PolicySpec(name_or_path=bart_dir), TokenFractionReward(), lora=BART_LORA,
                       generation=GenerationSettings(max_new_tokens=8),
                       ppo=PPOSettings(learning_rate=1e-3, mini_batch_size=4, ppo_epochs=1),
                       log_samples_every_n_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = DataLoader(ListPromptStream(PROMPTS, 8), batch_size=None)
    module.configure_model()
    before = {k: v.clone() for k, v in module.actor.trainable_state_dict().items()}
    trainer.fit(module, train_dataloaders=loader)
    after = module.actor.trainable_state_dict()
    assert trainer.global_step == 2
    assert any("lora_" in k and not torch.equal(before[k], after[k]) for k in before)
