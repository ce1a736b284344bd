"""Exports of a trained policy (merged fp32/bf16, int8, adapter) and the generate command.

The policy is a tiny FLAN-T5-architecture model with LoRA whose B matrices are set to random
values (peft initialises them to zero, which would make every export trivially equal the base).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml

from flan_rlhf.tools import export as export_cli, generate as generate_cli
from flan_rlhf.policy import save_adapter
from flan_rlhf.output_dirs import MANIFEST
from flan_rlhf.settings import GenerationSettings
from flan_rlhf.tools.generate import decode, generate_ids
from flan_rlhf.policy import ActorCritic, LoraSettings, PolicySpec, build_t5_from_config
from flan_rlhf.tools.quantize import INT8_MARKER, is_int8_folder, load_int8
from tests.conftest import TINY_T5, TokenFractionReward

LORA = LoraSettings(r=4, alpha=8, target_modules=["q", "v"])  # scaling alpha / r = 2
PROMPTS = ["the cat sat on the mat", "hello", "a longer prompt about the weather today", "xyz"]
GREEDY = GenerationSettings(max_new_tokens=12, do_sample=False)
BATCH = 3


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A saved tiny base model + ByT5 tokenizer (stands in for google/flan-t5-base)."""
    from transformers import ByT5Tokenizer

    folder = str(tmp_path_factory.mktemp("base"))
    tokenizer = ByT5Tokenizer()
    build_t5_from_config(vocab_size=len(tokenizer), seed=0, **TINY_T5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _perturb_lora(actor: ActorCritic, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in actor.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """A PPOModule on the base with perturbed LoRA, its checkpoint, and its greedy outputs.

    The checkpoint is what Lightning's checkpoint connector writes: ``state_dict()``, the
    hyper-parameters as a dict, then the module's own ``on_save_checkpoint`` hook (which drops
    the frozen base weights), saved with ``torch.save``.
    """
    import lightning as L

    from flan_rlhf.module import PPOModule

    module = PPOModule(PolicySpec(name_or_path=base_dir), TokenFractionReward(), lora=LORA)
    module.configure_model()
    _perturb_lora(module.actor)
    checkpoint = {"epoch": 0, "global_step": 7, "pytorch-lightning_version": L.__version__,
                  "state_dict": module.state_dict(), "hparams_name": "kwargs", "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    path = str(tmp_path_factory.mktemp("ckpt") / "last.ckpt")
    torch.save(checkpoint, path)
    actor, tokenizer = module.actor.eval(), module.tokenizer
    policy_ids = generate_ids(actor.policy, tokenizer, PROMPTS, GREEDY, batch_size=BATCH, fused=False)  # peft + transformers, unmerged
    with actor.reference_context():
        base_ids = generate_ids(actor.policy, tokenizer, PROMPTS, GREEDY, batch_size=BATCH, fused=False)
    return {"ckpt": path, "actor": actor, "tokenizer": tokenizer, "policy_ids": policy_ids, "base_ids": base_ids,
            "n_saved_keys": len(checkpoint["state_dict"])}


@pytest.fixture(scope="module")
def merged_dir(trained, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("exports") / "merged")
    assert export_cli.main(["--ckpt_path", trained["ckpt"], "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def adapter_dir(trained, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("adapter") / "adapter")
    save_adapter(trained["actor"], trained["tokenizer"], out)
    return out


def _run(main, argv, capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- merged fp32
def test_fp32_export_loads_with_plain_transformers_and_generates_the_policys_text(trained, merged_dir, base_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # The checkpoint kept only LoRA + value head (2 layers x 2 stacks x (q,v) x (A,B) + 2 = 34 of the
    # encoder-decoder's keys); the base came from base_dir.
    assert trained["n_saved_keys"] == 2 * 2 * 2 * 2 + 2 * 2 * 2 + 2  # self-attn (enc+dec), cross-attn (dec)
    assert trained["policy_ids"] != trained["base_ids"], "the perturbed adapter must change greedy outputs"
    model = AutoModelForSeq2SeqLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert os.path.isfile(os.path.join(merged_dir, "model.safetensors"))
    assert model.dtype == torch.float32
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert generate_ids(model, tokenizer, PROMPTS, GREEDY, batch_size=BATCH, fused=False) == trained["policy_ids"]  # plain transformers

    # Merging is W + (alpha / r) * B @ A (LoRA paper eq. 3): check one layer by hand.
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    lora_q = trained["actor"].base_model.encoder.block[0].layer[0].SelfAttention.q
    expected = base.encoder.block[0].layer[0].SelfAttention.q.weight + 2.0 * lora_q.lora_B["default"].weight @ lora_q.lora_A["default"].weight
    torch.testing.assert_close(model.encoder.block[0].layer[0].SelfAttention.q.weight, expected, rtol=0, atol=1e-6)
    info = json.load(open(os.path.join(merged_dir, MANIFEST)))
    assert info["format"] == "merged" and info["source"]["global_step"] == 7 and info["lora"]["r"] == 4


@pytest.mark.parametrize("greedy", [True, False])
def test_fused_decoder_gives_transformers_tokens_for_merged_and_unmerged_models(trained, merged_dir, greedy, monkeypatch):
    """``flan-rlhf generate`` decodes T5 models through the fused decoder: the same tokens as
    ``model.generate`` (greedy, and sampled under the same seed), for a merged export and for
    an unmerged peft model (LoRA folded per batch)."""
    from transformers import AutoModelForSeq2SeqLM

    taken = []
    real = generate_cli.fused_generate

    def counting(*args):
        out = real(*args)
        taken.append(out is not None)
        return out
    monkeypatch.setattr(generate_cli, "fused_generate", counting)
    settings = GenerationSettings(max_new_tokens=12, do_sample=not greedy)
    tokenizer = trained["tokenizer"]
    for model in (AutoModelForSeq2SeqLM.from_pretrained(merged_dir), trained["actor"].policy):
        torch.manual_seed(3)
        fused = generate_ids(model, tokenizer, PROMPTS, settings, batch_size=BATCH)
        torch.manual_seed(3)
        assert fused == generate_ids(model, tokenizer, PROMPTS, settings, batch_size=BATCH, fused=False)
    assert fused == trained["policy_ids"] or not greedy
    assert taken and all(taken)  # the fused path really ran (and was not skipped for these models)


def test_bf16_export_from_adapter_folder_is_the_rounded_merge_and_generates(merged_dir, adapter_dir, tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = str(tmp_path / "bf16")
    code, err = _run(export_cli.main, ["--adapter", adapter_dir, "--out", out, "--dtype", "bf16"], capsys)
    assert code == 0, err
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    fp32 = AutoModelForSeq2SeqLM.from_pretrained(merged_dir)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for (name, p16), (_, p32) in zip(model.named_parameters(), fp32.named_parameters()):
        assert torch.equal(p16, p32.to(torch.bfloat16)), name
    ids = generate_ids(model, AutoTokenizer.from_pretrained(out), PROMPTS, GREEDY, batch_size=BATCH)
    assert len(ids) == len(PROMPTS) and all(0 < len(row) <= GREEDY.max_new_tokens for row in ids)


# ----------------------------------------------------------------------------- int8
def test_int8_export_loads_with_load_int8_only_and_generates(trained, merged_dir, tmp_path, capsys):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = str(tmp_path / "int8")
    code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", out, "--format", "int8"], capsys)
    assert code == 0, err
    assert is_int8_folder(out) and not os.path.exists(os.path.join(out, "model.safetensors"))
    with pytest.raises(OSError):
        AutoModelForSeq2SeqLM.from_pretrained(out)  # plain transformers cannot read it
    model = load_int8(out)
    fp32 = AutoModelForSeq2SeqLM.from_pretrained(merged_dir)
    q = model.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, DynamicQuantizedLinear) and isinstance(model.lm_head, DynamicQuantizedLinear)
    # Per-tensor affine int8: every dequantised weight is within half a step of the float weight.
    qweight = q.weight()
    w = fp32.encoder.block[0].layer[0].SelfAttention.q.weight
    assert qweight.int_repr().dtype == torch.int8
    assert (qweight.dequantize() - w).abs().max() <= qweight.q_scale() / 2 + 1e-7
    assert 0 < (qweight.dequantize() - w).abs().max()  # really quantised, not a float copy
    torch.testing.assert_close(model.shared.weight, fp32.shared.weight, rtol=0, atol=0)  # embeddings stay fp32
    ids = generate_ids(model, AutoTokenizer.from_pretrained(out), PROMPTS, GREEDY, batch_size=BATCH)
    assert len(ids) == len(PROMPTS) and all(0 < len(row) <= GREEDY.max_new_tokens for row in ids)
    marker = json.load(open(os.path.join(out, INT8_MARKER)))
    assert "encoder.embed_tokens.weight" in marker["aliases"]  # tied weights stored once


# ----------------------------------------------------------------------------- safety
def test_overwrite_replaces_only_an_earlier_export(trained, tmp_path, capsys):
    """--overwrite replaces an earlier flan-rlhf export; a user's folder, or an export with a user's
    file added, is refused with or without it, and stays byte for byte."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite", "true"]):
        code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(out), *extra], capsys)
        assert code == 2 and len(err) == 1 and "did not write" in err[0] and "keep.txt" in err[0]
        assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    earlier = tmp_path / "earlier"
    assert _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(earlier)], capsys)[0] == 0
    code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(earlier)], capsys)
    assert code == 2 and len(err) == 1 and "pass --overwrite" in err[0]
    (earlier / "model.safetensors").write_bytes(b"stale")
    code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(earlier), "--overwrite", "true"], capsys)
    assert code == 0, err
    assert (earlier / "model.safetensors").read_bytes() != b"stale"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left behind

    (earlier / "notes.md").write_text("my notes")
    code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(earlier), "--overwrite", "true"], capsys)
    assert code == 2 and len(err) == 1 and "notes.md" in err[0]
    assert (earlier / "notes.md").read_text() == "my notes"


class _Gadget:
    """Stands for any class a checkpoint could pickle: torch.load(weights_only=True) must not build it."""


def test_bad_inputs_give_one_clear_line(trained, adapter_dir, merged_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config without a logger looks for runs under ./lightning_logs
    truncated = tmp_path / "broken.ckpt"
    truncated.write_bytes(open(trained["ckpt"], "rb").read()[:2000])
    with_gadget = tmp_path / "gadget.ckpt"
    checkpoint = torch.load(trained["ckpt"], weights_only=False)
    checkpoint["extra"] = _Gadget()
    torch.save(checkpoint, with_gadget)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\nhello\n")
    bad_jsonl = tmp_path / "p.jsonl"
    bad_jsonl.write_text('{"question": "hello"}\n')
    empty = tmp_path / "no_checkpoints_here"
    empty.mkdir()
    no_checkpoints = tmp_path / "fit.yaml"  # a run whose config names no checkpoint folder and has no run yet
    no_checkpoints.write_text(yaml.safe_dump({"model": {"class_path": "flan_rlhf.module.PPOModule",
                                                         "init_args": {"reward": "ProfanityReward"}},
                                               "data": {"class_path": "flan_rlhf.data.PromptDataModule",
                                                        "init_args": {"data_files": "d.jsonl", "prompt_column": "text"}}}))
    cases = [
        (export_cli.main, ["--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o1")], "does not exist"),
        (export_cli.main, ["--ckpt_path", str(truncated), "--out", str(tmp_path / "o2")], "complete .ckpt"),
        (export_cli.main, ["--ckpt_path", str(with_gadget), "--out", str(tmp_path / "o3")], "--trust_checkpoint true"),
        (export_cli.main, ["--adapter", merged_dir, "--out", str(tmp_path / "o4")], "no adapter_config.json"),
        (export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(tmp_path / "o5"), "--format", "int8", "--dtype", "bf16"], "--dtype"),
        (export_cli.main, ["--out", str(tmp_path / "o6")], "--ckpt_path"),
        (export_cli.main, ["--ckpt_path", "last", "--out", str(tmp_path / "o7")], "add --run_config YOUR_FIT.yaml"),
        (export_cli.main, ["--ckpt_path", str(empty), "--out", str(tmp_path / "o8")], "holds no complete .ckpt file"),
        (export_cli.main, ["--ckpt_path", "last", "--run_config", str(no_checkpoints), "--out", str(tmp_path / "o9")],
         "leads to no checkpoint folder"),
        (export_cli.main, ["--ckpt_path", trained["ckpt"], "--run_config", str(no_checkpoints), "--out", str(tmp_path / "oa")],
         "--run_config is read only for --ckpt_path last"),
        (generate_cli.main, ["--model", merged_dir, "--input", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "g.jsonl")], "does not exist"),
        (generate_cli.main, ["--model", adapter_dir, "--input", str(prompts), "--output", str(tmp_path / "g.jsonl")], "--adapter"),
        (generate_cli.main, ["--model", merged_dir, "--input", str(csv), "--output", str(tmp_path / "g.jsonl")], ".txt"),
        (generate_cli.main, ["--model", merged_dir, "--input", str(bad_jsonl), "--output", str(tmp_path / "g.jsonl")], "--prompt_column"),
    ]
    for main, argv, needle in cases:
        code, err = _run(main, argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], (argv, err)
    assert not any(name.startswith("o") for name in os.listdir(tmp_path))  # nothing half-written


def test_a_checkpoint_folder_exports_its_newest_complete_checkpoint(trained, tmp_path, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    shutil.copy(trained["ckpt"], folder / "step=1.ckpt")
    os.utime(folder / "step=1.ckpt", (1_000_000, 1_000_000))  # the older one
    (folder / "step=2.ckpt").write_bytes(open(trained["ckpt"], "rb").read()[:2000])  # newer, cut short
    code, err = _run(export_cli.main, ["--ckpt_path", str(folder), "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    assert len(err) == 1 and err[0].startswith(f"note: checkpoint {folder / 'step=2.ckpt'} is incomplete or corrupt")
    source = json.load(open(tmp_path / "merged" / MANIFEST))["source"]
    assert source["checkpoint"] == str(folder / "step=1.ckpt") and source["global_step"] == 7


def test_checkpoint_of_config_built_policy_exports_its_own_base_weights(tmp_path, capsys):
    """A policy built from t5_config has no base folder: its checkpoint carries the base weights."""
    from transformers import AutoModelForSeq2SeqLM

    from flan_rlhf.module import PPOModule

    spec = PolicySpec(tokenizer="byt5", t5_config=dict(TINY_T5, seed=3))
    module = PPOModule(spec, TokenFractionReward(), lora=LORA)
    module.configure_model()
    with torch.no_grad():  # stands for a base the user trained (e.g. SFT) inside the run: not the seed-3 init
        module.actor.base_model.shared.weight.mul_(1.5)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "c.ckpt")
    code, err = _run(export_cli.main, ["--ckpt_path", str(tmp_path / "c.ckpt"), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    exported = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "m"))
    torch.testing.assert_close(exported.shared.weight, module.actor.base_model.shared.weight, rtol=0, atol=0)
    code, err = _run(export_cli.main, ["--ckpt_path", str(tmp_path / "c.ckpt"), "--out", str(tmp_path / "a"), "--format", "adapter"], capsys)
    assert code == 0, err  # the base, which exists only in the checkpoint, is saved beside the adapter
    adapter_config = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "a" / "base")
    saved_base = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "a" / "base"))
    torch.testing.assert_close(saved_base.shared.weight, module.actor.base_model.shared.weight, rtol=0, atol=0)
    assert not any("lora" in name for name, _ in saved_base.named_parameters())


# ----------------------------------------------------------------------------- generate
def test_generate_cli_round_trip_for_merged_adapter_and_int8(trained, merged_dir, adapter_dir, base_dir, tmp_path, capsys):
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"id": f"r{i}", "text": p}) + "\n" for i, p in enumerate(PROMPTS)))
    expected = decode(trained["tokenizer"], trained["policy_ids"])
    common = ["--input", str(prompts_path), "--prompt_column", "text", "--greedy", "true", "--max_new_tokens", "12", "--batch_size", "3"]

    outputs = {}
    for name, model_args in {"merged": ["--model", merged_dir], "adapter": ["--model", base_dir, "--adapter", adapter_dir]}.items():
        out = tmp_path / f"{name}.jsonl"
        code, err = _run(generate_cli.main, model_args + common + ["--output", str(out)], capsys)
        assert code == 0, err
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    for rows in outputs.values():
        assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(PROMPTS))]
        assert [r["prompt"] for r in rows] == PROMPTS
        assert [r["response"] for r in rows] == expected

    int8_dir = str(tmp_path / "int8")
    assert export_cli.main(["--adapter", adapter_dir, "--out", int8_dir, "--format", "int8"]) == 0
    out = tmp_path / "int8.jsonl"
    code, err = _run(generate_cli.main, ["--model", int8_dir] + common + ["--output", str(out)], capsys)
    assert code == 0, err
    assert len(out.read_text().splitlines()) == len(PROMPTS)
    code, err = _run(generate_cli.main, ["--model", int8_dir] + common + ["--output", str(out)], capsys)
    assert code == 2 and "--overwrite" in err[0]  # an existing output is not clobbered


def test_a_base_of_another_size_is_one_line_naming_the_tensor(trained, tmp_path, capsys):
    """--base pointing at a model of another width: the LoRA tensors no longer fit, said in one line."""
    from transformers import ByT5Tokenizer

    other = tmp_path / "wider_base"
    tokenizer = ByT5Tokenizer()
    build_t5_from_config(vocab_size=len(tokenizer), seed=0, **{**TINY_T5, "d_model": 2 * TINY_T5["d_model"]}).save_pretrained(other)
    tokenizer.save_pretrained(other)
    capsys.readouterr()  # drop the progress bars of the save above
    code, err = _run(export_cli.main, ["--ckpt_path", trained["ckpt"], "--out", str(tmp_path / "out"), "--base", str(other)], capsys)
    assert code == 2 and len(err) == 1, err
    assert "do not fit the policy" in err[0] and "in the checkpoint but" in err[0] and "--base" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_bad_run_config_is_one_line_naming_the_key(tmp_path, capsys):
    from flan_rlhf.cli import main

    run_config = tmp_path / "fit.yaml"
    run_config.write_text(yaml.safe_dump({"model": {"class_path": "flan_rlhf.module.PPOModule", "init_args": {"rewrd": "x"}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", "last", "--run_config", str(run_config), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "'rewrd' is not accepted" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["rloo", "dpo"])
def test_a_critic_free_checkpoint_exports_an_adapter_without_a_value_head_and_a_card_naming_its_method(base_dir, tmp_path, key):
    """A critic-free checkpoint (no ``value_head`` weights, ``rloo`` or ``dpo`` settings) exports: the actor is
    rebuilt without a value head, the adapter holds the trained LoRA and the card names the algorithm."""
    import lightning as L

    from flan_rlhf.critic_free import RLOOModule
    from flan_rlhf.dpo_module import DPOModule
    from flan_rlhf.settings import DPOSettings, RLOOSettings

    cls, settings = {"rloo": (RLOOModule, RLOOSettings), "dpo": (DPOModule, DPOSettings)}[key]
    module = cls(PolicySpec(name_or_path=base_dir), TokenFractionReward(), lora=LORA,
                 **{key: settings(samples_per_prompt=3)})
    module.configure_model()
    _perturb_lora(module.actor)
    checkpoint = {"epoch": 0, "global_step": 5, "pytorch-lightning_version": L.__version__,
                  "state_dict": module.state_dict(), "hparams_name": "kwargs", "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "rloo.ckpt")
    out = tmp_path / "adapter"
    assert export_cli.main(["--ckpt_path", str(tmp_path / "rloo.ckpt"), "--format", "adapter", "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "value_head.safetensors").exists()
    card = (out / "README.md").read_text()
    assert f"{key.upper()} (RLHF) with LoRA" in card and f"{key}.samples_per_prompt" in card
