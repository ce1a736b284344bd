"""The LightningCLI of ``flan-rlhf fit / validate / test / predict``, and building a run from a YAML.

Training stages are LightningModules chosen in YAML (``model: class_path: ...``):
:class:`flan_rlhf.module.PPOModule`, :class:`flan_rlhf.critic_free.RLOOModule`,
:class:`flan_rlhf.critic_free.GRPOModule`, :class:`flan_rlhf.dpo_module.DPOModule`, :class:`flan_rlhf.sft.SFTModule`,
:class:`flan_rlhf.reward_model.PreferenceRewardModel`.
"""
from __future__ import annotations

import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from flan_rlhf.checkpointing import (
    AtomicCheckpointIO,
    CheckpointError,
    read_checkpoint_file,
    resolve_ckpt_path,
)
from flan_rlhf.errors import condense_parser_error, is_rank_zero, say
from flan_rlhf.graceful_stop import StopAtIterationEnd
from flan_rlhf.progress import interactive_terminal
from flan_rlhf.progress_callbacks import choose_progress
from flan_rlhf.quiet import silence_harmless
from flan_rlhf.resume_settings import conflict_message, difference_line, split_differences
from flan_rlhf.rewards.base import Reward, set_up_reward

# Private API (pinned by tests/test_private_apis.py):
# - ``LightningCLI._parse_ckpt_path`` (lightning 2.6, called from ``LightningCLI.__init__``):
#   overridden as a no-op, so a checkpoint's ``hyper_parameters`` do not replace the run's config
#   (no public switch exists); the settings are compared in ``_check_checkpoint_settings``.

# Strategies that write checkpoints through the CheckpointIO plugin (DeepSpeed writes its own folder).
_ATOMIC_IO_STRATEGIES = {None, "auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "single_device", "fsdp"}


_HELD_LOCKS: list = []  # the run locks (flan_rlhf.run_lock.RunLock) this process's command holds


def release_run_locks() -> None:
    """Release every run lock the command took (:meth:`FlanRLHFCLI._lock_run_folders`)."""
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().release()


class SaveResolvedConfig(SaveConfigCallback):
    """Lightning's copy of the resolved config, written into the run's folder and never over a file.

    Lightning writes ``<trainer.log_dir>/config.yaml`` and, with no logger, ``log_dir`` is the
    working directory: ``fit --config config.yaml`` replaced the user's own file. Here the copy
    goes to the logger's version folder, or with no logger to the ``ModelCheckpoint`` folder (else
    ``default_root_dir``), under the first free name ``config.yaml``, ``config-2.yaml``, ...
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_folder(trainer)  # on every rank: trainer.log_dir is a collective (it broadcasts)
        path = None
        if trainer.is_global_zero:
            os.makedirs(folder, exist_ok=True)
            path = first_free_name(folder, self.config_filename)
        path = trainer.strategy.broadcast(path)
        if trainer.is_global_zero:
            self.parser.save(self.config, path, skip_none=False, overwrite=False, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True


def run_folder(trainer: L.Trainer) -> str:
    """The folder a run's own files belong in: the logger's version folder, else the checkpoint folder."""
    if trainer.loggers and trainer.log_dir:
        return trainer.log_dir
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) if callback is not None else None
    return str(dirpath or trainer.default_root_dir)


def first_free_name(folder: str, filename: str) -> str:
    """``folder/filename`` if free, else ``folder/<stem>-2<suffix>``, ``-3``, ... (the first that is)."""
    stem, suffix = os.path.splitext(filename)
    candidate, n = os.path.join(folder, filename), 1
    while os.path.lexists(candidate):
        n += 1
        candidate = os.path.join(folder, f"{stem}-{n}{suffix}")
    return candidate


class FlanRLHFCLI(LightningCLI):
    """LightningCLI with atomic checkpoint writes, safe loads and crash-safe ``--ckpt_path`` resolution.

    Before each stage: ``--ckpt_path`` is resolved (``last`` = the newest *complete* checkpoint
    in the ``ModelCheckpoint`` folder; a missing or corrupt path is one clear error), and the
    reward is set up, so a reward that cannot load (a detoxify checkpoint missing offline)
    fails before any training.
    """

    BUILDS = True  # instantiates what it parsed and runs the subcommand

    def __init__(self, *args: Any, extra_options: type | None = None, **kwargs: Any) -> None:
        """``extra_options``: a dataclass whose fields become root options of the parser (``compare`` uses it)."""
        self.extra_options = extra_options
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Settle the run's folders before anything is built (:mod:`flan_rlhf.run_folders`,
        :mod:`flan_rlhf.log_versions`):

        * no ``ModelCheckpoint`` numbers a file ``-v1``: a run's folder holds only its own files,
          so a file of the same name is this run's, replaced whole (atomic writes);
        * ``--ckpt_path`` naming a checkpoint of a logged run continues that run's log version
          (where the file lies, else the folder the checkpoint records), so the resume logs and
          checkpoints into the same folder;
        * a fresh ``fit`` claims the next free ``version_N`` with one ``mkdir`` (process 0 only).
        """
        from flan_rlhf.log_versions import LOG_KEY, continued_version, new_log_folders, run_logger, takes_fresh_version
        from flan_rlhf.run_folders import (
            claim_fresh_version,
            logger_version,
            model_checkpoint_configs,
            run_folder_of_version,
            spell_out_default_logger,
            version_of_checkpoint,
        )

        from flan_rlhf.logger_outputs import check_logger_packages
        from flan_rlhf.sharded_strategy import check_strategy

        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer", {})
        spell_out_default_logger(trainer)
        check_logger_packages(trainer.get("logger"))  # a missing wandb / mlflow is one line, before anything is built
        if self.BUILDS:
            check_strategy(trainer.get("strategy"), config.get("model"))  # likewise a strategy this module cannot run under
        logger = run_logger(trainer.get("logger"))  # the first of several: the run's folder is its
        for callback in model_checkpoint_configs(trainer.get("callbacks")):
            callback["init_args"]["enable_version_counter"] = False
        self._fresh_log_version = takes_fresh_version(logger)
        self._new_log_folders = new_log_folders(logger)
        self._named_version = logger_version(trainer)  # the user's run name, before one is continued or claimed
        path = self._checkpoint_file_quietly(config.get("ckpt_path"))
        version = None
        if path is not None and self._fresh_log_version:
            version = version_of_checkpoint(path, logger)
            if version is None:
                try:
                    version = continued_version(logger, read_checkpoint_file(path, mmap=True).get(LOG_KEY))
                except (CheckpointError, OSError, RuntimeError):
                    pass  # the checkpoint is read, and any problem reported, before the stage runs
        if version is not None:
            logger["init_args"]["version"] = version
            self._fresh_log_version = False
        elif self._fresh_log_version and self.subcommand == "fit" and is_rank_zero():
            logger["init_args"]["version"] = claim_fresh_version(logger)  # still fresh: removed if the start fails
            self._claimed_log_folder = run_folder_of_version(logger, logger["init_args"]["version"])

    def instantiate_classes(self) -> None:
        """LightningCLI's, giving back a claimed log version folder when a class fails to build
        (later failures are :class:`flan_rlhf.log_versions.RunLogVersion`'s to clean up)."""
        try:
            super().instantiate_classes()
        except BaseException:
            self._give_back_claimed_version()
            raise

    def _give_back_claimed_version(self) -> None:
        """Remove the version folder this fit claimed, and the parents it made, if they are still empty."""
        from flan_rlhf.io import remove_empty_folders

        claimed = getattr(self, "_claimed_log_folder", None)
        remove_empty_folders([*([claimed] if claimed else []), *getattr(self, "_new_log_folders", ())])

    def _last_folders(self) -> list[str]:
        """Where ``--ckpt_path last`` looks (:func:`flan_rlhf.run_folders.last_search_folders`)."""
        from flan_rlhf.run_folders import last_search_folders

        config = self.config[self.subcommand] if self.subcommand else self.config
        return last_search_folders(config.get("trainer", {}), getattr(self, "_named_version", None))

    def _checkpoint_file_quietly(self, requested: str | None) -> str | None:
        """The file ``--ckpt_path`` will name (``last``: the newest complete one of the run, or of the
        newest run), without a word: :meth:`_resolve_ckpt_path` says what it finds later."""
        if not requested:
            return None
        try:
            path = resolve_ckpt_path(str(requested), self._last_folders(), fresh_start_allowed=True).path
        except CheckpointError:
            return None
        return path if path is not None and os.path.isfile(path) else None

    def add_arguments_to_parser(self, parser) -> None:
        if self.extra_options is not None:
            parser.add_class_arguments(self.extra_options, nested_key=None, sub_configs=True)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer_config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer", {})
        strategy = trainer_config.get("strategy")
        if not trainer_config.get("plugins") and (strategy is None or isinstance(strategy, str)) and strategy in _ATOMIC_IO_STRATEGIES:
            kwargs.setdefault("plugins", [AtomicCheckpointIO()])
        given = trainer_config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        progress = choose_progress(trainer_config.get("enable_progress_bar"), interactive_terminal(), given)
        kwargs.setdefault("enable_progress_bar", progress.enable_progress_bar)
        from flan_rlhf.log_versions import RunLogVersion

        added = [*progress.callbacks, *self._summary_callbacks(trainer_config, given),
                 RunLogVersion(fresh=getattr(self, "_fresh_log_version", False),
                               new_folders=getattr(self, "_new_log_folders", ()))]
        if self.subcommand == "fit" and not any(isinstance(c, StopAtIterationEnd) for c in given):
            added.append(StopAtIterationEnd())  # a signal checkpoints the finished iteration, then exits 143/130
        if added:
            kwargs["callbacks"] = [*given, *added]
        return super().instantiate_trainer(**kwargs)

    @staticmethod
    def _summary_callbacks(trainer_config: dict[str, Any], given: list[L.Callback]) -> list[L.Callback]:
        """:class:`ParameterSummary`, unless the config turns summaries off or gives its own ModelSummary."""
        from lightning.pytorch.callbacks import ModelSummary

        from flan_rlhf.model_summary import ParameterSummary

        if trainer_config.get("enable_model_summary") is False or any(isinstance(c, ModelSummary) for c in given):
            return []
        return [ParameterSummary()]

    def _parse_ckpt_path(self) -> None:
        """Lightning 2.6 reads ``hyper_parameters`` from ``--ckpt_path`` over the config here, so a
        checkpoint's settings beat the command line's (``export_dir`` included). A checkpoint
        restores state, not settings: the stored settings are compared with the run's in
        :meth:`_check_checkpoint_settings` instead."""

    def before_fit(self) -> None:
        try:
            identity_known = self._resolve_ckpt_path("fit")
            if identity_known and hasattr(self.model, "check_export_target"):
                self.model.check_export_target()  # refuse a folder the end of fit would lose, before loading any model
            if is_rank_zero():
                folder = self._run_checkpoint_folder()
                self._lock_run_folders(folder)
                if identity_known:
                    self._refuse_another_runs_checkpoints(folder)
            self._check_policy_and_strategy()
            self._check_data_and_set_up_rewards()
        except BaseException:
            release_run_locks()  # before the folders they sit in go
            self._give_back_claimed_version()
            raise

    def _run_checkpoint_folder(self) -> str | None:
        """This run's checkpoint folder (its log version is in the config by now: named, continued or claimed)."""
        from flan_rlhf.run_folders import logger_version, run_checkpoint_folder

        trainer = self.config[self.subcommand].get("trainer", {})
        return run_checkpoint_folder(trainer, logger_version(trainer))

    def _lock_run_folders(self, checkpoint_folder: str | None) -> None:
        """Hold the locks of the run's checkpoint and export folders until the command ends
        (:mod:`flan_rlhf.run_lock`); a live holder stops this run with one line."""
        from flan_rlhf.interrupts import command_line
        from flan_rlhf.run_lock import run_lock

        export = self.model.export_target()[0] if hasattr(self.model, "export_target") else None
        lock = run_lock(checkpoint_folder, export, command_line()).acquire()
        _HELD_LOCKS.append(lock)
        for note in lock.notes:
            say(note)

    def _refuse_another_runs_checkpoints(self, folder: str | None) -> None:
        """Stop a run whose checkpoint folder holds another run's checkpoints (:func:`flan_rlhf.run_folders.foreign_checkpoint_problem`).

        Raises:
            OutputDirError: one line naming the folder, a file in it, and the two ways on.
        """
        from flan_rlhf.output_dirs import OutputDirError
        from flan_rlhf.run_folders import foreign_checkpoint_problem

        resumed_from = self.config_init["fit"].get("ckpt_path")  # resolved by now: a file, or None
        if resumed_from and not hasattr(self.model, "run_id"):
            return  # a module of the user's own that keeps no run id: nothing to compare
        if (resumed_from and folder and os.path.isdir(folder)
                and os.path.samefile(os.path.dirname(os.path.abspath(resumed_from)), folder)):
            return  # resuming from a file of this very folder: the run it adopted is the folder's
        problem = foreign_checkpoint_problem(folder, self.model.run_id if resumed_from else None)
        if problem is not None:
            raise OutputDirError(problem)

    def before_validate(self) -> None:
        self._resolve_ckpt_path("validate")
        self._check_policy_and_strategy()
        self._check_data_and_set_up_rewards()

    def before_test(self) -> None:
        self._resolve_ckpt_path("test")
        self._check_policy_and_strategy()
        self._check_data_and_set_up_rewards()

    def before_predict(self) -> None:
        self._resolve_ckpt_path("predict")
        self._check_policy_and_strategy()
        self._check_data_and_set_up_rewards()

    def _resolve_ckpt_path(self, subcommand: str) -> bool:
        """Resolve ``--ckpt_path`` and check the checkpoint's settings against the run's.

        Returns:
            whether the run's identity is known now: a fresh start, or a checkpoint file that was
            read (a DeepSpeed folder or URL is read only by Lightning, later).
        """
        config = self.config_init[subcommand]
        requested = config.get("ckpt_path")
        if requested:
            config["ckpt_path"] = self._resolve(requested, fresh_start_allowed=subcommand == "fit",
                                                trusted=config.get("weights_only") is False)
            if config["ckpt_path"] is not None and not os.path.isfile(config["ckpt_path"]):
                return False  # keywords, URLs, DeepSpeed folders: read by Lightning later
        return True

    def resolve_ckpt_path_option(self, requested: str) -> str:
        """A checkpoint file a tool reads (``compare``): ``last`` or a path, resolved and checked like ``validate``'s.

        Raises:
            CheckpointError: no such checkpoint, a corrupt one, or one whose settings conflict with the config's.
        """
        path = self._resolve(requested, fresh_start_allowed=False, trusted=False)
        if path is None or not os.path.isfile(path):
            raise CheckpointError(f"--ckpt_path {requested} is not a checkpoint file - pass a .ckpt file, or `last` "
                                  "with the config's ModelCheckpoint folder")
        return path

    def _resolve(self, requested: str, fresh_start_allowed: bool, trusted: bool) -> str | None:
        """``requested`` (``last``, ``best``, a path) -> the file to read, its notes said, its settings checked."""
        resolution = resolve_ckpt_path(requested, self._last_folders(), fresh_start_allowed=fresh_start_allowed)
        for message in resolution.messages:
            say(message)
        if resolution.path is not None and os.path.isfile(resolution.path):
            self._check_checkpoint_settings(resolution.path, trusted=trusted)
        return resolution.path

    def _check_checkpoint_settings(self, path: str, trusted: bool) -> None:
        """Stop on a stored setting the weights depend on that this run changes; note the others.

        Raises:
            CheckpointError: one line naming the field and both values.
        """
        checkpoint = read_checkpoint_file(path, trusted=trusted, mmap=True)  # mmap: tensor data stays on disk
        if hasattr(self.model, "adopt_run_id"):
            self.model.adopt_run_id(checkpoint)  # a resumed run is the same run (its own earlier export is replaceable)
        stored = checkpoint.get("hyper_parameters")
        given = getattr(self.model, "hparams", None)
        if not stored or given is None:
            return
        conflicts, harmless = split_differences(stored, given, getattr(self.model, "FIXED_BY_CHECKPOINT", ()))
        if conflicts:
            raise CheckpointError(conflict_message(path, conflicts))
        for difference in harmless:
            say(difference_line(difference))

    def _check_policy_and_strategy(self) -> None:
        """Before any model loads: a quantised base (``policy.quantization``) can load and train here
        (:func:`flan_rlhf.policy.check_quantization`: bitsandbytes installed, a checkpoint to quantise,
        LoRA), and the strategy does not shard it (bitsandbytes' packed 4-/8-bit weights are not what
        FSDP or DeepSpeed ZeRO-3 shard or gather here).

        Raises:
            ModelLoadError: one line naming the setting and the fix.
        """
        spec = getattr(self.model, "policy_spec", None)
        if spec is None:
            return
        from flan_rlhf.on_policy import shards_weights
        from flan_rlhf.policy import ModelLoadError, check_quantization

        check_quantization(spec, getattr(self.model, "lora", None))
        if getattr(spec, "quantization", None) is not None and shards_weights(self.trainer.strategy):
            raise ModelLoadError(f"policy.quantization {spec.quantization} does not combine with the "
                                 f"{type(self.trainer.strategy).__name__}: bitsandbytes' quantised weights are not "
                                 "sharded - QLoRA runs on one GPU or under DDP (configs/ddp.yaml)")

    def _check_data_and_set_up_rewards(self) -> None:
        """Before any model loads: the data module suits the module (``check_datamodule``), and the reward and
        each monitor can score it (references where needed) and load, each refusal one line."""
        check_datamodule = getattr(self.model, "check_datamodule", None)
        if check_datamodule is not None:  # e.g. DPO: stored pairs need a prompt column, prompts need a reward
            check_datamodule(getattr(self, "datamodule", None))
        reward = getattr(self.model, "reward", None)
        for watched in [reward, *getattr(self.model, "monitors", ())]:  # monitors: scored at validation
            if isinstance(watched, Reward):
                self._refuse_reward_without_references(watched)
                set_up_reward(watched, "cpu")  # idempotent; the module moves it to its device later

    def _refuse_reward_without_references(self, reward: Reward) -> None:
        """Stop before any model loads when the reward compares responses with references and the data has none.

        Raises:
            RewardReferencesError: one line naming the reward and ``--data.init_args.reference_columns``.
        """
        from flan_rlhf.rewards.base import RewardReferencesError

        columns = getattr(getattr(self, "datamodule", None), "reference_columns", None)
        if reward.needs_references and columns is not None and not columns:
            raise RewardReferencesError(
                f"reward '{reward.name}' compares each response with its row's references, but "
                "--data.init_args.reference_columns is empty: list the column(s) holding them (e.g. [summary]) "
                "or drop this reward")


def run_lightning_cli(args: list[str] | None = None, run: bool = True, extra_options: type | None = None,
                      prog: str = "flan-rlhf", description: str | None = None,
                      cli_class: type[FlanRLHFCLI] | None = None) -> FlanRLHFCLI:
    """Run the LightningCLI with ``args`` (``None``: ``sys.argv``).

    ``run=False``: no subcommand; parse and build the model, data module and trainer only
    (with ``extra_options``' fields as further root options), for a tool that drives them itself.
    ``prog`` and ``description`` head its ``--help``. ``cli_class``: a :class:`FlanRLHFCLI`
    subclass to run instead (``_ParseOnlyCLI`` parses without building).

    Raises:
        SystemExit(2): a config key that does not exist or has the wrong type, after one
            ``error: ...`` line naming the key (jsonargparse's own report is a nested block).
    """
    from jsonargparse import ArgumentError

    silence_harmless()
    raise_parse_errors = {"exit_on_error": False}
    titled = {**raise_parse_errors, "prog": prog, **({"description": description} if description else {})}
    try:
        return (cli_class or FlanRLHFCLI)(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveResolvedConfig,
            auto_configure_optimizers=False,  # each module builds its own optimiser from its settings (ppo.learning_rate, ...)
            parser_kwargs=titled if not run else {
                **titled, **{name: dict(raise_parse_errors) for name in LightningCLI.subcommands()}},
            args=args,
            run=run,
            extra_options=extra_options,
        )
    except ArgumentError as err:
        say(f"error: {condense_parser_error(str(err))} - fix the config or flag (`flan-rlhf <subcommand> --help` "
             "lists every valid key and type)")
        raise SystemExit(2) from None
    finally:
        release_run_locks()  # the command has ended, however it ended


def lightning_main(subcommand: str, argv: list[str]) -> int:
    """``flan-rlhf fit|validate|test|predict ARGS``: the LightningCLI subcommand ``subcommand``, then its
    :func:`flan_rlhf.run_summary.run_summary` lines on stdout (process 0); returns 0."""
    from flan_rlhf.run_summary import run_summary

    started = time.perf_counter()
    cli = run_lightning_cli([subcommand, *argv])
    if cli.trainer.is_global_zero:
        print("\n".join(run_summary(cli.trainer, cli.model, subcommand, time.perf_counter() - started)), flush=True)
    return 0


def build_from_config(config: str, extra_args: list[str] | None = None):
    """Instantiate ``(model, datamodule)`` from a training YAML without running anything."""
    cli = FlanRLHFCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=None,
        auto_configure_optimizers=False,
        run=False,
        args=["--config", config, "--trainer.logger=false", *(extra_args or [])],
    )
    return cli.model, cli.datamodule


class _ParseOnlyCLI(FlanRLHFCLI):
    """Parses and type-checks a training config (class paths, init_args) without building anything."""

    BUILDS = False  # a strategy this machine cannot run (DeepSpeed without its package) still parses

    def instantiate_classes(self) -> None:
        return None


def parse_training_config(configs: list[str], extra_args: list[str] | None = None):
    """The composed configuration of training YAMLs ``configs`` (later wins, then ``extra_args``), as
    ``fit`` would parse it; no model, data or trainer is built. Returns the jsonargparse Namespace."""
    args = [item for path in configs for item in ("--config", path)]
    return run_lightning_cli([*args, *(extra_args or [])], run=False, cli_class=_ParseOnlyCLI).config


def last_folders_of(configs: list[str]) -> list[str]:
    """The folders ``--ckpt_path last`` searches for the run the training YAMLs ``configs`` describe
    (:func:`flan_rlhf.run_folders.last_search_folders`); empty when it cannot know (another logger)."""
    from flan_rlhf.run_folders import last_search_folders, logger_version, spell_out_default_logger

    parsed = parse_training_config(configs, ["--seed_everything=false"])  # only read: no "Seed set" line
    trainer = parsed.get("trainer", {})
    spell_out_default_logger(trainer)
    return last_search_folders(trainer, logger_version(trainer))
