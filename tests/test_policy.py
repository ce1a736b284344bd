"""Policy loading, LoRA reference and value head."""
from __future__ import annotations

import pytest
import torch

from flan_rlhf.policy import ActorCritic, LoraSettings, ModelLoadError, PolicySpec, build_t5_from_config, load_policy_model
from flan_rlhf.rollout import response_mask, shift_right
from tests.conftest import tiny_policy_spec


def _inputs(vocab: int, batch: int = 3, prompt_len: int = 7, response_len: int = 5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    responses = torch.randint(3, vocab, (batch, response_len), generator=g)
    return ids, torch.ones_like(ids), shift_right(responses, 0)


def test_built_t5_is_flan_architecture_with_sane_initial_loss():
    model = build_t5_from_config(vocab_size=384, d_model=64, d_ff=128, num_layers=2, num_heads=4)
    assert model.config.feed_forward_proj == "gated-gelu"
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()  # untied, as FLAN-T5
    ids, mask, dec = _inputs(384)
    loss = model(input_ids=ids, attention_mask=mask, labels=dec).loss.item()
    # log(384) = 5.95; HF's default untied-head init (std 1) gives tens.
    assert 5.0 < loss < 8.0


def test_built_t5_stays_untied_after_save_and_reload(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = build_t5_from_config(vocab_size=384, d_model=32, d_ff=64, num_layers=1, num_heads=2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.shared.weight.data_ptr()
    torch.testing.assert_close(reloaded.lm_head.weight, model.lm_head.weight)
    ids, mask, dec = _inputs(384)
    model.eval()
    torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=dec).logits, model(input_ids=ids, decoder_input_ids=dec).logits)


def test_lora_reference_equals_base_model_and_adapters_change_policy():
    model, _ = load_policy_model(tiny_policy_spec())
    ids, mask, dec = _inputs(model.config.vocab_size)
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    actor = ActorCritic(model, LoraSettings(r=4, alpha=8))
    for name, p in actor.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    ref = actor.reference_logits(ids, mask, dec)
    # the reference runs the fused T5 path (flan_rlhf.t5_fused): equal up to float summation order
    torch.testing.assert_close(ref, base_logits, rtol=0, atol=1e-5)
    logits, values = actor(ids, mask, dec)
    assert values.shape == dec.shape
    assert (logits - ref).abs().max() > 1e-3  # the adapter is live outside reference_context
    trainable = {n for n, p in actor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)


def test_full_finetune_reference_is_frozen_copy():
    model, _ = load_policy_model(tiny_policy_spec())
    actor = ActorCritic(model, lora=None)
    ids, mask, dec = _inputs(model.config.vocab_size)
    before = actor.reference_logits(ids, mask, dec)
    with torch.no_grad():
        for p in actor.policy.parameters():
            p.add_(0.1)
    torch.testing.assert_close(actor.reference_logits(ids, mask, dec), before)
    assert not any(p.requires_grad for p in actor.frozen_reference.parameters())


def test_response_mask_keeps_first_eos_and_masks_after():
    eos = 1
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    assert torch.equal(response_mask(responses, eos), expected)


def test_shift_right_prepends_decoder_start():
    assert shift_right(torch.tensor([[4, 5, 6]]), 0).tolist() == [[0, 4, 5]]


def test_unknown_model_offline_gives_one_line_hint():
    with pytest.raises(ModelLoadError) as err:
        load_policy_model(PolicySpec(name_or_path="google/flan-t5-nonexistent-xyz"))
    message = str(err.value)
    assert "\n" not in message and "google/flan-t5-nonexistent-xyz" in message and "local" in message


def test_folder_that_is_not_seq2seq_is_rejected(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not an encoder-decoder"):
        load_policy_model(PolicySpec(name_or_path=str(tmp_path), tokenizer="byt5"))


def test_spec_without_source_is_rejected():
    with pytest.raises(ModelLoadError, match="name_or_path"):
        load_policy_model(PolicySpec())


def _saved_and_reloaded_t5(folder, **config):
    """A tiny T5 with dropout in its config, saved and loaded back: from_pretrained returns eval mode."""
    from transformers import AutoModelForSeq2SeqLM

    build_t5_from_config(vocab_size=384, d_model=32, d_ff=64, num_layers=1, num_heads=2, **config).save_pretrained(folder)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert not loaded.training
    return loaded


def _dropout_settings(module: torch.nn.Module) -> dict[str, float]:
    found = {}
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Dropout):
            found[f"{name}.p"] = sub.p
        found.update({f"{name}.{key}": value for key, value in vars(sub).items()
                      if isinstance(value, float) and ("dropout" in key or "layerdrop" in key)})
    return found


def test_a_loaded_policy_trains_in_train_mode_with_every_dropout_off(tmp_path):
    loaded = _saved_and_reloaded_t5(tmp_path, dropout_rate=0.1)
    assert max(_dropout_settings(loaded).values()) == pytest.approx(0.1)  # T5Attention.dropout and nn.Dropout
    actor = ActorCritic(loaded, LoraSettings())
    assert all(module.training for module in actor.policy.modules())
    assert set(_dropout_settings(actor.policy).values()) == {0.0}
    assert actor.base_model.config.dropout_rate == 0.0
    ids, mask, dec = _inputs(384)
    first, second = (actor.policy(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits for _ in range(2))
    assert torch.equal(first, second)


def test_bart_dropout_and_layerdrop_are_off_in_train_mode():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        dropout=0.3, attention_dropout=0.3, activation_dropout=0.3, encoder_layerdrop=0.5,
                        decoder_layerdrop=0.5)
    actor = ActorCritic(BartForConditionalGeneration(config), LoraSettings(r=2, alpha=4, target_modules=["q_proj"]))
    assert actor.policy.training and set(_dropout_settings(actor.policy).values()) == {0.0}
    ids = torch.randint(4, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first, second = (actor.policy(input_ids=ids, decoder_input_ids=ids[:, :5]).logits for _ in range(2))
    assert torch.equal(first, second)


def test_gradient_checkpointing_recomputes_the_blocks_of_a_loaded_policy(tmp_path):
    """HF checkpoints a layer only in train mode; a policy loaded in eval mode used to skip it silently."""
    actor = ActorCritic(_saved_and_reloaded_t5(tmp_path), LoraSettings(), gradient_checkpointing=True)
    calls = []
    # the block's own hook fires once either way; its first sub-layer runs again when recomputed
    actor.base_model.encoder.block[0].layer[0].register_forward_hook(lambda *args: calls.append(1))
    ids, mask, dec = _inputs(384)
    actor.policy(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits.square().mean().backward()
    assert len(calls) == 2  # the forward, then its recomputation in backward
