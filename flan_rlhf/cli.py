"""``flan-rlhf``: the Lightning subcommands (fit / validate / test / predict) and the tool subcommands.

``fit`` and friends run :mod:`flan_rlhf.lightning_cli`; the tools (own argument parsers,
``flan-rlhf <cmd> --help``) are listed in ``TOOLS``.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from flan_rlhf.checkpointing import CheckpointError
from flan_rlhf.errors import first_line
from flan_rlhf.lightning_cli import run_lightning_cli, say

log = logging.getLogger(__name__)

TOOLS = ("score", "export", "generate", "compare", "demo")


def tool_main(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv) -> exit code`` of a tool subcommand, imported on use (``fit`` does not pay for them)."""
    if name == "score":
        from flan_rlhf.tools.score import main
    elif name == "export":
        from flan_rlhf.tools.export import main
    elif name == "generate":
        from flan_rlhf.tools.generate import main
    elif name == "compare":
        from flan_rlhf.tools.compare import main
    elif name == "demo":
        from flan_rlhf.demo.pipeline import main
    else:
        raise KeyError(f"no tool {name!r}; the tools are {', '.join(TOOLS)}")
    return main


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: shown as one line, exit code 2."""
    from flan_rlhf.data import DataConfigError
    from flan_rlhf.guards import NonFiniteError
    from flan_rlhf.output_dirs import OutputDirError
    from flan_rlhf.policy import ModelLoadError
    from flan_rlhf.rewards.base import RewardOutputError, RewardSetupError

    return (CheckpointError, DataConfigError, ModelLoadError, OutputDirError, RewardOutputError, RewardSetupError,
            NonFiniteError)


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
            return int(tool_main(argv[0])(argv[1:]) or 0)
        run_lightning_cli(None if from_command_line else argv)
    except Exception as err:  # noqa: BLE001 - only known_errors() are turned into one line
        if not isinstance(err, known_errors()):
            raise
        log.debug("known error", exc_info=True)
        say(f"error: {first_line(err)}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
