"""Every option of every ``flan-rlhf`` command, read from the parsers' own ``--help``.

``python -m flan_rlhf.tools.options_reference > docs/options.md`` writes the options page;
``tests/test_docs.py`` fails when that page differs from what this prints (so it cannot drift
from the parsers) and checks every flag the README and ``docs/`` mention against
:func:`known_options`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = ("compare", "score", "generate", "export", "label", "demo")

#: The classes a training YAML selects, whose options follow ``--model.`` / ``--data.``.
MODEL_CLASSES = ("flan_rlhf.module.PPOModule", "flan_rlhf.critic_free.RLOOModule", "flan_rlhf.critic_free.GRPOModule",
                 "flan_rlhf.dpo_module.DPOModule",
                 "flan_rlhf.sft.SFTModule",
                 "flan_rlhf.reward_model.PreferenceRewardModel")
DATA_CLASSES = ("flan_rlhf.data.PromptDataModule", "flan_rlhf.reward_model.PreferenceDataModule")
REWARD_CLASSES = ("ProfanityReward", "VaderReward", "DetoxifyReward", "ClassifierReward",
                  "SentimentClassifierReward", "PreferenceReward", "CompositeReward")

TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"

#: Wide enough that argparse wraps no help text, so an entry does not depend on the terminal.
_UNWRAPPED_COLUMNS = "100000"


@dataclass(frozen=True)
class HelpPage:
    """One ``--help`` screen: the title it gets on the options page and the argv that prints it."""

    title: str
    argv: tuple[str, ...]
    intro: str = ""


def help_pages() -> list[HelpPage]:
    """The screens the options page is made of, in page order."""
    pages = [HelpPage("fit, validate, test, predict", ("fit", "--help"),
                      "`--trainer.*` are the options of Lightning's `Trainer` (listed by name below, "
                      "documented at https://lightning.ai/docs/pytorch/stable/common/trainer.html).")]
    pages += [HelpPage(f"--model {name.rsplit('.', 1)[-1]}", ("fit", "--model.help", name),
                       "`--model.X` is short for `--model.init_args.X`.") for name in MODEL_CLASSES]
    pages += [HelpPage(f"--data {name.rsplit('.', 1)[-1]}", ("fit", "--data.help", name),
                       "`--data.X` is short for `--data.init_args.X`.") for name in DATA_CLASSES]
    pages.append(HelpPage("--trainer.logger TensorBoardLogger", ("fit", "--trainer.logger.help", TENSORBOARD_LOGGER),
                          "The configs' logger. `--trainer.logger.X` is short for `--trainer.logger.init_args.X`; "
                          "`--trainer.logger.version NAME` names a run: its folder, which holds its logs and checkpoints."))
    pages.append(HelpPage("compare", ("compare", "--help"),
                          "`compare` takes the training YAML's options (above) and these of its own."))
    pages += [HelpPage(name, (name, "--help")) for name in TOOL_COMMANDS if name != "compare"]
    pages += [HelpPage(f"--reward {name}", ("score", "--reward.help", name),
                       "The same options follow `--model.reward.` in a PPO config.") for name in REWARD_CLASSES]
    return pages


@functools.lru_cache(maxsize=None)
def help_text(argv: tuple[str, ...]) -> str:
    """What ``flan-rlhf *argv`` prints on stdout (a ``--help`` screen), with no line wrapping."""
    from flan_rlhf.cli import main

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = _UNWRAPPED_COLUMNS
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(list(argv))
            except SystemExit:
                pass
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue()


def help_entries(text: str) -> list[tuple[str, str]]:
    """``(option, description)`` for each option of an argparse help screen, usage block skipped.

    ``-c CONFIG, --config CONFIG  Path to ...`` gives ``("--config", "Path to ...")``.
    """
    entries: list[list[str]] = []
    in_usage = True
    for line in text.splitlines():
        if in_usage:
            in_usage = bool(line.strip())  # the usage block ends at the first blank line
            continue
        if line.startswith("  -"):
            head, _, description = line.strip().partition("  ")
            long_names = [name.split(" ")[0] for name in head.split(", ") if name.startswith("--")]
            entries.append([(long_names or [head.split(" ")[0]])[0], description.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] = f"{entries[-1][1]} {line.strip()}".strip()
    return [(option, description) for option, description in entries]


def _screen_options(argv: tuple[str, ...]) -> set[str]:
    return {option for option, _ in help_entries(help_text(argv))}


def lightning_differences() -> str:
    """One sentence on how validate/test/predict's options differ from fit's (read from their ``--help``)."""
    fit = _screen_options(("fit", "--help"))
    parts = []
    for name in LIGHTNING_COMMANDS[1:]:
        own = _screen_options((name, "--help"))
        change = [f"adds {', '.join(f'`{option}`' for option in sorted(own - fit))}"] if own - fit else []
        change += [f"lacks {', '.join(f'`{option}`' for option in sorted(fit - own))}"] if fit - own else []
        parts.append(f"`{name}` {' and '.join(change) if change else 'has the same'}")
    return "The Lightning commands share fit's options: " + "; ".join(parts) + "."


def _pages_with_entries() -> Iterator[tuple[HelpPage, list[tuple[str, str]]]]:
    for page in help_pages():
        yield page, help_entries(help_text(page.argv))


def known_options() -> dict[str, set[str]]:
    """Per command, every option its parser accepts, in the spelling ``--help`` prints.

    Class options are included under their short form (``--model.ppo.learning_rate``,
    ``--reward.label``); :func:`normalise_option` maps a documented spelling onto it.
    """
    known: dict[str, set[str]] = {name: set() for name in (*LIGHTNING_COMMANDS, *TOOL_COMMANDS)}
    lightning_shared: set[str] = set()
    for page, entries in _pages_with_entries():
        options = {option for option, _ in entries} | _optional_settings_fields(entries)
        command = page.argv[0]
        if page.argv[1] == "--help":
            known[command] |= options
        elif command == "fit":  # a model or data class: its options belong to every Lightning command
            lightning_shared |= options
        else:  # a reward class of score
            known["score"] |= options
    for name in LIGHTNING_COMMANDS:
        known[name] |= lightning_shared | _screen_options((name, "--help"))
    known["compare"] |= lightning_shared
    return known


def _optional_settings_fields(entries: list[tuple[str, str]]) -> set[str]:
    """``--model.lora.r`` and the like: an optional settings dataclass (``type: LoraSettings | null``)
    is one option in ``--help``, and jsonargparse also takes each of its fields as a flag."""
    import dataclasses

    from flan_rlhf import policy, settings

    fields = set()
    for option, description in entries:
        match = re.search(r"type: (\w+Settings) \| null", description)
        if match:
            settings_class = getattr(settings, match.group(1), None) or getattr(policy, match.group(1))
            fields |= {f"{option}.{field.name}" for field in dataclasses.fields(settings_class)}
    return fields


def normalise_option(option: str) -> str:
    """A documented flag in ``--help``'s spelling: ``--model.init_args.ppo.lr`` -> ``--model.ppo.lr``."""
    option = option.split("=", 1)[0].rstrip(".,;:)")
    return option.replace(".init_args.", ".")


def _cell(text: str) -> str:
    # "known subclasses" lists whatever Reward subclasses happen to be imported: not a fact of the option
    text = re.sub(r", known subclasses: [^)]*", "", text)
    return text.replace("|", "\\|") or "-"


def options_reference() -> str:
    """The options page (markdown): one table per help screen, the option and what ``--help`` says of it."""
    lines = ["# Options of every command", "",
             "Generated from the parsers by `python -m flan_rlhf.tools.options_reference > docs/options.md`;",
             "`tests/test_docs.py` fails when this page and the parsers disagree. Prose, examples and the",
             "options that matter most: [commands.md](commands.md). `flan-rlhf NAME --help` prints the same.", ""]
    shared: set[str] = set()  # fit's options, which compare's screen repeats (its --ckpt_path means more)
    for page, entries in _pages_with_entries():
        if page.argv == ("fit", "--help"):
            shared = {option for option, _ in entries} - {"--ckpt_path"}
        elif page.argv == ("compare", "--help"):
            entries = [entry for entry in entries if entry[0] not in shared]
        lines += [f"## {page.title}", "", f"`flan-rlhf {' '.join(page.argv)}`", ""]
        if page.argv == ("fit", "--help"):
            lines += [lightning_differences(), ""]
        if page.intro:
            lines += [page.intro, ""]
        logger_page = page.argv[1] == "--trainer.logger.help"
        trainer = [option for option, _ in entries
                   if option.startswith("--trainer.") and not option.endswith(".help") and not logger_page]
        if trainer:
            lines += ["Trainer options: " + ", ".join(f"`{option}`" for option in trainer) + ".", ""]
        lines += ["| option | type, default and meaning |", "|---|---|"]
        for option, description in entries:
            if (option.startswith("--trainer.") and not logger_page) or option.endswith(".help") or option == "--help":
                continue
            lines.append(f"| `{option}` | {_cell(description)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_reference(), end="")
