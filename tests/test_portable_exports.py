"""An exported adapter loads with plain peft/transformers from any folder, after the training folder is gone:
for a local base (recorded as an absolute path), a hub-style base (a hub id, served from a cache) and a base
built from t5_config (saved beside the adapter)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import torch

from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec, build_t5_from_config, load_policy_model, save_adapter
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.tools.generate import generate_ids
from tests.conftest import TINY_T5

LORA = LoraSettings(r=4, alpha=8, target_modules=["q", "v"])
PROMPTS = ["the cat sat on the mat", "hello there"]
GREEDY = GenerationSettings(max_new_tokens=8, do_sample=False)


def trained_actor(spec: PolicySpec) -> tuple[ActorCritic, object]:
    model, tokenizer = load_policy_model(spec)
    actor = ActorCritic(model, LORA)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in actor.policy.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapter matter
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return actor.eval(), tokenizer


def save_base(folder) -> None:
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    build_t5_from_config(vocab_size=len(tokenizer), seed=0, **TINY_T5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def export_and_move(actor, tokenizer, tmp_path, monkeypatch) -> str:
    """Export into run/adapter (fit's export_dir, relative to where training ran), copy it away, delete the run."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    save_adapter(actor, tokenizer, str(run / "adapter"), final_dir="run/adapter")
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(run / "adapter", moved)
    shutil.rmtree(run)
    monkeypatch.chdir(tmp_path / "elsewhere")
    return str(moved)


def test_a_local_base_is_recorded_absolute_and_loads_from_elsewhere(tmp_path, monkeypatch):
    from peft import AutoPeftModelForSeq2SeqLM

    save_base(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    actor, tokenizer = trained_actor(PolicySpec(name_or_path="models/tiny"))  # relative, as a config would say
    expected = generate_ids(actor.policy, tokenizer, PROMPTS, GREEDY, fused=False)
    moved = export_and_move(actor, tokenizer, tmp_path, monkeypatch)
    assert json.load(open(os.path.join(moved, "adapter_config.json")))["base_model_name_or_path"] == str(tmp_path / "models" / "tiny")
    loaded = AutoPeftModelForSeq2SeqLM.from_pretrained(moved).eval()
    assert generate_ids(loaded, tokenizer, PROMPTS, GREEDY, fused=False) == expected


def test_a_base_built_from_config_is_saved_beside_the_adapter(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    actor, tokenizer = trained_actor(PolicySpec(tokenizer="byt5", t5_config=dict(TINY_T5, seed=3)))
    expected = generate_ids(actor.policy, tokenizer, PROMPTS, GREEDY, fused=False)
    moved = export_and_move(actor, tokenizer, tmp_path, monkeypatch)
    base = AutoModelForSeq2SeqLM.from_pretrained(os.path.join(moved, "base"))
    loaded = PeftModel.from_pretrained(base, moved).eval()
    assert generate_ids(loaded, AutoTokenizer.from_pretrained(moved), PROMPTS, GREEDY, fused=False) == expected


HUB_LOAD = """
import json, sys
from peft import AutoPeftModelForSeq2SeqLM
from transformers import AutoTokenizer
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.tools.generate import generate_ids
model = AutoPeftModelForSeq2SeqLM.from_pretrained(sys.argv[1]).eval()
print(json.dumps(generate_ids(model, AutoTokenizer.from_pretrained(sys.argv[1]), json.loads(sys.argv[2]),
                              GenerationSettings(max_new_tokens=8, do_sample=False), fused=False)))
"""


def test_a_hub_base_stays_a_hub_id_and_loads_from_the_cache(tmp_path, monkeypatch):
    """The base is a hub id served offline from a Hugging Face cache laid out as the hub writes it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    snapshot = cache / "models--tiny-org--flan-t5-tiny" / "snapshots" / ("0" * 40)
    save_base(snapshot)
    (cache / "models--tiny-org--flan-t5-tiny" / "refs").mkdir()
    (cache / "models--tiny-org--flan-t5-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    actor, tokenizer = trained_actor(PolicySpec(name_or_path="tiny-org/flan-t5-tiny"))
    expected = generate_ids(actor.policy, tokenizer, PROMPTS, GREEDY, fused=False)
    moved = export_and_move(actor, tokenizer, tmp_path, monkeypatch)
    assert json.load(open(os.path.join(moved, "adapter_config.json")))["base_model_name_or_path"] == "tiny-org/flan-t5-tiny"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", HUB_LOAD, moved, json.dumps(PROMPTS)], env=env, capture_output=True,
                            text=True, timeout=300, cwd=str(tmp_path / "elsewhere"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
