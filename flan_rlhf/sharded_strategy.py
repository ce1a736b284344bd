"""``FSDP2Strategy``: Lightning's ModelParallelStrategy for fully sharded data parallel, with DDP's checkpoints.

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` runs torch's FSDP2
(``fully_shard``) on GPUs and, with gloo, on CPUs (its ``FSDPStrategy``, FSDP1, refuses the CPU).
This subclass fixes two things for flan-rlhf:

* the mesh is data parallel only (every process a data-parallel rank, tensor-parallel size 1),
  so ``devices`` and ``num_nodes`` are all a user sets, as with DDP;
* checkpoints are DDP's: one file, written on process 0 through the trainer's ``CheckpointIO``
  (flan-rlhf's atomic writer: ``<name>.tmp-<pid>``, fsync, rename), holding the full tensors of what
  the module keeps (LoRA and the value head). A run saved under DDP resumes under FSDP2 and back,
  and ``flan-rlhf export --ckpt_path`` reads either. Lightning's sharded checkpoint (a folder of
  ``.distcp`` shards written in place) has neither property.

Saving gathers the tensors the module keeps (its ``checkpointed_keys``: with LoRA over a named base,
LoRA and the value head only) into whole ones on process 0's host memory; loading maps the file on
every process and each copies out its own shard.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.strategy import Strategy

from flan_rlhf.checkpointing import AtomicCheckpointIO
from flan_rlhf.settings import SettingsError
from flan_rlhf.sharding import gather_whole, load_full_state_dict


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel over every process (torch FSDP2), with single-file atomic checkpoints.

    Args:
        rollout_weights: ``gathered`` (default): a rollout gathers every unit's weights once and frees
            them after it (:func:`flan_rlhf.sharding.gathered_weights`), so sampling runs as fast as
            under DDP and holds the whole model meanwhile, as DDP always does. ``sharded``: each layer
            gathers its weights at each decoding step and frees them after, so sampling holds no more
            than one layer, the embeddings and ``lm_head`` whole beyond the shards (for a model that
            does not fit one device), at one all-gather per layer per token
            (``benchmarks/sharded_throughput.py``).
        process_group_backend: ``None`` picks NCCL on GPUs and gloo on CPUs.
        timeout: collective timeout, as for DDP.
    """

    ROLLOUT_WEIGHTS = ("gathered", "sharded")

    def __init__(self, rollout_weights: Literal["gathered", "sharded"] = "gathered", process_group_backend: str | None = None,
                 **kwargs: Any) -> None:
        if kwargs.keys() - {"timeout"}:
            raise TypeError(f"FSDP2Strategy takes rollout_weights, process_group_backend and timeout, not "
                            f"{sorted(kwargs.keys() - {'timeout'})}: its mesh is every process data parallel and its "
                            "checkpoints are single files")
        if rollout_weights not in self.ROLLOUT_WEIGHTS:
            raise SettingsError(f"FSDP2Strategy rollout_weights is {rollout_weights!r} - use one of "
                                f"{', '.join(map(repr, self.ROLLOUT_WEIGHTS))}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, **kwargs)
        self.rollout_weights = rollout_weights
        self.checkpoint_io = AtomicCheckpointIO()

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the number of nodes; here it is every process
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's state with each kept tensor gathered whole, on process 0's CPU (``{}`` elsewhere).

        Only the keys the module keeps (``checkpointed_keys``: with LoRA over a named base, LoRA and the
        value head) are gathered, not the frozen base weights it would drop. Collective.
        """
        module = self.lightning_module
        state = module.state_dict()
        keep = module.checkpointed_keys(state) if hasattr(module, "checkpointed_keys") else set(state)
        return gather_whole({key: value for key, value in state.items() if key in keep}, self.global_rank == 0)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        # every process has gathered its shards into checkpoint (lightning_module_state_dict, optimizer_state);
        # process 0 writes the one file through the CheckpointIO, as Strategy does for DDP
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """The whole checkpoint on every process (the module checks and loads its ``state_dict`` as under DDP),
        memory-mapped: the processes of a node share one copy of the file's tensors in the page cache, and
        each copies only its shards out of it."""
        from flan_rlhf.checkpointing import read_checkpoint_file

        return read_checkpoint_file(str(checkpoint_path), trusted=weights_only is False, mmap=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Each process keeps its shard of every full tensor in ``checkpoint["state_dict"]``."""
        load_full_state_dict(self.model, checkpoint["state_dict"], strict=strict)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        """The optimizer's full state as ``optimizer.state_dict()`` keys it (parameter positions), as DDP saves it.

        Collective; process 0 gets the state, the others ``{}``.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        named = get_optimizer_state_dict(self.model, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return by_position(named, optimizer_parameter_names(self.model, optimizer)) if named else {}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """Each optimizer's full state (keyed by position, from DDP or FSDP2) into this process's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            named = by_name(state, optimizer_parameter_names(self.model, optimizer))
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named,
                                     options=StateDictOptions(full_state_dict=True))


def optimizer_parameter_names(model, optimizer) -> list[str]:
    """The names (in ``model``) of the optimizer's parameters, in its param-group order."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def by_position(named_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch's ``get_optimizer_state_dict``) re-keyed by position
    in ``names`` (what ``optimizer.state_dict()`` gives: group params ``[0, 1, ...]`` across groups).

    Example: ``by_position({"state": {"b": s}, "param_groups": [{"params": ["a", "b"]}]}, ["a", "b"])``
    is ``{"state": {1: s}, "param_groups": [{"params": [0, 1]}]}``.
    """
    position = {name: index for index, name in enumerate(names)}
    return {"state": {position[name]: value for name, value in named_state["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in named_state["param_groups"]]}


def by_name(positional_state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`by_position`."""
    return {"state": {names[index]: value for index, value in positional_state["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                             for group in positional_state["param_groups"]]}


FSDP2_CONFIG = "--config configs/fsdp.yaml (flan_rlhf.sharded_strategy.FSDP2Strategy)"


def _class_path(config: Any) -> str:
    """A ``class_path`` from a parsed ``trainer.strategy`` or ``model`` setting; a string strategy as given."""
    if config is None or isinstance(config, str):
        return config or ""
    getter = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    return str(getter("class_path", "") or type(config).__module__ + "." + type(config).__qualname__)


def check_strategy(strategy: Any, model: Any) -> None:
    """Refuse, before anything is built, a ``trainer.strategy`` the module cannot train under.

    ``strategy`` and ``model``: the parsed settings (a class_path namespace, a strategy name, or an
    instance). Refused: Lightning's FSDP1 ``FSDPStrategy`` (GPU only, and its flat parameters need
    ``use_orig_params`` for LoRA's frozen and trainable weights side by side), a plain
    ``ModelParallelStrategy`` (its default mesh is tensor parallel), DeepSpeed without the
    ``deepspeed`` package, and ``FSDP2Strategy`` for a module that does not shard itself (SFT, the
    reward model: only the RL modules call :func:`flan_rlhf.sharding.shard_actor`).

    Raises:
        SettingsError: one line naming the strategy and what to use instead.
    """
    import importlib
    import importlib.util

    path = _class_path(strategy)
    name = path.rsplit(".", 1)[-1].lower()
    if name in ("fsdpstrategy", "fsdp") or name.startswith("fsdp_"):
        raise SettingsError(f"trainer.strategy {path}: Lightning's FSDP1 strategy is not supported (GPU only, and LoRA "
                            f"needs its use_orig_params) - flan-rlhf shards with torch's FSDP2: {FSDP2_CONFIG}, which "
                            "also runs on CPUs")
    if name == "modelparallelstrategy":
        raise SettingsError(f"trainer.strategy {path}: its default mesh is tensor parallel, which flan-rlhf does not "
                            f"do - shard data parallel with {FSDP2_CONFIG}")
    if "deepspeed" in name and importlib.util.find_spec("deepspeed") is None:
        raise SettingsError(f"trainer.strategy {path} needs the deepspeed package and CUDA GPUs: pip install "
                            "'flan-rlhf[deepspeed]' on a GPU machine (configs/deepspeed_zero2.yaml says how), or shard "
                            f"on any machine with {FSDP2_CONFIG}")
    if name == "fsdp2strategy" and model is not None:
        module_path = _class_path(model)
        module_name, _, class_name = module_path.rpartition(".")
        try:
            module_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError):
            return  # the model's own error comes when it is built
        from flan_rlhf.on_policy import OnPolicyModule

        if isinstance(module_class, type) and not issubclass(module_class, OnPolicyModule):
            raise SettingsError(f"trainer.strategy FSDP2Strategy shards the RL modules (PPO, RLOO, GRPO, DPO), not "
                                f"{class_name} - train it with strategy ddp (configs/ddp.yaml)")
