"""Bad input gets ONE line naming the problem and the fix, and nothing already written is lost
(issue 7, "Bad input").

Every case is one entry of :data:`CASES`: ``prepare(tmp)`` builds the bad input (and, for CLI
cases, the files of an earlier run) under ``tmp`` and returns the call that must fail; that call
returns the one-line message. The test checks the message against the entry's regex and that
every file that existed before the call still exists, byte for byte. Add a case by adding an
entry.

Data-file cases (empty file, missing columns, null/empty/non-string prompts, invalid UTF-8,
invalid JSON lines, prompts over ``max_prompt_tokens`` with ``too_long="error"``, ...) live in
the table ``tests.data.test_data_bad_input.CASES``; ``test_data_cases_cover_the_issue`` checks that
table still holds them, and the ``data file not JSON lines (CLI)`` case below shows such an
error reaching the command line as one line.

CLI cases run ``flan_rlhf.cli.main`` in-process on ``configs/tiny.yaml`` shrunk to one iteration
and expect exit code 2 with exactly one ``error: ...`` line on stderr.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import save_file

from flan_rlhf.cli import main
from flan_rlhf.output_dirs import MANIFEST
from flan_rlhf.rewards.base import Reward
from tests.conftest import as_critic_free, shrunk_tiny_config
from tests.data.test_data_bad_input import CASES as DATA_CASES


# ------------------------------------------------------------------ helpers
def earlier_run_config(tmp: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """``configs/tiny.yaml`` shrunk to one tiny iteration, with outputs under ``tmp`` that already
    hold an earlier run's files: ``ckpt/last.ckpt`` and an export ``adapter/`` (with its manifest,
    and ``overwrite_export_dir`` on, so each case reaches the error it is about). The run's own
    checkpoint folder is ``ckpt/run`` (a folder holding another run's checkpoints is refused
    before any of these errors could show)."""
    config = shrunk_tiny_config(tmp, max_new_tokens=4, max_steps=1, limit_val_batches=0)
    config["model"]["init_args"]["overwrite_export_dir"] = True
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp / "ckpt" / "run")
    if edit is not None:
        edit(config)
    (tmp / "ckpt").mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 12, "state_dict": {"w": torch.ones(3)}}, tmp / "ckpt" / "last.ckpt")
    (tmp / "adapter").mkdir(exist_ok=True)
    save_file({"w": torch.ones(3)}, str(tmp / "adapter" / "adapter_model.safetensors"))
    manifest = {"files": ["adapter_model.safetensors"], "format": "adapter", "run_id": "earlier"}
    (tmp / "adapter" / MANIFEST).write_text(json.dumps(manifest))
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_error(config: Path, *args: str) -> str:
    """Run ``flan-rlhf fit --config config *args`` in-process; return its one ``error:`` line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            code = main(["fit", "--config", str(config), *args])
        except SystemExit as exit_:  # argument errors exit like argparse
            code = exit_.code
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("error: ")]
    assert code == 2, f"exit code {code}; stderr:\n{stderr.getvalue()[-3000:]}"
    assert len(errors) == 1, stderr.getvalue()[-3000:]
    return errors[0].removeprefix("error: ")


def fit_fails(edit: Callable[[dict], None] | None = None, *args: str, inputs: Callable[[Path], list[str]] | None = None):
    """A ``prepare`` for CLI cases: the config (optionally edited), optional extra inputs whose
    returned strings are appended to the arguments."""

    def prepare(tmp: Path) -> Callable[[], str]:
        config = earlier_run_config(tmp, edit)
        extra = inputs(tmp) if inputs is not None else []
        return lambda: cli_error(config, *args, *extra)

    return prepare


def set_model(**changes) -> Callable[[dict], None]:
    """An ``edit`` that sets ``model.init_args`` keys (dotted keys reach nested groups)."""

    def edit(config: dict) -> None:
        for dotted, value in changes.items():
            node = config["model"]["init_args"]
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value

    return edit


def detoxify_checkpoint(path: Path, model_type: str) -> Path:
    """A Detoxify-format checkpoint (``config`` + ``state_dict``) whose backbone is ``model_type``."""
    labels = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    torch.save({"config": {"arch": {"args": {"model_type": model_type, "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(labels)}},
                           "dataset": {"args": {"classes": labels}}},
                "state_dict": {}}, path)
    return path


def _critic_free(class_name: str, **settings) -> Callable[[dict], None]:
    """An ``edit`` that turns the PPO config into ``flan_rlhf.critic_free.<class_name>`` with ``settings``."""
    return lambda config: as_critic_free(config, class_name, settings)


class WrongShapeReward(Reward):
    """A buggy reward: three scores whatever the batch size."""

    name = "wrong_shape"

    def components(self, prompts, responses):
        return {self.name: torch.zeros(3)}


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class BadInput:
    """``prepare(tmp)`` builds the input and returns the failing call (which returns the message)."""

    prepare: Callable[[Path], Callable[[], str]]
    message: str  # regex the whole one-line message must match


def _not_seq2seq_folder(tmp: Path) -> list[str]:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp / "gpt2_model")
    return []


def _truncated_ckpt(tmp: Path) -> list[str]:
    data = (tmp / "ckpt" / "last.ckpt").read_bytes()
    (tmp / "ckpt" / "epoch=0-step=3.ckpt").write_bytes(data[: len(data) // 2])
    return ["--ckpt_path", str(tmp / "ckpt" / "epoch=0-step=3.ckpt")]


def _pickled_objects_ckpt(tmp: Path) -> list[str]:
    import datetime

    torch.save({"state_dict": {}, "saved_on": datetime.date(2024, 1, 2)}, tmp / "ckpt" / "foreign.ckpt")
    return ["--ckpt_path", str(tmp / "ckpt" / "foreign.ckpt")]


def _detoxify_reward(**init_args) -> str:
    return "--model.init_args.reward=" + json.dumps(
        {"class_path": "flan_rlhf.rewards.DetoxifyReward", "init_args": init_args})


def _detoxify_download_offline(tmp: Path) -> Callable[[], str]:
    """Detoxify's own download, as it fails without network (patched: no test may download)."""
    config = earlier_run_config(tmp)
    offline = urllib.error.URLError("[Errno -2] Name or service not known")

    def run() -> str:
        with mock.patch("torch.hub.load_state_dict_from_url", side_effect=offline):
            return cli_error(config, _detoxify_reward())

    return run


def _detoxify_backbone_on_hub(tmp: Path) -> Callable[[], str]:
    from flan_rlhf.rewards.detoxify_reward import DetoxifyReward

    checkpoint = detoxify_checkpoint(tmp / "toxic.ckpt", "no-such-org/no-such-bert")

    def run() -> str:
        with pytest.raises(OSError) as caught:
            DetoxifyReward(checkpoint=str(checkpoint)).setup()
        return str(caught.value)

    return run


def _detoxify_checkpoint_with_code(tmp: Path) -> Callable[[], str]:
    """A Detoxify-format file that also pickles a Python object: Detoxify would unpickle it with
    ``weights_only=False``; the reward must refuse it before that."""
    import datetime

    from flan_rlhf.rewards.detoxify_reward import DetoxifyReward

    checkpoint = detoxify_checkpoint(tmp / "toxic.ckpt", str(tmp / "bert"))
    payload = torch.load(checkpoint, weights_only=True)
    payload["config"]["saved_on"] = datetime.date(2024, 1, 2)
    torch.save(payload, checkpoint)

    def run() -> str:
        with pytest.raises(ValueError) as caught:
            DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(tmp)).setup()
        return str(caught.value)

    return run


def _not_json_lines(tmp: Path) -> list[str]:
    (tmp / "p.jsonl").write_text('{"dialogue": "a", "summary": "s"}\n{"dialogue": "b", "summary": }\n', encoding="utf-8")
    return ["--data.init_args.builtin=null", f"--data.init_args.dataset={tmp / 'p.jsonl'}"]


def _unknown_yaml_key(config: dict) -> None:
    config["model"]["init_args"]["ppo"]["learnin_rate"] = 0.1


def _wrong_yaml_type(config: dict) -> None:
    config["model"]["init_args"]["generation"]["max_new_tokens"] = "lots"


CASES: dict[str, BadInput] = {
    "unknown model name offline": BadInput(
        fit_fails(set_model(**{"policy.name_or_path": "google/flan-t5-typo"})),
        r"cannot load model 'google/flan-t5-typo': not a local folder and not reachable on the Hugging Face Hub "
        r"\(offline or unknown name\) - check the name, or download it on a connected machine with "
        r"`hf download google/flan-t5-typo --local-dir DIR` and pass DIR"),
    "model folder that is not seq2seq": BadInput(
        lambda tmp: fit_fails(set_model(**{"policy.name_or_path": str(tmp / "gpt2_model")}),
                              inputs=_not_seq2seq_folder)(tmp),
        r"model '.*gpt2_model' is a gpt2 model, not an encoder-decoder - flan-rlhf trains seq2seq models such as "
        r"google/flan-t5-base; pass one of those"),
    "model folder without a model": BadInput(
        lambda tmp: fit_fails(set_model(**{"policy.name_or_path": str(tmp)}))(tmp),
        r"cannot load model from folder '.*': .* - point it at a folder written by save_pretrained\(\) of a "
        r"Hugging Face encoder-decoder"),
    "--ckpt_path that does not exist": BadInput(
        lambda tmp: fit_fails(None, "--ckpt_path", str(tmp / "ckpt" / "nope.ckpt"))(tmp),
        r"checkpoint '.*nope.ckpt' does not exist - pass an existing .ckpt file, or --ckpt_path last to use the "
        r"newest complete checkpoint of the run"),
    "--ckpt_path cut short": BadInput(
        fit_fails(inputs=_truncated_ckpt),
        r"checkpoint '.*epoch=0-step=3.ckpt' is incomplete or corrupt \(file is truncated or not a torch "
        r"checkpoint\) - pass another checkpoint, e.g. .*last.ckpt, or --ckpt_path last"),
    "--ckpt_path with pickled objects": BadInput(
        fit_fails(inputs=_pickled_objects_ckpt),
        r"checkpoint '.*foreign.ckpt' holds pickled Python objects that a safe load \(weights_only=True\) refuses "
        r"\(datetime.date\); if you wrote it yourself or otherwise trust it, add --weights_only false"),
    "detoxify checkpoint path missing": BadInput(
        lambda tmp: fit_fails(None, _detoxify_reward(checkpoint=str(tmp / "toxic.ckpt")))(tmp),
        r"reward 'non_toxicity' cannot be set up: Detoxify checkpoint '.*toxic.ckpt' does not exist: fix the path"),
    "detoxify download offline": BadInput(
        _detoxify_download_offline,
        r"reward 'non_toxicity' cannot be set up: cannot load Detoxify 'original' offline \(<urlopen error "
        r"\[Errno -2\] Name or service not known>\); fix: download https://github.com/unitaryai/detoxify/releases/"
        r"\S+\.ckpt once with network access and pass checkpoint: <that file> and huggingface_config_path: .*"),
    "detoxify backbone only on the hub": BadInput(
        _detoxify_backbone_on_hub,
        r"cannot load Detoxify 'original' offline \(.*\); fix: offline, the checkpoint's config.arch.args.model_type "
        r"must be a local folder with the HF config \+ tokenizer.*"),
    "detoxify checkpoint that pickles objects": BadInput(
        _detoxify_checkpoint_with_code,
        r"Detoxify checkpoint '.*toxic.ckpt' pickles Python objects \(datetime.date\) that would run when loaded; "
        r"set trust_checkpoint: true only if the file comes from a source you trust"),
    "data file not JSON lines (CLI)": BadInput(
        fit_fails(inputs=_not_json_lines),
        r".*p.jsonl line 2 is not valid JSON \(.*\).*"),
    "YAML key that does not exist": BadInput(
        fit_fails(_unknown_yaml_key),
        r"Parser key \"model\": .*Group 'ppo' does not accept option 'learnin_rate' - fix the config or flag "
        r"\(`flan-rlhf <subcommand> --help` lists every valid key and type\)"),
    "YAML value of the wrong type": BadInput(
        fit_fails(_wrong_yaml_type),
        r"Parser key \"model\": .*Parser key \"generation.max_new_tokens\": Expected a <class 'int'>. Got value: "
        r"lots - fix the config or flag .*"),
    "reward option out of range": BadInput(
        fit_fails(set_model(reward={"class_path": "flan_rlhf.rewards.ProfanityReward", "init_args": {"window": 0}})),
        r"window must be >= 1 character, got 0: pass a positive window, e\.g\. 80"),
    "RLOO with one response per prompt": BadInput(
        fit_fails(_critic_free("RLOOModule", samples_per_prompt=1)),
        r"samples_per_prompt is 1, but a group baseline needs at least 2 responses per prompt \(with 1 there is "
        r"nothing to compare against\): set samples_per_prompt to 2 or more, e\.g\. 4"),
    "GRPO with an unknown KL placement": BadInput(
        fit_fails(_critic_free("GRPOModule", kl_penalty="both")),
        r"kl_penalty 'both' is unknown; use one of reward, loss"),
    "reward of the wrong shape": BadInput(
        fit_fails(set_model(reward={"class_path": f"{__name__}.WrongShapeReward"})),
        r"reward 'wrong_shape' returned shape \(3,\), expected \(8,\): return one score per response"),
}


def files_under(root: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in root.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_line_and_loses_nothing(case, tmp_path):
    entry = CASES[case]
    failing_call = entry.prepare(tmp_path)
    before = files_under(tmp_path)

    message = failing_call()

    assert "\n" not in message, message
    assert re.fullmatch(entry.message, message), message
    after = files_under(tmp_path)
    changed = [str(path) for path, content in before.items() if after.get(path) != content]
    assert not changed, f"files written before the failure were changed or removed: {changed}"


# Data-file problems named by issue 7 -> their entry in tests/data/test_data_bad_input.py's CASES.
DATA_CASES_REQUIRED = {
    "empty dataset": "empty file",
    "lacks the prompt column": "missing prompt column",
    "lacks a reference column": "missing reference column",
    "null or empty prompts": "null/blank prompts",
    "non-string prompts": "non-string prompt",
    "file not valid UTF-8": "invalid UTF-8",
    "file not valid JSON lines": "invalid JSON line",
    "prompts longer than the limit (too_long=error)": "prompts too long",
}


def test_data_cases_cover_the_issue():
    """The data table keeps a case for every data problem the issue names (run there, not here)."""
    missing = {problem: name for problem, name in DATA_CASES_REQUIRED.items() if name not in DATA_CASES}
    assert not missing, missing


@pytest.mark.parametrize("option, message", [
    ("--reward.window=0", "window must be >= 1 character, got 0: pass a positive window, e.g. 80"),
    ("--reward.batch_size=0", "batch_size must be >= 1, got 0: pass a positive batch size"),
])
def test_a_tool_given_a_reward_option_out_of_range_says_so_in_one_line(option, message, tmp_path, capsys):
    """A reward constructor's refusal is one line and exit 2 from a tool too, before it reads or writes."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"response": "hello"}) + "\n")
    output = tmp_path / "scored.jsonl"
    code = main(["score", "--input", str(source), "--output", str(output), "--reward", "ProfanityReward", option])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: {message}\n")
    assert not output.exists()
