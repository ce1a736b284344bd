"""Fully sharded data parallel (torch FSDP2, ``fully_shard``) for the actor-critic.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` sets up the process group
and a device mesh and then calls the module's ``configure_model``, which shards through
:func:`shard_actor`; the strategy never wraps the model itself. Sharding units follow the model's
own ``_no_split_modules`` (T5: every ``T5Block``; BART: every encoder and decoder layer), the
convention accelerate's FSDP auto-wrap uses. Everything outside the layers (embeddings, final
norms, ``lm_head``) is one more unit, and the value head another (:func:`shard_actor`).

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
    return [module for module in model.modules() if any(cls.__name__ in names for cls in type(module).__mro__)]


def shard_actor(actor: nn.Module, mesh) -> None:
    """Apply FSDP2 ``fully_shard`` to the actor-critic in place, on the data-parallel ``mesh``.

    Units, for the policy's base model and the frozen reference copy of full fine-tuning alike:

    * each layer (:func:`sharding_units`);
    * every module outside the layers that holds parameters (:func:`outside_layers`: the token
      embeddings, final norms, ``lm_head``), as one unit, because transformers 5 ties the
      encoder's, decoder's and model's embedding modules through one shared parameter (and BART
      ties ``lm_head`` to it too). Leaf modules, not the encoder and decoder: FSDP2 swaps a unit's
      class, and transformers finds the hidden states a model returns by its class. Kept gathered
      after a forward (``reshard_after_forward=False``, freed after the backward or the rollout),
      so the encoder can be called on its own (a rollout, DPO's one encoder pass per prompt);
    * the model itself, the root (nothing of its own left to shard);

    and the value head. Parameters become ``DTensor`` shards. Each root is initialised here, so the
    encoder's own forward running first does not make it a root.
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
            unit.frees_weights_after_forward = True  # fully_shard's default for a unit that is not a root
        fully_shard(outside_layers(model, units), mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
        model._get_fsdp_state()._lazy_init()  # the root: the first unit to run forward otherwise
    if actor.value_head is not None:
        fully_shard(actor.value_head, mesh=mesh)
        actor.value_head._get_fsdp_state()._lazy_init()


def outside_layers(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    """The submodules of ``model`` outside every module in ``layers`` that hold parameters of their own,
    in module order (FLAN-T5: ``shared``, the encoder's and decoder's ``embed_tokens`` and
    ``final_layer_norm``, ``lm_head``)."""
    inside = {id(sub) for layer in layers for sub in layer.modules()}
    return [module for module in model.modules()
            if id(module) not in inside and any(True for _ in module.parameters(recurse=False))]


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
    layers = [unit for unit in units if getattr(unit, "frees_weights_after_forward", False)]
    for unit in layers:  # the layers, which free their weights after a forward, keep them inside
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in layers:
            unit.set_reshard_after_forward(True, recurse=False)


def load_full_state_dict(module: nn.Module, state: dict, strict: bool = True) -> None:
    """``module.load_state_dict(state)`` of whole tensors (a checkpoint's), into its shards when it is sharded."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def gather_whole(state: dict, keep: bool) -> dict:
    """Each (sharded ``DTensor``) tensor of ``state`` gathered whole, in order; the CPU copies when ``keep``
    (process 0), else ``{}``. Collective: every process passes the same keys in the same order."""
    whole = {}
    for key, value in state.items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        if keep:
            whole[key] = value.detach().cpu()
    return whole


def full_state_dict(module: nn.Module) -> dict:
    """``module.state_dict()`` with every sharded tensor gathered whole, on process 0's CPU (``{}`` on the others).

    Collective: every process must call it.
    """
    import torch.distributed as dist

    return gather_whole(module.state_dict(), keep=dist.get_rank() == 0)


# Private API (pinned by tests/test_private_apis.py):
# - ``FSDPModule._get_fsdp_state()._lazy_init()`` (torch 2.13): FSDP2 picks its root lazily, as the first
#   unit to run forward; ``shard_actor`` makes the model the root before a rollout or DPO calls the encoder
#   (a unit of its own) directly. No public call does it.
