"""The preference-trained reward model: Bradley-Terry loss, data module, fit through LightningCLI
with configs/reward_model_tiny.yaml, export, and PreferenceReward on held-out pairs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from flan_rlhf.reward_model import (
    TINY_REWARD_MODEL_CONFIG,
    PreferenceDataModule,
    bradley_terry_loss,
    make_preference_pairs,
    pairwise_accuracy,
)
from flan_rlhf.rewards import PreferenceReward

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "reward_model_tiny.yaml"


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, 0, -1
    expected = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(1))) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(1 / 3)  # the tie counts as wrong


def test_synthetic_pairs_are_deterministic_and_differ_only_in_sentiment():
    pairs = make_preference_pairs(20, seed=3)
    assert pairs == make_preference_pairs(20, seed=3) and pairs != make_preference_pairs(20, seed=4)
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"} and pair["chosen"] != pair["rejected"]
        topic = pair["prompt"].split(" about ")[1].rstrip(".")
        assert topic in pair["chosen"] and topic in pair["rejected"]


def test_tiny_yaml_uses_the_tiny_model_config():
    config = yaml.safe_load(TINY_CONFIG.read_text())
    assert config["model"]["init_args"]["model_config"] == TINY_REWARD_MODEL_CONFIG


def test_datamodule_reads_local_hh_rlhf_style_jsonl_and_drops_pairs_without_preference(tmp_path):
    rows = [{"chosen": f"Human: hi {i}\n\nAssistant: thanks!", "rejected": f"Human: hi {i}\n\nAssistant: go away"} for i in range(18)]
    rows += [{"chosen": "", "rejected": "x"}, {"chosen": "same", "rejected": "same"}]
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    module = PreferenceDataModule(dataset=str(data_file), val_fraction=0.25, batch_size=4, seed=1)
    module.setup("fit")
    assert module.dropped["train"] + module.dropped["val"] == 2
    assert len(module.train_data) + len(module.val_data) == 18
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"chosen", "rejected"} and len(batch["chosen"]) == 4  # no prompt column configured
    assert all(text.endswith("thanks!") for text in batch["chosen"])


def test_datamodule_errors_name_the_problem(tmp_path, monkeypatch):
    data_file = tmp_path / "pairs.csv"
    data_file.write_text("good,bad\na,b\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['chosen', 'rejected'\]"):
        PreferenceDataModule(dataset=str(data_file)).setup("fit")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError) as caught:
        PreferenceDataModule(dataset="Anthropic/hh-rlhf").setup("fit")
    assert "local json/jsonl/csv/parquet" in str(caught.value) and "\n" not in str(caught.value)


def test_fit_tiny_config_through_lightning_cli_reaches_high_heldout_accuracy(tmp_path):
    """The tiny YAML fits through LightningCLI (subclass mode), exports a HF folder, and the
    exported reward ranks chosen above rejected on pairs it never saw."""
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI

    export_dir = tmp_path / "rm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread avoids oversubscription
    try:
        cli = run_cli(LightningCLI, LightningModule, LightningDataModule, export_dir, tmp_path)
    finally:
        torch.set_num_threads(threads)
    _check_fit_and_export(cli, export_dir)


def run_cli(cli_class, module_class, data_class, export_dir: Path, root: Path):
    """``flan-rlhf fit --config configs/reward_model_tiny.yaml`` as the lead's CLI runs it (subclass mode)."""
    return cli_class(
        module_class,
        data_class,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=[
            "fit",
            "--config",
            str(TINY_CONFIG),
            f"--model.init_args.export_dir={export_dir}",
            f"--trainer.default_root_dir={root}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
        ],
    )


def _check_fit_and_export(cli, export_dir: Path) -> None:
    assert cli.trainer.callback_metrics["val/accuracy"].item() >= 0.9
    assert (export_dir / "config.json").is_file() and (export_dir / "flan_rlhf_reward.json").is_file()

    seen = {(p["prompt"], p["chosen"], p["rejected"]) for p in make_preference_pairs(192, seed=0)}
    held_out = [p for p in make_preference_pairs(200, seed=1234) if (p["prompt"], p["chosen"], p["rejected"]) not in seen]
    assert len(held_out) >= 150
    reward = PreferenceReward(str(export_dir)).setup("cpu")
    assert reward.score_prompt is True  # follows the training format recorded in the export
    prompts = [p["prompt"] for p in held_out]
    chosen_scores, components = reward.score(prompts, [p["chosen"] for p in held_out])
    rejected_scores = reward(prompts, [p["rejected"] for p in held_out])
    assert list(components) == ["preference"]
    accuracy = (chosen_scores > rejected_scores).float().mean().item()
    assert accuracy >= 0.9, accuracy
    assert not reward._model.training
    # a smaller batch (other padding) gives the same scores
    assert torch.allclose(reward(prompts[:8], [p["chosen"] for p in held_out[:8]]), chosen_scores[:8], atol=1e-5)


def test_preference_reward_rejects_a_multi_label_folder(tmp_path):
    from tests.rewards_helpers import save_classifier

    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, [0.0, 0.0])
    with pytest.raises(ValueError, match="expected 1"):
        PreferenceReward(str(folder)).setup()


def test_preference_files_go_through_the_one_datasets_loader(tmp_path):
    """A local file is checked like a prompt file (UTF-8, one JSON object per line) and becomes ``train_split``."""
    latin1 = tmp_path / "pairs.jsonl"
    latin1.write_bytes('{"chosen": "caf\u00e9", "rejected": "no"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(line 1.*re-save it as UTF-8"):
        PreferenceDataModule(dataset=str(latin1)).setup("fit")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl line 2 is not valid JSON"):
        PreferenceDataModule(dataset=str(broken)).setup("fit")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n" for i in range(8)))
    module = PreferenceDataModule(dataset=str(good), train_split="pairs", val_fraction=0.25, seed=0)
    module.setup("fit")
    assert len(module.train_data) + len(module.val_data) == 8
