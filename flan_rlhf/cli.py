"""``flan-rlhf``: one command, every job a subcommand listed in :data:`COMMANDS`.

``flan-rlhf --help`` lists them from this table without importing torch or Lightning (a
command's module is imported only when it runs). Every subcommand parses with jsonargparse in
one style: ``--group.name value`` flags, ``--config`` files that compose (later wins, then
flags), ``--print_config`` whose output is accepted back as ``--config``, and ``--help`` showing
each option's type, default and meaning. ``fit``/``validate``/``test``/``predict``/``compare``
are LightningCLI parsers (:mod:`flan_rlhf.lightning_cli`), so a training YAML works for each.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from dataclasses import dataclass

from flan_rlhf import __version__
from flan_rlhf.errors import first_cause, first_line, is_rank_zero, say
from flan_rlhf.interrupts import record_command
from flan_rlhf.quiet import silence_harmless

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Command:
    """One subcommand: its ``--help`` line and the ``module:function`` that runs it.

    The function takes the arguments after the subcommand name and returns the exit code;
    ``lightning`` functions also take the subcommand name first (one LightningCLI serves several).
    """

    summary: str
    entry: str
    lightning: bool = False


COMMANDS: dict[str, Command] = {
    "fit": Command("train a stage from a YAML: PPO, RLOO or GRPO (PPOModule, RLOOModule, GRPOModule), supervised "
                   "fine tuning (SFTModule) or a reward model",
                   "flan_rlhf.lightning_cli:lightning_main", lightning=True),
    "validate": Command("score a checkpoint on the validation split (reward, KL, ROUGE, BLEU)",
                        "flan_rlhf.lightning_cli:lightning_main", lightning=True),
    "test": Command("score a checkpoint on the test split (reward, KL, ROUGE, BLEU)",
                    "flan_rlhf.lightning_cli:lightning_main", lightning=True),
    "predict": Command("write one row per test prompt (prompt, response, reward, KL) with a checkpoint",
                       "flan_rlhf.lightning_cli:lightning_main", lightning=True),
    "compare": Command("before/after report: the reference and the trained policy on the same prompts and seeds",
                       "flan_rlhf.tools.compare:main"),
    "score": Command("score every text of a .jsonl/.json/.csv/.parquet file with any reward",
                     "flan_rlhf.tools.score:main"),
    "generate": Command("responses for a file of prompts from an export, a base model or an adapter",
                        "flan_rlhf.tools.generate:main"),
    "export": Command("turn a checkpoint or adapter into a merged, int8 or adapter-only model folder",
                      "flan_rlhf.tools.export:main"),
    "label": Command("sample pairs of responses, serve a page to judge them, export the judgements (human feedback)",
                     "flan_rlhf.tools.label:main"),
    "demo": Command("the whole pipeline offline: corpus, tokenizer, SFT, PPO (or RLOO, GRPO), before/after report",
                    "flan_rlhf.demo.pipeline:main"),
}


def command_function(name: str):
    """The function that runs subcommand ``name``, imported on use (``--help`` pays for none of them)."""
    module_name, function_name = COMMANDS[name].entry.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def top_level_parser():
    """The ``flan-rlhf`` parser: ``--help``, ``--version`` and the list of subcommands with their summaries.

    Subcommands are listed here with empty parsers; each one's own parser is built only when it runs.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="flan-rlhf", exit_on_error=False,
                            description="RLHF for FLAN-T5 and any Hugging Face encoder-decoder, with LoRA, on Lightning. "
                                        "`flan-rlhf <command> --help` shows a command's options.")
    parser.add_argument("--version", action="version", version=f"flan-rlhf {__version__}")
    subcommands = parser.add_subcommands(required=True, dest="command")
    for name, command in COMMANDS.items():
        subcommands.add_subcommand(name, ArgumentParser(description=command.summary), help=command.summary)
    return parser


def unknown_command_message(name: str) -> str:
    """One line for a subcommand that does not exist, with the nearest real one if there is one."""
    close = difflib.get_close_matches(name, list(COMMANDS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown command {name!r}{hint} - the commands are {', '.join(COMMANDS)}; `flan-rlhf --help` says what each does"


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: shown as one line, exit code 2."""
    from flan_rlhf.checkpointing import CheckpointError
    from flan_rlhf.data import DataConfigError
    from flan_rlhf.guards import NonFiniteError
    from flan_rlhf.label_store import LabelStoreError
    from flan_rlhf.logger_outputs import LoggerError
    from flan_rlhf.output_dirs import OutputDirError
    from flan_rlhf.policy import ModelLoadError
    from flan_rlhf.rewards.base import RewardOptionError, RewardOutputError, RewardReferencesError, RewardSetupError
    from flan_rlhf.run_lock import RunLockedError
    from flan_rlhf.settings import SettingsError

    return (CheckpointError, DataConfigError, LabelStoreError, LoggerError, ModelLoadError, OutputDirError,
            RewardOptionError, RewardOutputError, RewardReferencesError, RewardSetupError, NonFiniteError,
            RunLockedError, SettingsError)


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``flan-rlhf``.

    Returns:
        0 on success; 2 with one ``error: <message>`` line on stderr for a known problem
        (:func:`known_errors`: bad data, model, checkpoint or reward, a run stopped by a guard)
        or an unknown command; 143 (SIGTERM) or 130 (SIGINT) with one line for a command stopped
        by a signal (:mod:`flan_rlhf.interrupts`; ``fit`` checkpoints the iteration it finished). Argument errors exit through ``SystemExit(2)`` from the
        command's parser, naming the key.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_harmless()
    record_command(argv)
    if not argv:
        top_level_parser().print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "--version"):
        top_level_parser().parse_args(argv[:1])  # prints, then SystemExit(0)
    if argv[0].startswith("-"):
        say(f"error: {argv[0]} is not an option of flan-rlhf itself - put it after a command: "
            f"flan-rlhf <command> {argv[0]} (`flan-rlhf --help` lists the commands)")
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        say(f"error: {unknown_command_message(name)}")
        return 2
    from flan_rlhf.interrupts import RunInterrupted, signals_raise

    function = command_function(name)
    try:
        with signals_raise():
            return int((function(name, rest) if COMMANDS[name].lightning else function(rest)) or 0)
    except RunInterrupted as stop:
        if is_rank_zero():
            say(str(stop))
        return stop.exit_code
    except Exception as err:  # noqa: BLE001 - only known_errors() are turned into one line
        from flan_rlhf.errors import disk_full_cause, disk_full_line

        full = disk_full_cause(err)
        if full is not None:
            log.debug("disk full", exc_info=True)
            say(f"error: {disk_full_line(full)}")
            return 2
        known = known_cause(err)
        if known is None:
            raise
        log.debug("known error", exc_info=True)
        say(f"error: {first_line(known)}")
        return 2


def known_cause(err: BaseException) -> BaseException | None:
    """``err`` if it is one of :func:`known_errors`, else the first of its causes that is (jsonargparse
    wraps an error a class raises while it is built, e.g. a DataConfigError, in a ValueError), else None."""
    known = known_errors()
    return first_cause(err, lambda cause: isinstance(cause, known))


if __name__ == "__main__":
    sys.exit(main())
