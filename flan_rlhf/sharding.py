"""Fully sharded data parallel (torch FSDP2, ``fully_shard``) for the actor-critic.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` sets up the process group
and a device mesh and then calls the module's ``configure_model``, which shards through
:func:`shard_actor`; the strategy never wraps the model itself. Sharding units follow the model's
own ``_no_split_modules`` (T5: every ``T5Block``; BART: every encoder and decoder layer), the
convention accelerate's FSDP auto-wrap uses. What is left outside the blocks (embeddings,
``lm_head``, final norms) is the base model's own unit, and the value head is a unit of its own.

Every unit is sharded along dim 0 across the data-parallel mesh: frozen base weights, LoRA
weights and the value head alike (a LoRA matrix is one more parameter of its block's unit).
A forward all-gathers a unit's weights and frees them after; a backward reduce-scatters the
gradients of the trainable ones, so every process ends each step with the same adapter, as
DDP's all-reduce gives. The reference policy is the same sharded weights with the adapters off.

Sampling steps the decoder once per token: gathering every block at every step would be one
all-gather per block per token. :func:`gathered_weights` gathers each unit once for a whole
rollout instead and frees them after, so a rollout holds the full weights for its duration, as a
DDP process always does (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html,
``FSDPModule.unshard`` / ``reshard``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The submodules of a Hugging Face model named in its ``_no_split_modules`` (its layers), in
    module order; empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_actor(actor: nn.Module, mesh) -> None:
    """Apply FSDP2 ``fully_shard`` to the actor-critic in place, on the data-parallel ``mesh``.

    Units: each layer of the policy's base model (:func:`sharding_units`), then the base model
    itself (what remains: embeddings, ``lm_head``, norms), the frozen reference copy of full
    fine-tuning the same way, and the value head. Parameters become ``DTensor`` shards.
    """
    from torch.distributed.fsdp import fully_shard

    for model in (actor.base_model, actor.frozen_reference):
        if model is None:
            continue
        units = sharding_units(model)
        if not units:
            raise ValueError(f"{type(model).__name__} names no layers in _no_split_modules, so there is nothing to "
                             "shard by layer: use strategy ddp for this model")
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if actor.value_head is not None:
        fully_shard(actor.value_head, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or any submodule."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(sub, FSDPModule) for sub in module.modules())


@contextmanager
def gathered_weights(module: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit under ``module`` holds its full weights inside the block, freed at its end.

    Inside, weights can be read directly (the encoder called on its own, the value head on a
    hidden state) and a forward gathers nothing. A no-op for a module that is not sharded.
    Collective: every process must enter together.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    inner = {id(sub) for unit in units for sub in unit.modules() if sub is not unit}
    roots = [unit for unit in units if id(unit) not in inner]
    for root in roots:
        # FSDP2 makes the first unit to run forward the root of everything under it: a rollout
        # calls the encoder (a block first) directly, so make each top unit the root now
        root._get_fsdp_state()._lazy_init()
    for unit in units:
        if id(unit) in inner:  # a root keeps its weights after forward anyway; a layer would free them
            unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            if id(unit) in inner:
                unit.set_reshard_after_forward(True, recurse=False)  # fully_shard's default for a non-root unit


def full_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every sharded tensor gathered whole, on process 0's CPU (``{}`` on the others).

    Collective: every process must call it (torch's ``get_model_state_dict`` with ``full_state_dict``).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# Private API (pinned by tests/test_private_apis.py):
# - ``FSDPModule._get_fsdp_state()._lazy_init()`` (torch 2.13): FSDP2 picks its root lazily, as the first
#   unit to run forward; ``gathered_weights`` makes each top unit the root before a rollout calls the encoder
#   (whose first block is a unit) directly. No public call does it.
