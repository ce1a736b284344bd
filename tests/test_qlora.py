"""QLoRA (``PolicySpec.quantization``): a 4-/8-bit frozen base from bitsandbytes' CPU backend, LoRA and
the value head in float32, the reference the quantised base itself with the adapters off; a fit through
the CLI; exports that load onto (and merge into) the full-precision base; one line and exit 2 per bad input.

Tiny T5 models built here (``TINY_T5``, ByT5 bytes). GPU placement is on paper (docs/scaling.md#qlora).
"""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import yaml
from torch import nn

from flan_rlhf.policy import ActorCritic, LoraSettings, ModelLoadError, PolicySpec, load_policy_model, merged_model
from flan_rlhf.t5_fused import fused_forward, is_fused_t5
from tests.conftest import error_lines, run_command, shrunk_tiny_config
from tests.test_portable_exports import save_base

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes: pip install 'flan-rlhf[qlora]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = LoraSettings(r=4, alpha=8, target_modules=["q", "v"])
QUANTISED = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}  # bitsandbytes.nn layer of each setting
IDS = torch.tensor([[5, 17, 40, 99, 3, 1], [8, 12, 77, 1, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
DECODER_IDS = torch.tensor([[0, 41, 42, 43], [0, 50, 51, 52]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> str:
    """A tiny FLAN-T5-architecture checkpoint with the ByT5 tokenizer: the full-precision base."""
    folder = tmp_path_factory.mktemp("qlora_base")
    save_base(folder)
    return str(folder)


def quantised_spec(base_dir: str, quantization: str = "4bit") -> PolicySpec:
    return PolicySpec(name_or_path=base_dir, quantization=quantization, quant_compute_dtype="float32")


def perturb_lora(actor: ActorCritic) -> None:
    """peft starts lora_B at zero; random B makes the adapters change the policy."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in actor.policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantised_base_trains_only_fp32_adapters_and_its_reference_is_the_base(base_dir, quantization):
    model, _ = load_policy_model(quantised_spec(base_dir, quantization))
    attention = model.encoder.block[0].layer[0].SelfAttention
    assert {type(getattr(attention, name)).__name__ for name in "qkvo"} == {QUANTISED[quantization]}
    assert type(model.decoder.block[0].layer[2].DenseReluDense.wi_0).__name__ == QUANTISED[quantization]
    # transformers keeps T5's `wo` (_keep_in_fp32_modules) and the head in float32, unquantised
    assert type(model.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    assert model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.eval()  # eval mode + no_grad: bitsandbytes' CPU repacking for inference, which broke later gradients
        model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS)
        # ActorCritic keeps train mode, in which bitsandbytes' CPU 8-bit matmul dequantises the weights
        # (MatMul8bitFp) instead of quantising the inputs too (eval's MatMul8bitLt): compare in that mode
        model.train()
        base_logits = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER_IDS).logits

    actor = ActorCritic(model, LORA)
    perturb_lora(actor)
    trainable = {name: p for name, p in actor.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("value_head.") for name in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert not is_fused_t5(actor.base_model)  # the fused kernels read weights directly: not 4-/8-bit codes
    assert fused_forward(actor.base_model, IDS, MASK, DECODER_IDS) is None
    assert torch.equal(actor.reference_logits(IDS, MASK, DECODER_IDS), base_logits)
    logits, values = actor(IDS, MASK, DECODER_IDS)
    assert not torch.allclose(logits, base_logits, atol=1e-3)  # the adapters act on the policy only
    (logits.logsumexp(-1).mean() + values.mean()).backward()
    assert [name for name, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0] == []
    assert all(p.grad is None for p in actor.parameters() if not p.requires_grad)
    assert torch.equal(actor.reference_logits(IDS, MASK, DECODER_IDS), base_logits)


def test_gradient_checkpointing_over_a_4bit_base_gives_the_same_gradients(base_dir):
    grads = []
    for checkpointing in (False, True):
        model, _ = load_policy_model(quantised_spec(base_dir))
        torch.manual_seed(0)  # the same LoRA A and value-head initialisation both times
        actor = ActorCritic(model, LORA, gradient_checkpointing=checkpointing)
        perturb_lora(actor)
        logits, values = actor(IDS, MASK, DECODER_IDS)
        (logits.logsumexp(-1).mean() + values.mean()).backward()
        grads.append({name: p.grad for name, p in actor.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_python_callers_get_the_same_refusals(base_dir):
    model, _ = load_policy_model(quantised_spec(base_dir))
    with pytest.raises(ModelLoadError, match="cannot be fully fine-tuned"):
        ActorCritic(model, lora=None)
    with pytest.raises(ModelLoadError, match="will not merge LoRA into a quantised base"):
        merged_model(ActorCritic(model, LORA))
    with pytest.raises(ModelLoadError, match=r"policy.quant_type is 'nf3' - use one of 'nf4', 'fp4'"):
        load_policy_model(PolicySpec(name_or_path=base_dir, quantization="4bit", quant_type="nf3"))
    from flan_rlhf.sft import SFTModule

    with pytest.raises(ModelLoadError, match="SFTModule does not train over a quantised base"):
        SFTModule(quantised_spec(base_dir))


def qlora_config(tmp_path, base_dir: str, **policy) -> str:
    """configs/tiny.yaml shrunk to 2 iterations, over the saved base, with configs/qlora.yaml's policy settings
    (a tiny base instead of flan-t5-large; float32 compute on CPU), written to a file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = shrunk_tiny_config(tmp_path, max_new_tokens=4, max_steps=2)
    overlay = yaml.safe_load(open(os.path.join(ROOT, "configs", "qlora.yaml")))["model"]["init_args"]
    init = config["model"]["init_args"]
    init["policy"] = {**overlay["policy"], "name_or_path": base_dir, "quant_compute_dtype": "float32", **policy}
    init["gradient_checkpointing"] = overlay["gradient_checkpointing"]
    init["monitors"] = None
    path = tmp_path / "qlora.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if "lora_" in name}


def test_fit_over_a_4bit_base_exports_an_adapter_for_the_full_precision_base(base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, ByT5Tokenizer

    code, _, err = run_command("fit", "--config", qlora_config(tmp_path, base_dir))
    assert code == 0, err[-3000:]
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["policy"]["quantization"] == "4bit"
    stored = checkpoint["state_dict"]
    assert all("lora_" in key or key.startswith("actor.value_head.") for key in stored)  # no 4-bit base in it
    trained = {key[len("actor.policy."):]: value for key, value in stored.items() if "lora_" in key}
    assert trained and not all(torch.count_nonzero(v) == 0 for k, v in trained.items() if "lora_B" in k)

    exported = str(tmp_path / "export_adapter")
    code, _, err = run_command("export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--format", "adapter",
                               "--out", exported)
    assert code == 0, err[-3000:]
    tokenizer = ByT5Tokenizer()
    for adapter in (str(tmp_path / "adapter"), exported):  # fit's own export (from the 4-bit actor), and export's
        assert json.load(open(os.path.join(adapter, "adapter_config.json")))["base_model_name_or_path"] == base_dir
        loaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(base_dir), adapter).eval()
        assert {type(m) for m in loaded.modules()} & {bnb.nn.Linear4bit, bnb.nn.Linear8bitLt} == set()
        weights = lora_weights(loaded)
        assert weights.keys() == trained.keys()
        assert all(torch.equal(weights[name], trained[name]) for name in weights)
        out = loaded.generate(**tokenizer(["hello there"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
        assert out.shape[1] > 1

    merged = str(tmp_path / "merged")
    code, _, err = run_command("export", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"), "--out", merged)
    assert code == 0, err[-3000:]
    model = AutoModelForSeq2SeqLM.from_pretrained(merged)
    base = AutoModelForSeq2SeqLM.from_pretrained(base_dir)
    q, base_q = model.encoder.block[0].layer[0].SelfAttention.q, base.encoder.block[0].layer[0].SelfAttention.q
    assert type(q) is nn.Linear and q.weight.dtype == torch.float32  # merged into full-precision weights
    prefix = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    delta = trained[f"{prefix}.lora_B.default.weight"] @ trained[f"{prefix}.lora_A.default.weight"] * (LORA.alpha / LORA.r)
    torch.testing.assert_close(q.weight, base_q.weight + delta, rtol=0, atol=1e-6)


def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(base_dir, tmp_path, monkeypatch):
    import importlib.metadata

    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded before the settings were checked")

    monkeypatch.setattr("flan_rlhf.policy.load_seq2seq_model", no_load)
    monkeypatch.setattr("flan_rlhf.policy.build_t5_from_config", no_load)
    real_version = importlib.metadata.version

    def without_bitsandbytes(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    config = qlora_config(tmp_path, base_dir)
    t5_config = yaml.safe_load(open(os.path.join(ROOT, "configs", "tiny.yaml")))["model"]["init_args"]["policy"]["t5_config"]
    from_config = qlora_config(tmp_path / "from_config", base_dir, name_or_path=None, tokenizer="byt5", t5_config=t5_config)
    cases = [
        (config, [], "needs bitsandbytes, which is not installed - pip install 'flan-rlhf[qlora]'"),
        (config, ["--model.init_args.lora", "null"], "`lora: null` would train those frozen weights - set lora"),
        (from_config, [], "a policy built from t5_config has none - set policy.name_or_path"),
    ]
    for index, (path, flags, expected) in enumerate(cases):
        with monkeypatch.context() as patch:
            if index == 0:
                patch.setattr(importlib.metadata, "version", without_bitsandbytes)
            code, _, err = run_command("fit", "--config", path, *flags)
        assert code == 2, err[-3000:]
        assert len(error_lines(err)) == 1 and expected in error_lines(err)[0], err[-3000:]
    assert not glob.glob(str(tmp_path / "ckpt" / "*.ckpt"))

    code, _, err = run_command("fit", "--config", config, "--model.init_args.policy.quantization", "3bit")
    assert code == 2  # jsonargparse checks the Literal while parsing, naming the key and the values it takes
    assert len(error_lines(err)) == 1 and "\"policy.quantization\": Expected a typing.Literal['4bit', '8bit']" in err, err

