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
