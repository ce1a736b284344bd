"""Decoding options: each allowed in evaluation and ``generate`` (and doing there what it should), each
refused in training with one line naming it and why (flan_rlhf.settings.check_generation_settings)."""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from flan_rlhf.rollout import collect_experience, evaluate_responses, response_mask, sampling_logits, tokenize_prompts
from flan_rlhf.settings import (TRAINING_REFUSES, GenerationSettings, SettingsError, check_generation_settings)
from tests.conftest import error_lines, run_command

GREEDY = GenerationSettings(max_new_tokens=24, do_sample=False)
PROMPTS = ["the cat sat on", "a dog ran", "hello there my friend", "why is the sky"]
#: one value per option that training refuses (each changes what is decoded)
EVALUATION_ONLY = {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2,
                   "top_k": 5, "top_p": 0.5}


# ----------------------------------------------------------------------------- the checks (pure)
@pytest.mark.parametrize("name", sorted(TRAINING_REFUSES))
def test_training_refuses_each_biasing_option_in_one_line_naming_it(name):
    settings = GenerationSettings(**{name: EVALUATION_ONLY[name]})
    with pytest.raises(SettingsError) as err:
        check_generation_settings(settings, "generation.", training=True)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"generation.{name} is {EVALUATION_ONLY[name]!r}")
    assert TRAINING_REFUSES[name][1] in line and "eval_generation" in line
    assert check_generation_settings(settings, "eval_generation.", training=False) is settings


def test_training_takes_temperature_and_min_new_tokens():
    settings = GenerationSettings(max_new_tokens=8, min_new_tokens=3, temperature=0.7)
    assert check_generation_settings(settings, "generation.", training=True) is settings


@pytest.mark.parametrize("changes, expected", [
    (dict(length_penalty=2.0), "length_penalty is 2.0 but it acts only in beam search; set --num_beams above 1"),
    (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens is 9; use 0 to --max_new_tokens (8)"),
    (dict(num_beams=0), "num_beams is 0; use 1 (off) or more"),
    (dict(top_p=0.0), "top_p is 0.0; use a mass in (0, 1]"),
    (dict(repetition_penalty=0.0), "repetition_penalty is 0.0; use a positive number"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size is -1; use 0 (off)"),
    (dict(temperature=0.0), "temperature is 0.0; use a positive number"),
])
def test_values_no_decoder_can_use_are_refused_everywhere(changes, expected):
    for training in (False, True):
        with pytest.raises(SettingsError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            check_generation_settings(GenerationSettings(**changes), "--", training=training)


def test_modes_and_generate_kwargs():
    assert [GenerationSettings(**c).mode for c in ({}, {"do_sample": False}, {"do_sample": False, "num_beams": 4},
                                                     {"num_beams": 4})] == ["sampled", "greedy", "beam search",
                                                                            "beam sampling"]
    assert not GenerationSettings(top_k=5, top_p=0.5, do_sample=False, min_new_tokens=2).needs_hf_generate
    for name in ("num_beams", "repetition_penalty", "no_repeat_ngram_size"):
        assert GenerationSettings(**{name: EVALUATION_ONLY[name]}).needs_hf_generate
    beams = GenerationSettings(do_sample=False, num_beams=4, length_penalty=0.5, min_new_tokens=2).generate_kwargs()
    assert beams == dict(max_new_tokens=64, min_new_tokens=2, do_sample=False, num_beams=4, repetition_penalty=1.0,
                         no_repeat_ngram_size=0, use_cache=True, length_penalty=0.5, temperature=None, top_k=None,
                         top_p=None)
    sampled = GenerationSettings(temperature=0.5, top_k=3).generate_kwargs()
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (0.5, 3, 1.0)
    assert "length_penalty" not in sampled  # generate warns that it does nothing without beams


def test_sampling_logits_scales_and_bans_eos_before_min_new_tokens():
    logits = torch.tensor([[[2.0, 4.0, 0.0], [6.0, 2.0, -2.0], [0.0, 8.0, 4.0]]])  # (1, 3 positions, vocab 3)
    low = torch.finfo(torch.float32).min
    out = sampling_logits(logits, 2.0, min_new_tokens=2, eos_token_id=1)
    assert torch.equal(out, torch.tensor([[[1.0, low, 0.0], [3.0, low, -1.0], [0.0, 4.0, 2.0]]]))
    # a sampling step at response position 1 sees one banned position; from position 2 on nothing is banned
    assert torch.equal(sampling_logits(logits[:, :1], 1.0, 2, 1, first_position=1), torch.tensor([[[2.0, low, 0.0]]]))
    assert sampling_logits(logits, 1.0, 2, 1, first_position=2) is logits
    assert sampling_logits(logits, 1.0, 0, 1) is logits


# ----------------------------------------------------------------------------- evaluation: what each option does
@pytest.fixture(scope="module")
def module():
    from flan_rlhf.module import PPOModule
    from flan_rlhf.policy import LoraSettings
    from tests.conftest import TokenFractionReward, tiny_policy_spec

    torch.manual_seed(0)  # LoRA's A matrices: the same model whatever ran before
    built = PPOModule(policy=tiny_policy_spec(), reward=TokenFractionReward(), lora=LoraSettings(r=4, alpha=8),
                      generation=GenerationSettings(max_new_tokens=24), log_samples_every_n_steps=0)
    built.configure_model()
    with torch.no_grad():  # LoRA B starts at 0: make the adapters matter, so the policy is not the reference
        for name, param in built.actor.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    built.eval()
    # A random model never emits EOS: give EOS the output row of the token greedy decoding picks most, a
    # little longer, so EOS wins where that token would (responses then end at different lengths).
    tokens, counts = _decode(built, GREEDY)[0].unique(return_counts=True)
    head = built.actor.base_model.lm_head
    with torch.no_grad():
        head.weight[built.tokenizer.eos_token_id] = 1.05 * head.weight[tokens[counts.argmax()]]
    return built


def _decode(module, settings: GenerationSettings, seed: int = 0):
    """``(responses, response lengths, logprobs, ref_logprobs)`` of the evaluation path for PROMPTS."""
    torch.manual_seed(seed)
    rollout = module.rollout(PROMPTS, settings, scored=False)
    return rollout.responses, rollout.mask.sum(dim=1), rollout.logprobs, rollout.ref_logprobs


def _repeated_ngrams(responses: torch.Tensor, mask: torch.Tensor, n: int) -> int:
    """How many n-grams of the responses (up to EOS) repeat an earlier n-gram of the same response."""
    count = 0
    for row, keep in zip(responses.tolist(), mask.tolist()):
        tokens = row[: int(sum(keep))]
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        count += len(grams) - len(set(grams))
    return count


def _hf_generate(module, settings: GenerationSettings) -> torch.Tensor:
    ids, mask, _ = tokenize_prompts(module.tokenizer, PROMPTS, 512, "cpu")
    return module.actor.base_model.generate(
        input_ids=ids, attention_mask=mask, pad_token_id=module.tokenizer.pad_token_id,
        eos_token_id=module.tokenizer.eos_token_id, decoder_start_token_id=0, **settings.generate_kwargs())[:, 1:]


def test_beam_search_finds_likelier_responses_than_greedy_and_is_generates_own(module):
    beams = replace(GREEDY, num_beams=4, length_penalty=0.0)  # 0: beams ranked by their summed log-prob
    responses, _, logprobs, ref = _decode(module, beams)
    assert torch.equal(responses, _hf_generate(module, beams))
    assert not torch.equal(responses, _decode(module, GREEDY)[0])
    # the evaluation's log-probs are the teacher-forced ones of the decoded responses
    ids, attention, _ = tokenize_prompts(module.tokenizer, PROMPTS, 512, "cpu")
    forced, _, forced_ref, _ = evaluate_responses(module.actor, ids, attention, responses, 0, 1.0)
    mask = response_mask(responses, 1)
    torch.testing.assert_close(logprobs, forced)
    torch.testing.assert_close(ref, forced_ref)
    assert not torch.allclose(logprobs * mask, ref * mask), "the policy's log-probs, not the reference's"
    # Over two tokens the 4 beams hold greedy's first token and every continuation of it is weighed,
    # so beam search's best is at least as likely as greedy's (over more tokens HF's beam search may
    # drop an early-EOS hypothesis that ranks below the top num_beams candidates).
    two = [_decode(module, replace(settings, max_new_tokens=2)) for settings in (beams, GREEDY)]
    beam_sum, greedy_sum = [(logp * response_mask(tokens, 1)).sum(dim=1) for tokens, _, logp, _ in two]
    assert torch.all(beam_sum >= greedy_sum - 1e-5) and torch.any(beam_sum > greedy_sum + 1e-3)


def test_length_penalty_changes_which_beam_wins(module):
    short = replace(GREEDY, num_beams=4, length_penalty=-2.0)
    long = replace(GREEDY, num_beams=4, length_penalty=2.0)
    assert _decode(module, long)[1].sum() > _decode(module, short)[1].sum()


def test_no_repeat_ngram_size_leaves_no_repeated_ngram(module):
    responses, _, _, _ = _decode(module, GREEDY)
    assert _repeated_ngrams(responses, response_mask(responses, 1), 2) > 0, "greedy repeats itself here"
    blocked, _, _, _ = _decode(module, replace(GREEDY, no_repeat_ngram_size=2))
    assert _repeated_ngrams(blocked, response_mask(blocked, 1), 2) == 0


def test_repetition_penalty_repeats_fewer_tokens(module):
    responses, _, _, _ = _decode(module, GREEDY)
    penalised, _, _, _ = _decode(module, replace(GREEDY, repetition_penalty=5.0))
    plain = _repeated_ngrams(responses, response_mask(responses, 1), 1)
    assert _repeated_ngrams(penalised, response_mask(penalised, 1), 1) < plain


def test_top_k_1_and_a_tiny_top_p_sample_what_greedy_picks(module):
    greedy = _decode(module, GREEDY)[0]
    sampled = [_decode(module, GenerationSettings(max_new_tokens=24), seed)[0] for seed in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1]), "plain sampling varies with the seed"
    for truncated in (GenerationSettings(max_new_tokens=24, top_k=1), GenerationSettings(max_new_tokens=24, top_p=1e-6)):
        for seed in (0, 1):
            assert torch.equal(_decode(module, truncated, seed)[0], greedy)


def test_min_new_tokens_delays_eos_in_evaluation(module):
    lengths = _decode(module, GREEDY)[1]
    assert lengths.min() < 10, "some greedy response ends before 10 tokens here"
    assert _decode(module, replace(GREEDY, min_new_tokens=10))[1].min() > 10  # EOS at position 10 at the earliest
    assert _decode(module, replace(GREEDY, num_beams=2, min_new_tokens=10))[1].min() > 10


def test_evaluation_settings_never_reach_the_training_sampler(module):
    """Beam search, repetition settings: collect_experience decodes them with generate (the sampler refuses)."""
    ids, mask, _ = tokenize_prompts(module.tokenizer, PROMPTS, 512, "cpu")
    from flan_rlhf.rollout import sample_with_statistics

    with pytest.raises(ValueError, match="decode through transformers' generate"):
        sample_with_statistics(module.actor, ids, mask, replace(GREEDY, num_beams=2), module.tokenizer)
    responses = collect_experience(module.actor, ids, mask, replace(GREEDY, no_repeat_ngram_size=2), module.tokenizer,
                                   0, with_reference=False)[0]
    assert _repeated_ngrams(responses, response_mask(responses, 1), 2) == 0


# ----------------------------------------------------------------------------- the commands
def test_fit_refuses_each_training_option_in_one_line(tmp_path):
    from tests.test_cli import tiny_config

    config = tiny_config(tmp_path)
    for name, value in EVALUATION_ONLY.items():
        code, _, err = run_command("fit", "--config", config, f"--model.init_args.generation.{name}", str(value))
        lines = error_lines(err)
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith(f"error: generation.{name} is {value!r} but training rollouts must be draws")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_validate_decodes_with_beam_search_from_eval_generation(tmp_path, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    from tests.test_cli import tiny_config

    calls = []
    generate = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        calls.append({key: kwargs.get(key) for key in ("num_beams", "no_repeat_ngram_size", "do_sample")})
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    config = tiny_config(tmp_path, max_steps=1)
    beams = ["--model.init_args.eval_generation", json.dumps({"max_new_tokens": 8, "do_sample": False,
                                                             "num_beams": 2, "no_repeat_ngram_size": 2})]
    code, out, err = run_command("validate", "--config", config, *beams)
    assert code == 0, err[-3000:]
    assert calls and all(call == {"num_beams": 2, "no_repeat_ngram_size": 2, "do_sample": False} for call in calls)
    assert "val/kl" in out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, module):
    folder = tmp_path_factory.mktemp("merged")
    copy.deepcopy(module.actor.policy).merge_and_unload().save_pretrained(folder)  # the fixture's LoRA folded in
    module.tokenizer.save_pretrained(folder)
    return str(folder)


def test_generate_command_takes_every_decoding_option(tmp_path, model_dir, monkeypatch):
    from transformers.generation.utils import GenerationMixin

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    calls = []
    generate = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        calls.append(kwargs)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)

    def run(name: str, *flags: str) -> list[str]:
        calls.clear()
        code, _, err = run_command("generate", "--model", model_dir, "--input", str(prompts),
                                   "--output", str(tmp_path / f"{name}.jsonl"), "--max_new_tokens", "24", *flags)
        assert code == 0, err[-2000:]
        return [json.loads(line)["response"] for line in open(tmp_path / f"{name}.jsonl")]

    greedy = run("greedy", "--greedy", "true")
    assert not calls and any(greedy), "greedy decodes through the fused sampler here"
    assert run("top_k", "--top_k", "1") == greedy
    # each option reaches transformers' generate (what each does there is tested above, on the same path)
    for option, value, extra in (("num_beams", 4, ()), ("length_penalty", 0.0, ("--num_beams", "2")),
                                 ("no_repeat_ngram_size", 2, ()), ("repetition_penalty", 5.0, ()),
                                 ("min_new_tokens", 10, ("--hf_generate", "true"))):
        run(option, "--greedy", "true", f"--{option}", str(value), *extra)
        assert len(calls) == 1 and calls[0][option] == value and calls[0]["do_sample"] is False, (option, calls)
    code, _, err = run_command("generate", "--model", model_dir, "--input", str(prompts), "--output",
                               str(tmp_path / "bad.jsonl"), "--length_penalty", "2.0")
    assert code == 2 and error_lines(err) == [
        "error: --length_penalty is 2.0 but it acts only in beam search; set --num_beams above 1, or leave "
        "length_penalty at 1.0"]
    assert not (tmp_path / "bad.jsonl").exists()
