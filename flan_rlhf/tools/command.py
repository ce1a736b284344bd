"""The parser and run-and-report body every tool command (score, generate, export, demo) shares.

A tool is one typed function whose docstring's ``Args:`` describe its options. :func:`tool_parser`
turns its signature into a jsonargparse parser in LightningCLI's style: ``--name value`` flags
(booleans take a value: ``--overwrite true``), ``--config`` files that compose (later wins, then
flags), ``--print_config`` whose output is accepted back as ``--config``, and ``--help`` showing
each option's type, default and meaning. :func:`run_tool` parses, runs, prints the function's
closing summary on stdout and turns known errors into one ``error:`` line with exit status 2.
"""
from __future__ import annotations

import sys
from typing import Callable

from flan_rlhf.errors import condense_parser_error, first_cause, first_line, say


class UsageError(ValueError):
    """Bad command-line input; the message names the fix."""


class FinishedWithProblem(Exception):
    """The work was done and written, but the exit status must be 2.

    Attributes:
        summary: the closing summary, printed on stdout as for a success.
        problem: one line for stderr naming what went wrong and the fix.
    """

    def __init__(self, summary: str, problem: str) -> None:
        super().__init__(problem)
        self.summary, self.problem = summary, problem


def quiet_progress_bars() -> None:
    """Batch tools: no per-file progress bars from transformers on stderr, so progress and errors stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tool_parser(name: str, function: Callable[..., str], description: str | None = None):
    """The ``flan-rlhf NAME`` parser: ``--config``, ``--print_config`` and one option per parameter of ``function``.

    Class-typed parameters (a :class:`~flan_rlhf.rewards.base.Reward`) take a class name with
    ``--param.option`` flags, or a YAML file with ``class_path``/``init_args``.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    description = description or (function.__doc__ or "").strip().split("\n\n")[0]
    parser = ArgumentParser(prog=f"flan-rlhf {name}", description=description, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of these options; several compose (the later wins), then the flags")
    parser.add_function_arguments(function, as_group=False, sub_configs=True)
    return parser


def parse_error_line(name: str, message: str) -> str:
    """One ``error:`` line for a parse failure of ``flan-rlhf NAME``, with the fix.

    Example: ``error: argument --overwrite: expected one argument - booleans take a value
    (--overwrite true); `flan-rlhf score --help` lists every option``.
    """
    text = condense_parser_error(message)
    hint = " - booleans take a value (--flag true)" if "expected one argument" in text else ""
    return f"error: {text}{hint}; `flan-rlhf {name} --help` lists every option with its type and default"


def run_tool(name: str, argv: list[str] | None, function: Callable[..., str],
             errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` for ``function``, run it and print the summary it returns.

    Args:
        errors: exception types (beyond :class:`UsageError`, ``ValueError`` and ``OSError``) whose
            message already names the problem and the fix.

    Returns:
        0 on success; 2 after one ``error: ...`` line on stderr for bad arguments or input, or
        after the summary when ``function`` raises :class:`FinishedWithProblem`.
    """
    from jsonargparse import ArgumentError

    from flan_rlhf.policy import ModelLoadError
    from flan_rlhf.rewards.base import RewardOptionError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = tool_parser(name, function)
    try:
        options = parser.instantiate_classes(parser.parse_args(argv))
    except ArgumentError as err:
        say(parse_error_line(name, str(err)))
        return 2
    except Exception as err:  # a class built from the options refused one (jsonargparse may wrap it)
        refused = first_cause(err, lambda cause: isinstance(cause, RewardOptionError))
        if refused is None:
            raise
        say(f"error: {first_line(refused)}")
        return 2
    kwargs = {key: value for key, value in vars(options).items() if key != "config"}
    quiet_progress_bars()
    try:
        summary = function(**kwargs)
    except FinishedWithProblem as done:
        print(done.summary, flush=True)
        say(f"error: {done.problem}")
        return 2
    except (UsageError, ModelLoadError, ValueError, OSError, *errors) as err:
        say(f"error: {first_line(err)}")
        return 2
    print(summary, flush=True)
    return 0
