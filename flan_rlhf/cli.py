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
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from flan_rlhf.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    checkpoints_newest_first,
    read_checkpoint_file,
    resolve_ckpt_path,
)

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
    """LightningCLI with atomic checkpoint writes, safe loads and crash-safe ``--ckpt_path`` resolution.

    Before each stage: ``--ckpt_path`` is resolved (``last`` = the newest *complete* checkpoint
    in the ``ModelCheckpoint`` folder; a missing or corrupt path is one clear error), and the
    reward is set up, so a reward that cannot load (a detoxify checkpoint missing offline)
    fails before any training.
    """

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        strategy = trainer_config.get("strategy")
        if not trainer_config.get("plugins") and (strategy is None or isinstance(strategy, str)) and strategy in _ATOMIC_IO_STRATEGIES:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        return super().instantiate_trainer(**kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning 2.6's step that reads ``hyper_parameters`` from ``--ckpt_path`` into the config,
        made safe: the path is checked first (missing or cut short: one line), the peek is a
        ``weights_only`` load that allows numpy arrays (Lightning's plain one refuses them), it
        honours ``--weights_only false``, and ``mmap`` leaves tensor data on disk.
        Mirrors ``LightningCLI._parse_ckpt_path`` (lightning/pytorch/cli.py) otherwise.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        stage_config = self.config[subcommand]
        requested = stage_config.get("ckpt_path")
        if not requested or requested == "last":
            return
        path = resolve_ckpt_path(requested, None, fresh_start_allowed=False).path
        if path is None or not os.path.isfile(path):
            return  # keywords and URLs: Lightning resolves them later
        checkpoint = read_checkpoint_file(path, trusted=stage_config.get("weights_only") is False, mmap=True)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_fit(self) -> None:
        self._resolve_ckpt_path("fit")
        self._set_up_reward()

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")
        self._set_up_reward()

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")
        self._set_up_reward()

    def before_predict(self) -> None:
        self._resolve_ckpt_path("predict")
        self._set_up_reward()

    def _checkpoint_dir(self) -> str | None:
        callback = self.trainer.checkpoint_callback
        return None if callback is None else getattr(callback, "dirpath", None)

    def _resolve_ckpt_path(self, subcommand: str) -> None:
        config = self.config_init[subcommand]
        checkpoint_dir = self._checkpoint_dir()
        requested = config.get("ckpt_path")
        if requested == "last":  # explicit paths were checked in _parse_ckpt_path
            resolution = resolve_ckpt_path(requested, checkpoint_dir, fresh_start_allowed=subcommand == "fit")
            for message in resolution.messages:
                _say(message)
            config["ckpt_path"] = resolution.path
        if subcommand == "fit" and not requested and checkpoint_dir and checkpoints_newest_first(checkpoint_dir):
            _say(f"warning: {checkpoint_dir} already holds checkpoints and this run starts from scratch, so it will "
                 "overwrite same-named ones - to continue the earlier run, stop and pass --ckpt_path last")

    def _set_up_reward(self) -> None:
        from flan_rlhf.rewards.base import Reward

        reward = getattr(self.model, "reward", None)
        if not isinstance(reward, Reward):
            return
        try:
            reward.setup("cpu")  # idempotent; the module moves it to its device later
        except (OSError, ValueError, ImportError) as err:
            raise RewardSetupError(f"reward '{reward.name}' cannot be set up: {_first_line(err)}") from err


class RewardSetupError(RuntimeError):
    """A reward that cannot load (missing checkpoint offline, unknown label...)."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: shown as one line, exit code 2."""
    from flan_rlhf.data import DataConfigError
    from flan_rlhf.guards import NonFiniteError
    from flan_rlhf.policy import ModelLoadError
    from flan_rlhf.rewards.base import RewardOutputError

    return (CheckpointError, DataConfigError, ModelLoadError, RewardOutputError, RewardSetupError, NonFiniteError)


def run_lightning_cli(args: list[str] | None = None) -> FlanRLHFCLI:
    """Run the LightningCLI with ``args`` (``None``: ``sys.argv``).

    Raises:
        SystemExit(2): a config key that does not exist or has the wrong type, after one
            ``error: ...`` line naming the key (jsonargparse's own report is a nested block).
    """
    from jsonargparse import ArgumentError

    # Lightning 2.6 warns on every checkpoint of a manual-optimisation module that the saved state
    # is the one AFTER optimisation. A PPO checkpoint is taken after a whole iteration, so that is
    # exactly the state to resume from; the 15-line warning per save would only bury real messages.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    raise_parse_errors = {"exit_on_error": False}
    try:
        return FlanRLHFCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**raise_parse_errors, **{name: dict(raise_parse_errors) for name in LightningCLI.subcommands()}},
            args=args,
        )
    except ArgumentError as err:
        _say(f"error: {condense_parser_error(str(err))} - fix the config or flag (`flan-rlhf <subcommand> --help` "
             "lists every valid key and type)")
        raise SystemExit(2) from None


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested, multi-line report -> one line that keeps the key path and the reason.

    Example: ``Parser key "model": Problem with given class_path 'flan_rlhf.module.PPOModule':
    Group 'ppo' does not accept option 'learnin_rate'``.
    """
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
             "Expected a <class 'NoneType'>")
    kept = []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(noise):
            kept.append(text)
    return " ".join(kept) if kept else message.strip()


def build_from_config(config: str, extra_args: list[str] | None = None):
    """Instantiate ``(model, datamodule)`` from a training YAML without running anything."""
    cli = FlanRLHFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        run=False,
        args=["--config", config, "--trainer.logger=false", *(extra_args or [])],
    )
    return cli.model, cli.datamodule


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``flan-rlhf``.

    Returns:
        0 on success; 2 with one ``error: <message>`` line on stderr for a known problem
        (:func:`known_errors`: bad data, model, checkpoint or reward, a run stopped by a guard).
        Argument errors exit through ``SystemExit(2)`` from the parser, naming the key.
    """
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if argv and argv[0] in TOOLS:
            module_name, function = TOOLS[argv[0]].split(":")
            return int(getattr(importlib.import_module(module_name), function)(argv[1:]) or 0)
        run_lightning_cli(None if from_command_line else argv)
    except Exception as err:  # noqa: BLE001 - only known_errors() are turned into one line
        if not isinstance(err, known_errors()):
            raise
        log.debug("known error", exc_info=True)
        _say(f"error: {_first_line(err)}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
