"""SFTModule: schedule math, tokenisation, a tiny fit that learns, and the save_dir export."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flan_rlhf.data import PromptDataModule
from flan_rlhf.demo.corpus import write_corpus
from flan_rlhf.demo.tokenizer import train_corpus_tokenizer
from flan_rlhf.policy import LoraSettings, PolicySpec
from flan_rlhf.optim import lr_multiplier
from flan_rlhf.sft import (
    IGNORE_INDEX,
    SFTModule,
    first_references,
    tokenize_pairs,
)

REPO = Path(__file__).resolve().parent.parent
SMALL_T5 = dict(d_model=64, d_ff=128, num_layers=1, num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine two OpenMP threads
    waiting on each other made a 40-step fit take minutes instead of seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 160-row demo corpus and its tokenizer (~0.3 s)."""
    root = tmp_path_factory.mktemp("sft_assets")
    corpus = write_corpus(root / "corpus", seed=0, n_train=160, n_val=16, n_test=16)
    tokenizer_dir = train_corpus_tokenizer([corpus["train"]], root / "tokenizer")
    return {"corpus": corpus, "tokenizer": str(tokenizer_dir)}


def _datamodule(assets, batch_size=16):
    files = {split: str(path) for split, path in assets["corpus"].items()}
    return PromptDataModule(dataset="json", data_files=files, batch_size=batch_size, eval_batch_size=16)


def _trainer(max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
    )


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# ---------------------------------------------------------------- schedule
def test_lr_multiplier_warmup_then_cosine_and_linear_decay():
    # warm-up of 4 steps: 1/4, 2/4, 3/4, 4/4
    assert [lr_multiplier(s, 4, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # decay over steps 4..14: halfway (step 9) cosine = (1 + cos(pi/2)) / 2 = 0.5, linear = 0.5
    assert lr_multiplier(9, 4, 14, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(6, 4, 14, "cosine") == pytest.approx((1 + math.cos(math.pi * 0.2)) / 2)
    assert lr_multiplier(6, 4, 14, "linear") == pytest.approx(0.8)
    # the floor: min + (1 - min) * 0 at the end, and it stays there past the end
    assert lr_multiplier(14, 4, 14, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 4, 14, "linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(50, 0, 14, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(5, 0, 10, "step")


# ---------------------------------------------------------------- tokenisation
def test_tokenize_pairs_right_pads_and_masks_labels(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    out = tokenize_pairs(tokenizer, ["#Person1#: Hi.", "#Person1#: Hello, how are you?"], ["Hi.", "Anna books a table."], 64, 64)
    short_target = tokenizer("Hi.").input_ids
    assert short_target[-1] == tokenizer.eos_token_id
    padding = out["labels"].shape[1] - len(short_target)
    assert padding > 0 and out["labels"][0].tolist() == short_target + [IGNORE_INDEX] * padding
    assert out["labels"][1].tolist() == tokenizer("Anna books a table.").input_ids
    assert out["attention_mask"][0].tolist()[-1] == 0 and out["input_ids"][0].tolist()[-1] == 0  # right padding
    truncated = tokenize_pairs(tokenizer, ["#Person1#: Hello, how are you?"], ["Anna books a table."], 4, 3)
    assert truncated["input_ids"].shape == (1, 4) and truncated["labels"].shape == (1, 3)


def test_rows_without_references_are_rejected():
    batch = {"prompt": ["a", "b"], "references": [["x"], []], "prompt_id": torch.tensor([3, 7])}
    with pytest.raises(ValueError, match=r"rows \[7\] have none"):
        first_references(batch)
    assert first_references({**batch, "references": [["x", "y"], ["z"]]}) == ["x", "z"]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="schedule"):
        SFTModule(policy=PolicySpec(tokenizer="byt5", t5_config=SMALL_T5), schedule="step")
    with pytest.raises(ValueError, match="learning_rate > 0"):
        SFTModule(policy=PolicySpec(tokenizer="byt5", t5_config=SMALL_T5), learning_rate=0.0)


# ---------------------------------------------------------------- training + export
def test_tiny_sft_lowers_the_loss_and_saves_a_loadable_model(assets, tmp_path):
    torch.manual_seed(0)
    save_dir = tmp_path / "sft_model"
    module = SFTModule(
        policy=PolicySpec(tokenizer=assets["tokenizer"], t5_config=SMALL_T5),
        learning_rate=3e-3, warmup_steps=3, schedule="cosine", save_dir=str(save_dir),
    )
    recorder = LossRecorder()
    trainer = _trainer(40, [recorder])
    trainer.fit(module, _datamodule(assets))

    assert len(recorder.losses) == 40
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    # starts near log(vocab) (the scaled lm_head init; unscaled, T5 starts at ~40)
    assert math.log(200) < first < 1.5 * math.log(len(module.tokenizer))
    assert last < 0.6 * first
    # cosine decay over max_steps: the last logged lr is 3e-3 * (1 + cos(pi * 36/37)) / 2
    assert float(trainer.callback_metrics["sft/lr"]) == pytest.approx(3e-3 * (1 + math.cos(math.pi * 36 / 37)) / 2, rel=1e-4)

    assert (save_dir / "model.safetensors").is_file() and (save_dir / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["sft_model"]  # no temporary folder left behind
    loaded = AutoModelForSeq2SeqLM.from_pretrained(save_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    batch = tokenize_pairs(tokenizer, ["#Person1#: I lost my wallet."], ["#Person1# lost a wallet."], 64, 64)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(**batch).logits
        actual = loaded(**batch).logits
    torch.testing.assert_close(actual, expected)


def test_lora_sft_trains_only_adapters_and_saves_them_merged(assets, tmp_path):
    torch.manual_seed(0)
    save_dir = tmp_path / "merged"
    module = SFTModule(
        policy=PolicySpec(tokenizer=assets["tokenizer"], t5_config=SMALL_T5),
        learning_rate=1e-2, schedule="constant", lora=LoraSettings(r=4, alpha=8, target_modules=["q", "v"]),
        save_dir=str(save_dir),
    )
    module.configure_model()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_q = module.model.get_base_model().encoder.block[0].layer[0].SelfAttention.q.base_layer.weight.detach().clone()

    _trainer(5).fit(module, _datamodule(assets, batch_size=8))

    loaded = AutoModelForSeq2SeqLM.from_pretrained(save_dir).eval()
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    merged_q = loaded.encoder.block[0].layer[0].SelfAttention.q.weight
    assert not torch.allclose(merged_q, base_q)  # the adapter update is in the saved weights
    tokenizer = AutoTokenizer.from_pretrained(save_dir)
    batch = tokenize_pairs(tokenizer, ["#Person1#: I lost my wallet."], ["#Person1# lost a wallet."], 64, 64)
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, module.model(**batch).logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("config", ["configs/demo_sft.yaml", "configs/flan_t5_base_dialogsum_sft.yaml"])
def test_shipped_sft_configs_instantiate_through_the_cli(config):
    from flan_rlhf.lightning_cli import FlanRLHFCLI

    cli = FlanRLHFCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        run=False, args=["--config", str(REPO / config), "--trainer.logger", "false"],
    )
    assert isinstance(cli.model, SFTModule) and isinstance(cli.datamodule, PromptDataModule)
    assert cli.trainer.max_steps > 0
    assert cli.model.hparams.save_dir and cli.model.hparams.schedule in ("cosine", "linear")


def test_demo_config_fits_through_the_cli_and_logs_to_tensorboard(assets, tmp_path):
    """The shipped demo config, pointed at the test's small assets, trains, logs and exports."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flan_rlhf.cli import main

    files = {split: str(path) for split, path in assets["corpus"].items()}
    main([
        "fit", "--config", str(REPO / "configs/demo_sft.yaml"),
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
        "--model.init_args.policy.tokenizer", assets["tokenizer"],
        "--model.init_args.policy.t5_config", str(SMALL_T5),
        "--model.init_args.save_dir", str(tmp_path / "sft_model"),
        "--data.init_args.data_files", str(files),
        "--data.init_args.batch_size", "8",
    ])
    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "sft_model").config.d_model == SMALL_T5["d_model"]
    (event_file,) = (tmp_path / "logs").rglob("events.out.tfevents.*")
    scalars = EventAccumulator(str(event_file)).Reload().Tags()["scalars"]
    assert {"sft/loss", "sft/lr", "sft/val_loss"} <= set(scalars)


def test_sigterm_during_gradient_accumulation_stops_at_the_next_optimiser_step(assets, tmp_path, monkeypatch):
    """SIGTERM lands in the first half of an accumulation group: the run stops after the group's
    optimiser step (a checkpoint at global_step 1, never mid-group), exits 143, writes no model;
    ``--ckpt_path last`` finishes it."""
    from tests.conftest import run_command

    monkeypatch.chdir(tmp_path)
    files = {split: str(path) for split, path in assets["corpus"].items()}
    args = ["fit", "--config", str(REPO / "configs/demo_sft.yaml"), "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "6", "--trainer.accumulate_grad_batches", "2",
            "--trainer.enable_checkpointing", "true",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"),
            "--model.init_args.policy.tokenizer", assets["tokenizer"],
            "--model.init_args.policy.t5_config", str(SMALL_T5),
            "--model.init_args.save_dir", str(tmp_path / "sft_model"),
            "--data.init_args.data_files", str(files), "--data.init_args.batch_size", "8"]
    signal_once = '{"class_path": "tests.resume_helpers.SignalAt", "init_args": {"step": 0, "signum": 15}}'
    code, out, err = run_command(*args, "--trainer.callbacks+", signal_once)
    assert code == 143, (out + err)[-3000:]
    (stopped,) = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert stopped.startswith("stopped by SIGTERM after iteration 1 of 3, checkpointed in "), stopped
    checkpoint = stopped.split("checkpointed in ", 1)[1].split(" - ", 1)[0]
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 1
    assert not (tmp_path / "sft_model").exists()
    code, out, err = run_command(*args, "--ckpt_path", "last")
    assert code == 0 and (tmp_path / "sft_model" / "config.json").is_file(), (out + err)[-3000:]
