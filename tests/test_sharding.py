"""flan_rlhf.sharding and flan_rlhf.sharded_strategy in one process: FSDP2 over a one-process gloo group.

Two-process runs (real shards, equality with DDP, resume) are in tests/test_fsdp2.py; here the wiring:
which modules become units, that a sharded actor computes what the plain one does through every path
a rollout takes (the encoder and the value head called on their own too), with and without
``gathered_weights``, and the optimizer-state re-keying by hand.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from flan_rlhf.policy import ActorCritic, LoraSettings, load_policy_model
from flan_rlhf.rollout import sample_with_statistics
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.sharded_strategy import by_name, by_position, optimizer_parameter_names
from flan_rlhf.sharding import full_state_dict, gathered_weights, is_sharded, outside_layers, shard_actor, sharding_units
from flan_rlhf.t5_fused import set_fused_kernels
from tests.conftest import tiny_policy_spec


@pytest.fixture(scope="module")
def mesh():
    """A one-process gloo group and its device mesh (torch's own FileStore-free HashStore)."""
    from torch.distributed.device_mesh import init_device_mesh

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


def actors(bart_dir: str | None = None) -> tuple[ActorCritic, ActorCritic, object]:
    """A tiny LoRA actor (FLAN-T5, or the BART saved in ``bart_dir``) with trained-looking (non-zero)
    adapters, an identical copy to shard, the tokenizer."""
    torch.manual_seed(0)
    if bart_dir is None:
        model, tokenizer = load_policy_model(tiny_policy_spec())
        actor = ActorCritic(model, LoraSettings(r=4, alpha=8))
    else:
        from transformers import BartForConditionalGeneration, ByT5Tokenizer

        from tests.test_other_architectures import BART_LORA

        model, tokenizer = BartForConditionalGeneration.from_pretrained(bart_dir), ByT5Tokenizer()
        actor = ActorCritic(model, BART_LORA)
    for name, parameter in actor.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    set_fused_kernels(actor.base_model, False)  # what OnPolicyModule.configure_model does under sharding
    return actor, copy.deepcopy(actor), tokenizer


def test_units_are_the_models_own_layers_and_what_lies_outside_them():
    model, _ = load_policy_model(tiny_policy_spec())
    units = sharding_units(model)
    assert [type(unit).__name__ for unit in units] == ["T5Block"] * (2 * model.config.num_layers)
    assert sharding_units(torch.nn.Linear(2, 2)) == []
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    assert [names[id(module)] for module in outside_layers(model, units)] == [
        "shared", "encoder.embed_tokens", "encoder.final_layer_norm", "decoder.embed_tokens",
        "decoder.final_layer_norm", "lm_head"]


@pytest.mark.parametrize("architecture", ["flan-t5", "bart"])
def test_sharded_actor_computes_what_the_plain_one_does_on_every_path(mesh, architecture, request):
    """BART ties ``lm_head`` to the embedding, FLAN-T5 does not: both through the same units."""
    plain, sharded, tokenizer = actors(request.getfixturevalue("bart_dir") if architecture == "bart" else None)
    shard_actor(sharded, mesh)
    assert is_sharded(sharded) and not is_sharded(plain)
    assert all(type(p).__name__ == "DTensor" for p in sharded.parameters())
    ids = torch.randint(3, 200, (3, 7))
    mask = torch.ones_like(ids)
    decoder = torch.randint(3, 200, (3, 5))
    # teacher-forced policy and value head, with gradients, through the units' own hooks
    logits, values = plain(ids, mask, decoder)
    sharded_logits, sharded_values = sharded(ids, mask, decoder)
    torch.testing.assert_close(sharded_logits, logits)
    torch.testing.assert_close(sharded_values, values)
    (sharded_logits.mean() + sharded_values.mean()).backward()
    (logits.mean() + values.mean()).backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, parameter in sharded.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter.grad.full_tensor(), grads[name], msg=name)
    # the reference (adapters off) and a rollout: the encoder and the value head are called directly
    settings = GenerationSettings(max_new_tokens=6)
    with gathered_weights(sharded):
        torch.manual_seed(1)
        rollout = sample_with_statistics(sharded, ids, mask, settings, tokenizer)
        reference = sharded.reference_logits(ids, mask, decoder)
    torch.manual_seed(1)
    expected = sample_with_statistics(plain, ids, mask, settings, tokenizer)
    assert torch.equal(rollout.responses, expected.responses)
    torch.testing.assert_close(rollout.logprobs, expected.logprobs)
    torch.testing.assert_close(rollout.values, expected.values)
    torch.testing.assert_close(reference, plain.reference_logits(ids, mask, decoder))
    # without gathered_weights each layer gathers its weights at each step: the same draws, more collectives
    torch.manual_seed(1)
    per_step = sample_with_statistics(sharded, ids, mask, settings, tokenizer)
    assert torch.equal(per_step.responses, expected.responses)
    torch.testing.assert_close(per_step.values, expected.values)


def test_full_state_dict_gathers_every_weight(mesh):
    plain, sharded, _ = actors()
    shard_actor(sharded, mesh)
    state = full_state_dict(sharded)
    own = plain.state_dict()
    assert sorted(state) == sorted(own)
    assert all(type(value) is torch.Tensor and torch.equal(value, own[key]) for key, value in state.items())


def test_optimizer_state_rekeying_by_hand():
    named = {"state": {"b": {"step": 1}, "c": {"step": 2}},
             "param_groups": [{"lr": 0.1, "params": ["a", "b"]}, {"lr": 0.2, "params": ["c"]}]}
    positional = by_position(named, ["a", "b", "c"])
    assert positional == {"state": {1: {"step": 1}, 2: {"step": 2}},
                          "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}]}
    assert by_name(positional, ["a", "b", "c"]) == named
    # the positions are the ones optimizer.state_dict() uses
    layers = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    layers[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in layers.parameters() if p.requires_grad])
    assert optimizer_parameter_names(layers, optimizer) == ["0.bias", "1.weight", "1.bias"]
    assert optimizer.state_dict()["param_groups"][0]["params"] == [0, 1, 2]


@pytest.mark.parametrize("strategy, model, refusal", [
    ({"class_path": "lightning.pytorch.strategies.FSDPStrategy"}, "flan_rlhf.module.PPOModule", "FSDP1 strategy is not supported"),
    ("fsdp", "flan_rlhf.module.PPOModule", "FSDP1 strategy is not supported"),
    ({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}, "flan_rlhf.module.PPOModule", "tensor parallel"),
    ({"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}, "flan_rlhf.sft.SFTModule", "not SFTModule - train it with strategy ddp"),
    ({"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}, "flan_rlhf.reward_model.PreferenceRewardModel", "not PreferenceRewardModel"),
    ({"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}, "flan_rlhf.dpo_module.DPOModule", None),
    ({"class_path": "flan_rlhf.sharded_strategy.FSDP2Strategy"}, "flan_rlhf.critic_free.RLOOModule", None),
    ("ddp", "flan_rlhf.sft.SFTModule", None),
])
def test_strategies_a_module_cannot_run_under_are_refused_before_anything_is_built(strategy, model, refusal):
    from flan_rlhf.settings import SettingsError
    from flan_rlhf.sharded_strategy import check_strategy

    if refusal is None:
        check_strategy(strategy, {"class_path": model})
    else:
        with pytest.raises(SettingsError, match=refusal):
            check_strategy(strategy, {"class_path": model})


def test_fit_under_deepspeed_without_the_package_is_one_line(tmp_path):
    import importlib.util

    import yaml

    from tests.conftest import error_lines, run_command

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    overlay = tmp_path / "deepspeed.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "devices": 1}}))
    code, _, err = run_command("fit", "--config", "configs/tiny.yaml", "--config", "configs/deepspeed_zero2.yaml",
                               "--config", str(overlay))
    assert code == 2
    assert error_lines(err) == ["error: trainer.strategy lightning.pytorch.strategies.DeepSpeedStrategy needs the "
                                "deepspeed package and CUDA GPUs: pip install 'flan-rlhf[deepspeed]' on a GPU machine "
                                "(configs/deepspeed_zero2.yaml says how), or shard on any machine with --config "
                                "configs/fsdp.yaml (flan_rlhf.sharded_strategy.FSDP2Strategy)"]


def test_full_fine_tuning_checkpoint_holds_the_whole_sharded_reference_and_loads_it_back():
    """``lora: null`` over a base built from ``t5_config``: the checkpoint keeps the frozen reference, which under
    FSDP2 is gathered whole (a shard would neither load with ``weights_only`` nor fit the other processes)."""
    from torch.distributed.device_mesh import init_device_mesh

    from flan_rlhf.module import PPOModule
    from tests.conftest import TokenFractionReward

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        modules = []
        for _ in range(2):
            torch.manual_seed(0)
            module = PPOModule(policy=tiny_policy_spec(), reward=TokenFractionReward(), lora=None)
            module._device_mesh = mesh  # what ModelParallelStrategy sets before configure_model
            module.configure_model()
            modules.append(module)
        saved, resumed = modules
        assert is_sharded(saved.actor.frozen_reference)
        with torch.no_grad():
            for parameter in saved.actor.frozen_reference.parameters():
                parameter.add_(0.5)  # a reference the fresh module does not have
        checkpoint = {"state_dict": full_state_dict(saved)}
        saved.on_save_checkpoint(checkpoint)
        reference = checkpoint["flan_rlhf_reference"]
        assert reference and all(type(value) is torch.Tensor for value in reference.values())
        reference = {key: value.clone() for key, value in reference.items()}  # loading distributes the dict's tensors in place
        resumed.on_load_checkpoint(checkpoint)
        restored = full_state_dict(resumed.actor.frozen_reference)
        assert sorted(restored) == sorted(reference)
        assert all(torch.equal(restored[key], reference[key]) for key in reference)
    finally:
        if started:
            dist.destroy_process_group()


def test_an_unknown_rollout_weights_is_one_line():
    from tests.conftest import error_lines, run_command

    code, _, err = run_command("fit", "--config", "configs/tiny.yaml", "--config", "configs/fsdp.yaml",
                               "--trainer.strategy.init_args.rollout_weights", "fast")
    assert code == 2
    assert len(error_lines(err)) == 1 and "rollout_weights" in error_lines(err)[0] and "'gathered', 'sharded'" in err


def test_a_lora_checkpoint_over_a_named_base_gathers_only_what_it_keeps(mesh, tmp_path):
    """With a base that loads again from its name, the strategy gathers the LoRA and value-head tensors for a
    checkpoint, not the frozen base weights the module would drop anyway."""
    from flan_rlhf.module import PPOModule
    from flan_rlhf.policy import PolicySpec
    from flan_rlhf.sharding import gather_whole
    from tests.conftest import TokenFractionReward

    base, _ = load_policy_model(tiny_policy_spec())
    base.save_pretrained(tmp_path / "base")
    module = PPOModule(policy=PolicySpec(name_or_path=str(tmp_path / "base"), tokenizer="byt5"),
                       reward=TokenFractionReward(), lora=LoraSettings(r=4, alpha=8))
    module.configure_model()
    shard_actor(module.actor, mesh)
    state = module.state_dict()
    kept = module.checkpointed_keys(state)
    trainable = {f"actor.{name}" for name, p in module.actor.named_parameters() if p.requires_grad}
    assert kept == trainable and any("lora_A" in key for key in kept) and any("value_head" in key for key in kept)
    whole = gather_whole({key: state[key] for key in sorted(kept)}, keep=True)
    assert all(type(value) is torch.Tensor for value in whole.values())
    assert gather_whole({key: state[key] for key in sorted(kept)}, keep=False) == {}
    # the module's own filter keeps the same keys from a full state (what DDP hands it)
    checkpoint = {"state_dict": full_state_dict(module)}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == kept
