"""The one ``flan-rlhf`` command: its listing, its errors, and what ``--help`` costs."""
from __future__ import annotations

import subprocess
import sys

import pytest

from flan_rlhf.cli import COMMANDS, main


def test_top_level_help_lists_every_command_with_its_summary(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listing = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for name, command in COMMANDS.items():
        assert f" {name} {' '.join(command.summary.split())}" in listing, name


def test_no_command_prints_the_listing_and_exits_2(capsys):
    assert main([]) == 2
    assert "fit" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["fitt"], "unknown command 'fitt' (did you mean fit?)"),
    (["train"], "unknown command 'train' - the commands are fit, validate"),
    (["--max_steps", "3"], "--max_steps is not an option of flan-rlhf itself - put it after a command"),
])
def test_a_bad_first_word_is_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err


def test_every_command_entry_point_exists():
    from flan_rlhf.cli import command_function

    for name in COMMANDS:
        assert callable(command_function(name)), name


def test_listing_commands_imports_neither_torch_nor_lightning():
    code = ("import sys\nfrom flan_rlhf.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_optimizer_flags_are_not_offered(capsys):
    """Each module builds its optimiser from its own settings, so LightningCLI's --optimizer is not offered."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--optimizer" not in help_text and "--lr_scheduler" not in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--optimizer", "torch.optim.SGD"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unrecognized arguments: --optimizer" in err


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "compare"])
def test_print_config_is_accepted_back_as_config(subcommand, tmp_path, capsys):
    """What ``--print_config`` writes, passed back as ``--config``, prints the same config again."""
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path)
    extra = ["--ckpt_path", "last"] if subcommand == "compare" else []
    printed = []
    for source in (config, str(tmp_path / "printed.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--config", source, *extra, "--data.max_eval_prompts", "3", "--print_config"])
        assert exit_info.value.code == 0
        printed.append(capsys.readouterr().out)
        (tmp_path / "printed.yaml").write_text(printed[-1])
    assert printed[0] == printed[1]
    assert "max_eval_prompts: 3" in printed[0]


def test_compare_help_is_titled_as_compare(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: flan-rlhf compare ")
    assert "Lightning Trainer command line tool" not in help_text
    assert "(required, type: str)" in " ".join(help_text.split())  # --ckpt_path, with its type and meaning


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_help_shows_each_options_type_default_and_meaning(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    usage = help_text.split(" [")[0:2]  # "usage: flan-rlhf NAME" or, from LightningCLI, "usage: flan-rlhf [options] NAME"
    assert help_text.startswith((f"usage: flan-rlhf {name} ", f"usage: flan-rlhf [options] {name} ")), usage
    assert "--config CONFIG" in help_text and "--print_config" in help_text
    assert "type: " in help_text and "default: " in help_text


TOOL_ARGUMENTS = {  # each tool's required options, plus one that is not a default
    "score": ["--reward", "ProfanityReward", "--input", "in.jsonl", "--output", "out.jsonl", "--batch_size", "3"],
    "generate": ["--model", "m", "--input", "p.txt", "--output", "o.jsonl", "--greedy", "true", "--top_k", "5"],
    "export": ["--ckpt_path", "ckpt", "--out", "o", "--format", "int8", "--per_channel", "true"],
    "demo": ["--seed", "3", "--ppo_steps", "2"],
}


@pytest.mark.parametrize("name", list(TOOL_ARGUMENTS))
def test_tool_print_config_is_accepted_back_as_config(name, tmp_path, capsys):
    """A tool's ``--print_config``, passed back as ``--config``, parses to the same options and prints the same YAML."""
    from flan_rlhf.cli import command_function
    from flan_rlhf.tools.command import tool_parser

    printed = []
    for argv in (TOOL_ARGUMENTS[name], ["--config", str(tmp_path / "printed.yaml")]):
        with pytest.raises(SystemExit) as exit_info:
            main([name, *argv, "--print_config"])
        assert exit_info.value.code == 0
        printed.append(capsys.readouterr().out)
        (tmp_path / "printed.yaml").write_text(printed[-1])
    assert printed[0] == printed[1]
    function = command_function(name).__globals__[name]  # the typed function main() runs
    parser = tool_parser(name, function)
    given = vars(parser.parse_args(TOOL_ARGUMENTS[name]))
    reread = vars(parser.parse_args(["--config", str(tmp_path / "printed.yaml")]))
    given.pop("config", None), reread.pop("config", None)
    assert reread == given
    assert TOOL_ARGUMENTS[name][-1] in printed[0]  # the non-default value is in the YAML


@pytest.mark.parametrize("argv, expected", [
    (["score", "--input", "a.jsonl", "--output", "b.jsonl"], "the following arguments are required: reward"),
    (["score", "--reward", "ProfanityReward", "--input", "a", "--output", "b", "--batch_size", "0"], "batch_size"),
    (["generate", "--model", "m", "--input", "p", "--output", "o", "--greedy"], "booleans take a value (--flag true)"),
    (["export", "--out", "o", "--format", "fp16"], "format"),
    (["export", "--out", "o", "--adapter-only", "true"], "--adapter-only"),
    (["demo", "--n-test", "8"], "--n-test"),
])
def test_a_bad_tool_flag_is_one_line_naming_it(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert f"`flan-rlhf {argv[0]} --help` lists every option" in err
