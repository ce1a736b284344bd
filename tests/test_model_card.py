"""Every export carries a model card that huggingface_hub reads back: metadata the Hub expects and,
when a compare report is given, its before/after table."""
from __future__ import annotations

import json

from huggingface_hub import ModelCard

from flan_rlhf.model_card import CardFacts, export_card, facts_from_settings, write_card
from flan_rlhf.policy import LoraSettings, PolicySpec
from flan_rlhf.rewards import ProfanityReward
from flan_rlhf.settings import PPOSettings
from tests.conftest import run_command
from tests.test_cli import tiny_config

METRICS = {"before": {"toxic_fraction": 0.3125, "rougeL": 0.9129}, "after": {"toxic_fraction": 0.0175, "rougeL": 0.9505},
           "delta": {"toxic_fraction": {"value": -0.295, "ci_low": -0.3425, "ci_high": -0.2525},
                     "rougeL": {"value": 0.0376, "ci_low": 0.0252, "ci_high": 0.0509}},
           "n_prompts": 400, "samples_per_prompt": 1, "split": "test", "bootstrap": {"confidence": 0.95}}


def test_card_metadata_and_metrics_table_read_back(tmp_path):
    facts = facts_from_settings("adapter", PolicySpec(name_or_path="google/flan-t5-base"), LoraSettings(r=16), PPOSettings(),
                                ProfanityReward(), steps=70, metrics=METRICS,
                                command="flan-rlhf fit --config configs/flan_t5_base_dialogsum.yaml")
    path = write_card(str(tmp_path), facts, folder_name="exports/adapter")
    card = ModelCard.load(path)
    assert card.data.library_name == "peft" and card.data.base_model == "google/flan-t5-base"
    assert {"flan-rlhf", "rlhf", "ppo", "lora"} <= set(card.data.tags) and card.data.pipeline_tag == "text2text-generation"
    assert "| toxic_fraction ↓ | 0.3125 | 0.0175 | -0.2950 [-0.3425, -0.2525] |" in card.text
    assert "| rougeL ↑ | 0.9129 | 0.9505 |" in card.text and "400 prompts of the test split" in card.text
    assert "- Reward: ProfanityReward (`non_profanity`)" in card.text and "- PPO iterations: 70" in card.text
    assert "| lora.r | 16 |" in card.text and "| ppo.learning_rate |" in card.text
    assert "flan-rlhf fit --config configs/flan_t5_base_dialogsum.yaml" in card.text
    assert 'AutoPeftModelForSeq2SeqLM.from_pretrained("exports/adapter")' in card.text


def test_a_local_or_config_built_base_is_not_claimed_as_a_hub_base(tmp_path):
    (tmp_path / "sft").mkdir()
    for base in (str(tmp_path / "sft"), None):
        card = export_card(CardFacts(export_format="adapter", base_model=base))
        assert card.data.base_model is None
        assert "No before/after report was given" in card.text
    assert 'base = AutoModelForSeq2SeqLM.from_pretrained("./base")' in export_card(CardFacts("adapter", None)).text
    assert export_card(CardFacts("merged", "google/flan-t5-base")).data.library_name == "transformers"


def test_fit_and_export_write_cards(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path)
    assert run_command("fit", "--config", config, "--trainer.max_steps", "2")[0] == 0
    card = ModelCard.load(tmp_path / "adapter" / "README.md")  # fit's export_dir, replacing peft's generic card
    assert card.data.library_name == "peft" and "- PPO iterations: 2" in card.text
    assert "- Reward: ProfanityReward (`non_profanity`)" in card.text and f"flan-rlhf fit --config {config}" in card.text
    assert "README.md" in json.loads((tmp_path / "adapter" / "flan_rlhf_export.json").read_text())["files"]

    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text(json.dumps(METRICS))
    code, out, err = run_command("export", "--ckpt_path", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"),
                                 "--report", str(tmp_path / "report"))
    assert code == 0, err[-2000:]
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.library_name == "transformers" and "- Reward: ProfanityReward (`non_profanity`)" in card.text
    assert "| toxic_fraction ↓ | 0.3125 | 0.0175 |" in card.text and "- PPO iterations: 2" in card.text

    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run_command("export", "--ckpt_path", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m2"),
                               "--report", str(tmp_path / "bad.json"))
    assert code == 2 and err.strip().count("\n") == 0 and "has no before/after metrics" in err
    assert not (tmp_path / "m2").exists()


def test_a_critic_free_run_is_named_in_the_card_tags_and_table(tmp_path):
    from flan_rlhf.model_card import algorithm_of_export
    from flan_rlhf.settings import GRPOSettings

    facts = facts_from_settings("adapter", PolicySpec(name_or_path="google/flan-t5-base"), LoraSettings(r=16),
                                GRPOSettings(), ProfanityReward(), steps=12, command="flan-rlhf fit", algorithm="GRPO")
    card = ModelCard.load(write_card(str(tmp_path), facts))
    assert "grpo" in card.data.tags and "ppo" not in card.data.tags
    assert "GRPO (RLHF) with LoRA" in card.text and "- GRPO iterations: 12" in card.text
    assert "| grpo.samples_per_prompt | 8 |" in card.text and "vf_coef" not in card.text
    # an adapter folder's manifest names the module that wrote it; older exports (no name) were PPO's
    assert algorithm_of_export({"written_by": "flan-rlhf fit (RLOOModule)"}) == "RLOO"
    assert algorithm_of_export({"written_by": "flan-rlhf fit (PPOModule)"}) == "PPO"
    assert algorithm_of_export(None) == algorithm_of_export({"written_by": "flan-rlhf export"}) == "PPO"
