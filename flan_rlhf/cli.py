"""``flan-rlhf``: LightningCLI (fit / validate / test / predict) plus a few tool subcommands.

Training stages are LightningModules chosen in YAML (``model: class_path: ...``):
:class:`flan_rlhf.module.PPOModule`, :class:`flan_rlhf.sft.SFTModule`,
:class:`flan_rlhf.rewards.PreferenceRewardModel`.

Tool subcommands (own argument parsers, ``flan-rlhf <cmd> --help``) are listed in ``TOOLS``.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from flan_rlhf.checkpointing import AtomicCheckpointIO, newest_complete_checkpoint

log = logging.getLogger(__name__)

# subcommand -> "module:function" taking argv and returning an exit code
TOOLS = {
    "score": "flan_rlhf.score:main",
    "export": "flan_rlhf.export_cli:main",
    "generate": "flan_rlhf.generate_cli:main",
    "compare": "flan_rlhf.eval.compare:main",
    "demo": "flan_rlhf.demo.pipeline:main",
}

# Strategies that write checkpoints through the CheckpointIO plugin (DeepSpeed writes its own folder).
_ATOMIC_IO_STRATEGIES = {None, "auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device", "fsdp"}


class FlanRLHFCLI(LightningCLI):
    """LightningCLI with atomic checkpoint writes and crash-safe ``--ckpt_path`` resolution."""

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        strategy = trainer_config.get("strategy")
        if not trainer_config.get("plugins") and (strategy is None or isinstance(strategy, str)) and strategy in _ATOMIC_IO_STRATEGIES:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._resolve_ckpt_path("fit")

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        requested = config.get("ckpt_path")
        if not requested:
            return
        callback = self.trainer.checkpoint_callback
        checkpoint_dir = getattr(callback, "dirpath", None)
        if requested != "last" and not os.path.exists(requested):
            raise SystemExit(f"error: checkpoint '{requested}' does not exist - pass an existing .ckpt file or --ckpt_path last")
        path, messages = newest_complete_checkpoint(requested, checkpoint_dir)
        for message in messages:
            print(message, file=sys.stderr, flush=True)
        if path is None:
            if requested == "last":
                print(f"no complete checkpoint in {checkpoint_dir}; starting from scratch", file=sys.stderr, flush=True)
                config["ckpt_path"] = None
                return
            raise SystemExit(f"error: no complete checkpoint found for '{requested}' - pass another checkpoint or start without --ckpt_path")
        config["ckpt_path"] = path


def run_lightning_cli(args: list[str] | None = None) -> FlanRLHFCLI:
    """Run the LightningCLI with ``args`` (``None``: ``sys.argv``)."""
    return FlanRLHFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``flan-rlhf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] in TOOLS:
        module_name, function = TOOLS[argv[0]].split(":")
        return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
