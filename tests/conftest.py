"""Shared fixtures: tiny models and rewards built in the tests (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Tiny models gain nothing from a second thread, and two spinning OpenMP threads per test process
# slow everything down when other processes (DDP ranks, subprocess tests) share the 2 cores.
torch.set_num_threads(1)

from flan_rlhf.policy import PolicySpec
from flan_rlhf.rewards.base import Reward

TINY_T5 = dict(d_model=64, d_ff=128, num_layers=2, num_heads=4)

CHECKOUT = Path(__file__).resolve().parents[1]
#: Where the commands write by default (relative paths in configs/): tests must write under tmp_path.
RUN_OUTPUT_FOLDERS = ("lightning_logs", "checkpoints", "artifacts", "reports")


def _run_outputs_in_checkout() -> set[str]:
    return {str(path.relative_to(CHECKOUT)) for name in RUN_OUTPUT_FOLDERS for path in (CHECKOUT / name).glob("*")
            if path.name != ".gitkeep"}


@pytest.fixture(scope="session", autouse=True)
def tests_leave_the_checkout_as_they_found_it():
    """``make test`` must not leave run folders in the user's checkout (they would mix with real runs)."""
    before = _run_outputs_in_checkout()
    yield
    added = sorted(_run_outputs_in_checkout() - before)
    assert not added, f"tests wrote run outputs into the checkout: {added} - write them under tmp_path"


def shrunk_tiny_config(out_dir, max_new_tokens: int, **trainer_updates) -> dict:
    """``configs/tiny.yaml`` as a dict, shrunk for subprocess tests: no logger, batches of 8,
    ``max_new_tokens`` new tokens, only the ``ModelCheckpoint`` callback (a checkpoint every
    iteration in ``out_dir/ckpt``), the adapter exported to ``out_dir/adapter``; ``trainer_updates``
    go into ``trainer`` (e.g. ``max_steps``)."""
    from pathlib import Path

    import yaml

    out_dir = Path(out_dir)
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, **trainer_updates)
    checkpoint = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    checkpoint["init_args"].update(dirpath=str(out_dir / "ckpt"), every_n_train_steps=1)
    trainer["callbacks"] = [checkpoint]
    model = config["model"]["init_args"]
    model["generation"]["max_new_tokens"] = max_new_tokens
    model["export_dir"] = str(out_dir / "adapter")
    config["data"]["init_args"].update(batch_size=8, eval_batch_size=8)
    return config


def as_critic_free(config: dict, class_name: str, settings: dict) -> dict:
    """``config`` (a PPO training config as a dict) turned into ``flan_rlhf.critic_free.<class_name>``
    (``RLOOModule`` or ``GRPOModule``; ``DPOModule`` is ``flan_rlhf.dpo_module``'s) with ``settings`` as
    its settings group, in place; returned."""
    init = dict(config["model"]["init_args"])
    del init["ppo"]
    key = class_name.removesuffix("Module").lower()
    package = "flan_rlhf.dpo_module" if class_name == "DPOModule" else "flan_rlhf.critic_free"
    config["model"] = {"class_path": f"{package}.{class_name}", "init_args": {**init, key: settings}}
    return config


def run_command(*argv: str) -> tuple[int, str, str]:
    """``flan-rlhf *argv`` in-process through :func:`flan_rlhf.cli.main`: ``(exit code, stdout, stderr)``."""
    import contextlib
    import io

    from flan_rlhf.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argument errors exit like argparse
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """The ``error: ...`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def tiny_policy_spec() -> PolicySpec:
    """A FLAN-T5-architecture model (T5 v1.1) of ~0.25M parameters with the ByT5 byte vocabulary."""
    return PolicySpec(tokenizer="byt5", t5_config=dict(TINY_T5))


class TokenFractionReward(Reward):
    """Reward = number of the response's characters that are in ``chars``, divided by ``length``.

    A reward the policy can move. With the ByT5 byte vocabulary a random policy emits each byte
    with probability ~1/384, so one character is too rare to learn from; the 26 lowercase letters
    give a dense signal (~0.07 per token at start). A fixed denominator (the response-length cap)
    keeps short or undecodable responses from adding noise.
    """

    name = "char_fraction"

    def __init__(self, chars: str = "abcdefghijklmnopqrstuvwxyz", length: int = 8):
        self.chars = set(chars)
        self.length = length

    def components(self, prompts, responses):
        return {self.name: torch.tensor([sum(c in self.chars for c in r) / self.length for r in responses])}


class ScriptedReward(Reward):
    """Returns a scripted score list per call (for NaN/inf guard tests); then ``fallback``."""

    name = "scripted"

    def __init__(self, script: list[float], fallback: float = 0.5):
        self.script = list(script)
        self.fallback = fallback
        self.calls = 0

    def components(self, prompts, responses):
        value = self.script[self.calls] if self.calls < len(self.script) else self.fallback
        self.calls += 1
        return {self.name: torch.full((len(responses),), float(value))}


class ListPromptStream(torch.utils.data.IterableDataset):
    """Infinite stream of fixed prompt batches (independent of the data module)."""

    def __init__(self, prompts: list[str], batch_size: int):
        self.prompts, self.batch_size = prompts, batch_size

    def __iter__(self):
        i = 0
        n = len(self.prompts)
        while True:
            rows = [self.prompts[(i * self.batch_size + j) % n] for j in range(self.batch_size)]
            yield {"prompt": rows, "references": [["a cat sat"] for _ in rows],
                   "prompt_id": torch.arange(len(rows)), "sample": torch.zeros(len(rows), dtype=torch.long)}
            i += 1


PROMPTS = [f"Write about item {i}: the {w} is here." for i, w in enumerate(["cat", "dog", "sun", "tree", "car", "book", "cup", "hat"] * 4)]


@pytest.fixture
def tiny_spec() -> PolicySpec:
    return tiny_policy_spec()


@pytest.fixture(scope="session")
def bart_dir(tmp_path_factory) -> str:
    """A tiny BART (~0.2M parameters) on the ByT5 byte vocabulary, saved as a model folder."""
    from transformers import BartConfig, BartForConditionalGeneration, ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=None,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    out = str(tmp_path_factory.mktemp("bart") / "tiny-bart")
    BartForConditionalGeneration(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def ppo_runs(tmp_path_factory) -> dict[str, tuple]:
    """The same PPO fit under DDP and under FSDP2 (tests/test_fsdp2.py compares them), each with a
    :class:`~tests.ddp_helpers.RankRolloutRecorder`: ``{"ddp" | "fsdp2": (config, process, folder)}``."""
    from tests.ddp_helpers import FSDP2, recorder
    from tests.test_ddp import PPO_STEPS, ddp_fit

    runs = {}
    for name, strategy in (("ddp", "ddp"), ("fsdp2", FSDP2)):
        folder = tmp_path_factory.mktemp(name)
        config, result = ddp_fit(folder, PPO_STEPS, recorder(folder), strategy=strategy)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (config, result, folder)
    return runs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random FLAN-T5-architecture model with the ByT5 tokenizer, saved as a Hugging Face folder."""
    from transformers import ByT5Tokenizer

    from flan_rlhf.policy import build_t5_from_config

    folder = tmp_path_factory.mktemp("tiny_policy")
    tokenizer = ByT5Tokenizer()
    build_t5_from_config(len(tokenizer), **TINY_T5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
