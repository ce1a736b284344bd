"""benchmarks/memory.py: the memory formula against hand-computed values, and its --markdown path."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import memory  # noqa: E402

# d_model 4, d_ff 8, 1 + 1 blocks, 2 heads of d_kv 2 (inner 4), vocabulary 10
TINY = memory.T5Dims(d_model=4, d_ff=8, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=2, vocab=10)


def test_parameter_count_by_hand_and_against_the_model_on_the_meta_device():
    # embedding 10*4 + lm_head 10*4 = 80; encoder block: q,k,v,o 4*4*4 = 64, wi_0, wi_1, wo 3*4*8 = 96,
    # 2 norms 8 -> 168; decoder block: self + cross 8*4*4 = 128, 96, 3 norms 12 -> 236; final norms 2*4 = 8;
    # relative-position tables 2 stacks * 32 buckets * 2 heads = 128. Total 620.
    assert memory.t5_parameter_count(TINY) == 620
    from flan_rlhf.policy import build_t5_from_config

    for dims in (TINY, memory.FLAN_T5["base"]):
        with torch.device("meta"):
            model = build_t5_from_config(vocab_size=dims.vocab, d_model=dims.d_model, d_ff=dims.d_ff,
                                         num_layers=dims.num_layers, num_decoder_layers=dims.num_decoder_layers,
                                         num_heads=dims.num_heads, d_kv=dims.d_kv)
        assert sum(p.numel() for p in model.parameters()) == memory.t5_parameter_count(dims)
    # the published sizes: 77M, 248M, 783M, 2.85B
    assert [memory.t5_parameter_count(d) for d in memory.FLAN_T5.values()] == [
        76_961_152, 247_577_856, 783_150_080, 2_849_757_184]


@pytest.mark.parametrize("quantization, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantised_count_is_what_the_package_quantises(tmp_path, quantization, layer):
    """flan_rlhf.policy's quantised base: the formula's quantised weights are the bitsandbytes layers'
    weights, and everything else is float32."""
    pytest.importorskip("bitsandbytes")
    from flan_rlhf.policy import PolicySpec, load_policy_model
    from tests.conftest import TINY_T5
    from tests.test_portable_exports import save_base

    save_base(tmp_path)
    model, _ = load_policy_model(PolicySpec(name_or_path=str(tmp_path), quantization=quantization,
                                            quant_compute_dtype="float32"))
    quantised = [m for m in model.modules() if type(m).__name__ == layer]
    dims = memory.T5Dims(d_model=TINY_T5["d_model"], d_ff=TINY_T5["d_ff"], num_layers=TINY_T5["num_layers"],
                         num_decoder_layers=TINY_T5.get("num_decoder_layers") or TINY_T5["num_layers"],
                         num_heads=TINY_T5["num_heads"], d_kv=TINY_T5.get("d_kv") or TINY_T5["d_model"] // TINY_T5["num_heads"],
                         vocab=model.config.vocab_size)
    assert sum(m.in_features * m.out_features for m in quantised) == memory.quantised_weight_count(dims)
    assert sum(m.out_features for m in quantised) == memory.quantised_output_rows(dims)
    in_layers = {id(m.weight) for m in quantised}
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    assert {p.dtype for p in rest} == {torch.float32}
    assert sum(p.numel() for p in rest) == memory.t5_parameter_count(dims) - memory.quantised_weight_count(dims)


def test_lora_counts():
    # 3 attention blocks (encoder self, decoder self, decoder cross), r*(in+out) = 2*(4+4) = 16 per target
    assert memory.lora_parameter_count(TINY, 2, ("q", "v")) == 2 * 3 * 16
    assert memory.lora_parameter_count(TINY, 2, ("q", "k", "v", "o")) == 4 * 3 * 16
    # flan-t5-base r=32 q,v: 2 * 36 blocks * 32 * (768 + 768) = 3,538,944, the recipe's "1.4% trainable"
    base = memory.FLAN_T5["base"]
    assert memory.lora_parameter_count(base, 32, ("q", "v")) == 3_538_944
    assert 1.4 < 100 * 3_538_944 / memory.t5_parameter_count(base) < 1.5
    with pytest.raises(ValueError, match="wi"):
        memory.lora_parameter_count(TINY, 2, ("q", "wi"))


def test_bytes_per_weight():
    assert memory.weight_bytes(TINY, "fp32") == 620 * 4 and memory.weight_bytes(TINY, "bf16") == 620 * 2
    # quantised: the block linears but wo: encoder q,k,v,o 64 + wi_0, wi_1 64 = 128, decoder 128 + 64 = 192
    # -> 320; the other 300 (wo, embedding, lm_head, norms, tables) stay float32: 1200 bytes.
    # output rows: encoder q,k,v 12 + o 4 + wi_0, wi_1 16 = 32; decoder 2*(12 + 4) + 16 = 48 -> 80.
    assert memory.quantised_weight_count(TINY) == 320 and memory.quantised_output_rows(TINY) == 80
    # int8: 1200 + 320 one-byte weights + 80 fp32 scales = 1840
    assert memory.weight_bytes(TINY, "int8") == 1200 + 320 + 80 * 4
    # nf4 with double quantisation: 4 + 8/64 + 32/(64*256) = 4.126953125 bits per weight (QLoRA)
    assert memory.NF4_BITS_PER_WEIGHT == 4.126953125
    assert memory.weight_bytes(TINY, "nf4") == pytest.approx(1200 + 320 * 4.126953125 / 8)
    with pytest.raises(ValueError):
        memory.weight_bytes(TINY, "fp8")
    # weight + gradient + two Adam moments
    assert memory.trainable_state_bytes(10, 4) == 160 and memory.trainable_state_bytes(10, 2) == 80


def test_activation_formula_on_a_tiny_case():
    w = memory.Workload(batch=1, prompt_tokens=2, response_tokens=1)
    # encoder, LoRA r=2 on q,v, per token: q,k,v 3i 12 + GELU in/out/linear 3f 24 + the adapters' input d 4 and
    # x A^T 2r 4 + q,k,v kept twice 3i 12 = 56 -> 112 over 2 tokens; norm inputs 2d per token -> 16; scores 2*2*2
    enc = memory.encoder_layer_elements(TINY, w, True, ("q", "v"), 2)
    assert enc == {"act": 112, "norm": 16, "softmax": 8}
    # decoder per response token: self q,k,v 3i + cross q i + 3f = 40, self adapters d + 2r = 8, cross q's d + r = 6,
    # q,k,v twice 3i = 12 -> 66; per prompt token: cross K,V 2i = 8, v's x A^T r = 2, K,V twice 2i = 8 -> 18 (x2)
    dec = memory.decoder_layer_elements(TINY, w, True, ("q", "v"), 2)
    assert dec == {"act": 66 + 36, "norm": 12, "softmax": 2 * (1 + 2)}
    act = memory.activation_bytes(TINY, w, "fp32", True, ("q", "v"), 2)
    # layers (112 + 102)*4 + (16 + 12)*4 = 968; softmax 14*4 = 56; bias 1*2*2*2*4 = 32;
    # logits 4 fp32 copies of 1*1*10 = 160; outputs (2*2 + 2*1)*4*4 = 96
    assert act == {"layers": 968, "softmax": 56, "bias": 32, "logits": 160, "outputs": 96, "total": 1312}
    # bf16: the same elements at 2 bytes, norm inputs still at 4 (kept in fp32), softmax fp32 + bf16 copy
    act16 = memory.activation_bytes(TINY, w, "bf16", True, ("q", "v"), 2)
    assert act16["layers"] == 214 * 2 + 28 * 4 and act16["softmax"] == 14 * 6
    # checkpointing keeps each block's input (d per token) and one block recomputed
    ckpt = memory.activation_bytes(TINY, w, "fp32", True, ("q", "v"), 2, checkpointing=True)
    assert ckpt["layers"] == (2 + 1) * 4 * 4 + max(112 * 4 + 16 * 4 + 8 * 4, 102 * 4 + 12 * 4 + 6 * 4)
    assert ckpt["softmax"] == 0


def test_activation_formula_matches_what_autograd_saves():
    """The per-layer count against the bytes autograd keeps in the package's own fused pass (flan-t5-small)."""
    row = memory.saved_activation_check("small", "fp32", memory.Workload(batch=2, prompt_tokens=128, response_tokens=16))
    assert abs(row["error_pct"]) < 2, row


def test_systems_count_their_copies():
    base, w = memory.FLAN_T5["base"], memory.Workload()
    ours = memory.system_memory("flan-rlhf LoRA q,v", base, "bf16", w)
    trl = memory.system_memory("TRL 0.11 full", base, "bf16", w)
    rl4lms = memory.system_memory("RL4LMs", base, "bf16", w)
    one_copy = memory.weight_bytes(base, "bf16")
    assert ours["weights"] == one_copy and trl["weights"] == one_copy and rl4lms["weights"] == one_copy
    # trained in full: weight + grad + 2 moments in bf16; RL4LMs trains policy and value model
    assert trl["trainable_state"] == (memory.t5_parameter_count(base) + 769) * 8
    assert rl4lms["trainable_state"] == (2 * memory.t5_parameter_count(base) + 768) * 8
    assert ours["peak"] < trl["peak"] < rl4lms["peak"]
    assert memory.system_memory("TRL 0.11 full", base, "nf4", w) is None  # no full fine-tuning of a 4-bit base
    quantised = memory.system_memory("flan-rlhf LoRA q,v", base, "nf4", w)
    # wo, the embedding and lm_head stay float32 (a third of flan-t5-base's weights): less than bf16, not a quarter
    assert one_copy / 2 < quantised["weights"] < one_copy
    with pytest.raises(ValueError):
        memory.system_memory("trlx", base, "bf16", w)


def test_markdown_prints_the_tables():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "memory.py"), "--markdown"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| flan-t5-base | 247,577,856 | 3,538,944 (1.43%)" in out
    assert sum(line.startswith(("| small |", "| base |", "| large |", "| xl |")) for line in out.splitlines()) == 16
    assert "| xl | nf4 |" in out and "n/a" in out
