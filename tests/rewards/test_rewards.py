"""Reward sources: offline scorers on hand-written sentences, detoxify/classifier on tiny models
the tests build, composite, shaping and output validation."""
from __future__ import annotations

import math
import urllib.error

import pytest
import torch
from tests.rewards_helpers import save_classifier, save_detoxify_checkpoint, tiny_bert_classifier, write_bert_tokenizer
from tests.rewards.sentences import INSULTING, KIND
from sklearn.metrics import roc_auc_score

from flan_rlhf.rewards import (
    ClassifierReward,
    CompositeReward,
    DetoxifyReward,
    ProfanityReward,
    Reward,
    RewardOutputError,
    VaderReward,
    label_index,
)
from flan_rlhf.reward_shaping import RewardShaper
from flan_rlhf.rewards.base import RewardOptionError
from flan_rlhf.rewards.text_batches import batched, texts_to_score


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class ConstantReward(Reward):
    """Returns fixed values, for composite/validation tests."""

    def __init__(self, name: str, values: list[float] | torch.Tensor) -> None:
        self.name = name
        self.values = values
        self.setup_devices: list[str] = []

    def setup(self, device="cpu"):
        self.setup_devices.append(str(device))
        return self

    def components(self, prompts, responses):
        return {self.name: torch.as_tensor(self.values, dtype=torch.float32)}


# -- offline scorers on the fixed sentences -----------------------------------------------------
def kind_vs_insulting(reward: Reward) -> tuple[float, float, float]:
    """(mean over kind, mean over insulting, ROC-AUC with kind as the positive class)."""
    sentences = KIND + INSULTING
    scores = reward([""] * len(sentences), sentences)
    labels = [1] * len(KIND) + [0] * len(INSULTING)
    kind_mean = scores[: len(KIND)].mean().item()
    insulting_mean = scores[len(KIND) :].mean().item()
    return kind_mean, insulting_mean, roc_auc_score(labels, scores.numpy())


def test_sentence_lists_are_balanced_and_at_least_forty():
    assert len(KIND) == len(INSULTING) and len(KIND) + len(INSULTING) >= 40
    assert not set(KIND) & set(INSULTING)


def test_profanity_reward_ranks_kind_above_insulting():
    kind_mean, insulting_mean, auc = kind_vs_insulting(ProfanityReward())
    assert kind_mean > insulting_mean
    assert auc >= 0.95


def test_vader_positivity_ranks_kind_above_insulting():
    kind_mean, insulting_mean, auc = kind_vs_insulting(VaderReward())
    assert kind_mean > insulting_mean
    assert auc >= 0.95


def test_profanity_reward_is_one_minus_toxicity_and_batches_agree():
    from profanity_check import predict_prob

    texts = KIND[:5] + INSULTING[:5]
    expected = 1.0 - torch.tensor(predict_prob(texts), dtype=torch.float32)
    small_batches = ProfanityReward(batch_size=3)
    assert torch.allclose(small_batches([""] * 10, texts), expected, atol=1e-6)
    assert torch.allclose(small_batches.toxicity(texts), 1.0 - expected, atol=1e-6)


def test_vader_reward_matches_the_compound_score_and_prompt_option():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    reward, components = VaderReward(name="pos").score(["I hate this."], ["What a lovely day!"])
    assert set(components) == {"pos"}
    assert reward.item() == pytest.approx(analyzer.polarity_scores("What a lovely day!")["compound"], abs=1e-6)
    with_prompt = VaderReward(score_prompt=True)(["I hate this."], ["What a lovely day!"])
    assert with_prompt.item() == pytest.approx(
        analyzer.polarity_scores("I hate this.\nWhat a lovely day!")["compound"], abs=1e-6
    )


def test_texts_to_score_and_batched():
    assert texts_to_score(["p1", "p2"], ["r1", "r2"], score_prompt=False) == ["r1", "r2"]
    assert texts_to_score(["p1", "p2"], ["r1", "r2"], score_prompt=True) == ["p1\nr1", "p2\nr2"]
    assert [list(chunk) for chunk in batched([1, 2, 3, 4, 5], 2)] == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="one prompt per response"):
        texts_to_score(["p1"], ["r1", "r2"], score_prompt=True)


# -- Detoxify offline from a checkpoint the test builds -----------------------------------------
DETOX_BIAS = [2.0, -3.0, 0.0, -1.0, 1.0, -2.0]  # toxic, severe_toxic, obscene, threat, insult, identity_hate


def test_detoxify_loads_offline_and_returns_per_label_scores(tmp_path):
    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, DETOX_BIAS)
    reward = DetoxifyReward(
        checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), labels={"toxicity": 3.0, "insult": 1.0}
    ).setup("cpu")
    assert reward.class_names == ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
    per_label = reward.label_scores(["you are kind", "hello world"])
    for column, label in enumerate(reward.class_names):
        assert torch.allclose(per_label[label], torch.full((2,), sigmoid(DETOX_BIAS[column])), atol=1e-6)

    total, components = reward.score(["", ""], ["you are kind", "hello world"])
    assert set(components) == {"non_toxicity_toxicity", "non_toxicity_insult"}
    assert components["non_toxicity_toxicity"][0].item() == pytest.approx(1 - sigmoid(2.0), abs=1e-6)
    assert components["non_toxicity_insult"][0].item() == pytest.approx(1 - sigmoid(1.0), abs=1e-6)
    expected = 1 - (0.75 * sigmoid(2.0) + 0.25 * sigmoid(1.0))  # weights 3:1 normalised
    assert torch.allclose(total, torch.full((2,), expected), atol=1e-6)
    assert reward.toxicity(["a"]).item() == pytest.approx(1 - expected, abs=1e-6)
    assert not reward._detoxify.model.training


def test_detoxify_single_label_component_uses_the_reward_name(tmp_path):
    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, DETOX_BIAS)
    reward = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), labels="threat")
    total, components = reward.score(["p"], ["you are stupid"])
    assert list(components) == ["non_toxicity"]
    assert total.item() == pytest.approx(1 - sigmoid(-1.0), abs=1e-6)


def test_detoxify_unknown_label_is_named(tmp_path):
    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, DETOX_BIAS)
    reward = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), labels="toxic_typo")
    with pytest.raises(ValueError, match="toxic_typo"):
        reward.setup()


def test_detoxify_missing_checkpoint_gives_one_line_error(tmp_path):
    reward = DetoxifyReward(checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError) as caught:
        reward.setup()
    assert "nope.ckpt" in str(caught.value) and "\n" not in str(caught.value)


def test_detoxify_download_failure_offline_gives_one_line_error_naming_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError) as caught:
        DetoxifyReward(model_type="unbiased").setup()
    message = str(caught.value)
    assert "\n" not in message
    assert "toxic_debiased-c7548aa0.ckpt" in message and "checkpoint" in message and "huggingface_config_path" in message


def test_detoxify_rejects_bad_options():
    with pytest.raises(ValueError, match="model_type"):
        DetoxifyReward(model_type="huge")
    with pytest.raises(ValueError, match="negative"):
        DetoxifyReward(labels={"toxicity": -1.0})


# -- Hugging Face classifier: label by NAME ----------------------------------------------------
def test_classifier_reads_the_label_by_name_not_position(tmp_path):
    bias = [5.0, -5.0]  # column 0 logit 5, column 1 logit -5, for every input
    normal = save_classifier(tmp_path / "normal", {0: "nothate", 1: "hate"}, bias)
    swapped = save_classifier(tmp_path / "swapped", {0: "hate", 1: "nothate"}, bias)
    texts = ["you are stupid", "thank you"]

    assert torch.allclose(ClassifierReward(model=str(normal), label="nothate")([""] * 2, texts), torch.tensor([5.0, 5.0]))
    assert torch.allclose(ClassifierReward(model=str(swapped), label="nothate")([""] * 2, texts), torch.tensor([-5.0, -5.0]))

    prob = ClassifierReward(model=str(swapped), label="nothate", output="prob")
    assert prob([""], ["hello"]).item() == pytest.approx(1 / (1 + math.exp(10.0)), rel=1e-5)
    penalty = ClassifierReward(model=str(normal), label="HATE", sign=-1, name="not_hate")  # case-insensitive match
    total, components = penalty.score([""], ["hello"])
    assert list(components) == ["not_hate"] and total.item() == pytest.approx(5.0)


def test_classifier_unknown_label_lists_the_model_labels(tmp_path):
    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, [0.0, 0.0])
    with pytest.raises(ValueError, match="'nothate', 'hate'"):
        ClassifierReward(model=str(folder), label="toxic").setup()
    assert label_index({0: "NEGATIVE", 1: "POSITIVE"}, "positive") == 1


def test_classifier_missing_model_offline_gives_one_line_error(tmp_path):
    with pytest.raises(OSError) as caught:
        ClassifierReward(model=str(tmp_path / "missing"), local_files_only=True).setup()
    assert "save_pretrained" in str(caught.value) and "\n" not in str(caught.value)


def test_classifier_runs_in_eval_mode_without_grad_and_batches_consistently(tmp_path):
    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, bias=None, dropout=0.9)
    texts = ["you are kind", "you are stupid idiot", "hello", "thank you world", "a"]
    reward = ClassifierReward(model=str(folder), label="hate", batch_size=2).setup("cpu")
    first, second = reward([""] * 5, texts), reward([""] * 5, texts)
    assert torch.equal(first, second)  # dropout 0.9 would make these differ in train mode
    assert not reward._model.training and not any(p.requires_grad for p in reward._model.parameters())

    reference = tiny_bert_classifier(2, None, 0.9).eval()
    tokenizer = write_bert_tokenizer(tmp_path / "tok")
    with torch.no_grad():
        expected = torch.stack([reference(**tokenizer([text], return_tensors="pt")).logits[0, 1] for text in texts])
    assert torch.allclose(first, expected, atol=1e-5)  # batch of 2 with padding == one at a time
    assert first.std() > 0  # the random model does look at the text


# -- composite -------------------------------------------------------------------------------
def test_composite_is_the_weighted_sum_and_reports_each_component():
    composite = CompositeReward(
        [ConstantReward("non_toxicity", [1.0, 0.0]), ConstantReward("positivity", [0.5, -1.0])], weights=[1.0, 0.5]
    )
    composite.setup("cpu")
    assert [child.setup_devices for child in composite.rewards] == [["cpu"], ["cpu"]]
    total, components = composite.score(["", ""], ["a", "b"])
    assert torch.allclose(total, torch.tensor([1.25, -0.5]))
    assert torch.allclose(components["non_toxicity"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(components["positivity"], torch.tensor([0.5, -1.0]))


def test_composite_of_offline_scorers_ranks_kind_above_insulting():
    composite = CompositeReward([ProfanityReward(name="non_toxicity"), VaderReward()], weights=[1.0, 0.5])
    kind_mean, insulting_mean, auc = kind_vs_insulting(composite)
    assert kind_mean > insulting_mean and auc >= 0.95


def test_composite_rejects_bad_configuration():
    with pytest.raises(ValueError, match="distinct"):
        CompositeReward([ConstantReward("a", [1.0]), ConstantReward("a", [2.0])])
    with pytest.raises(ValueError, match="one weight per reward"):
        CompositeReward([ConstantReward("a", [1.0])], weights=[1.0, 2.0])


# -- output validation --------------------------------------------------------------------------
def test_wrong_shape_reward_raises_naming_the_reward():
    with pytest.raises(RewardOutputError, match="'too_many'.*\\(3,\\)"):
        ConstantReward("too_many", [1.0, 2.0])(["", "", ""], ["a", "b", "c"])
    composite = CompositeReward([ConstantReward("fine", [1.0, 2.0]), ConstantReward("broken_child", [[1.0, 2.0]] * 2)])
    with pytest.raises(RewardOutputError, match="broken_child"):
        composite(["", ""], ["a", "b"])


def test_nan_scores_pass_validation_for_the_training_guard():
    total = ConstantReward("nan", [float("nan"), 1.0])(["", ""], ["a", "b"])
    assert math.isnan(total[0].item()) and total[1].item() == 1.0


# -- shaping --------------------------------------------------------------------------------------
def test_reward_shaper_normalises_scales_clips_and_resumes_exactly():
    shaper = RewardShaper(normalize=True, scale=2.0, clip=1.5)
    # batch 1: mean 2, unbiased std 1 -> z = [-1, 0, 1] -> x2 = [-2, 0, 2] -> clipped to 1.5
    assert torch.allclose(shaper(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.5, 0.0, 1.5]))

    resumed = RewardShaper(normalize=True, scale=2.0, clip=1.5)
    resumed.load_state_dict(shaper.state_dict())
    batch = torch.tensor([4.0, 5.0, float("nan")])
    # after 1..5: mean 3, unbiased std sqrt(10 / 4); NaN is neither merged nor hidden
    std = math.sqrt(2.5)
    expected = torch.tensor([2 * 1 / std, min(2 * 2 / std, 1.5), float("nan")])
    assert torch.allclose(shaper(batch), expected, equal_nan=True, atol=1e-6)
    assert torch.allclose(resumed(batch), expected, equal_nan=True, atol=1e-6)
    assert shaper.state_dict() == resumed.state_dict() and shaper.state_dict()["moments"]["count"] == 5


def test_reward_shaper_holds_a_lone_first_value_until_it_has_a_std():
    shaper = RewardShaper(normalize=True)
    assert torch.allclose(shaper(torch.tensor([3.0, float("inf")]))[:1], torch.tensor([3.0]))  # mean 0, std 1
    assert shaper.state_dict() == {"moments": {"mean": 0.0, "var": 1.0, "std": 1.0, "count": 0}, "pending": [3.0]}
    resumed = RewardShaper(normalize=True)
    resumed.load_state_dict(shaper.state_dict())
    # 3 and 1: mean 2, unbiased std sqrt(2) -> (1 - 2) / sqrt(2)
    assert resumed(torch.tensor([1.0])).item() == pytest.approx(-1 / math.sqrt(2), abs=1e-6)
    assert resumed.state_dict()["pending"] == [] and resumed.state_dict()["moments"]["count"] == 2


def test_reward_shaper_without_normalisation_only_scales_and_clips():
    shaper = RewardShaper(scale=0.5, clip=1.0)
    assert torch.allclose(shaper(torch.tensor([-4.0, 1.0, 4.0])), torch.tensor([-1.0, 0.5, 1.0]))
    assert shaper.state_dict()["moments"]["count"] == 0
    with pytest.raises(ValueError, match="clip"):
        RewardShaper(clip=0.0)


def test_word_list_reward_is_one_for_clean_responses_and_zero_for_listed_words_or_fragments():
    from flan_rlhf.rewards import WordListReward

    reward = WordListReward(["idiot", "dumb luck"], name="no_insult")
    scores = reward(["p"] * 5, ["A calm summary.", "You IDIOT!", "what an idio", "pure dumb luck", "a quiet duck"])
    assert scores.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]  # a 4-letter fragment of a listed word or phrase counts
    assert WordListReward(["idiot"], min_fragment=100)(["p"], ["idio"]).tolist() == [1.0]  # whole words only
    with pytest.raises(RewardOptionError, match="WordListReward: insult vocabulary is empty"):
        WordListReward([])


def test_monitors_need_names_of_their_own():
    from flan_rlhf.rewards import CompositeReward, ProfanityReward, VaderReward, WordListReward
    from flan_rlhf.rewards.base import check_monitors

    training = CompositeReward([ProfanityReward(), VaderReward()])
    assert check_monitors(training, None) == []
    watched = [WordListReward(["idiot"], name="no_insult")]
    assert check_monitors(training, watched) == watched
    assert check_monitors(None, [VaderReward()])[0].name == "positivity"  # DPO on stored pairs has no reward
    with pytest.raises(RewardOptionError, match="monitor 'positivity' has the name of the training reward or one of its parts"):
        check_monitors(training, [VaderReward()])  # a part of the composite
    with pytest.raises(RewardOptionError, match="two monitors share the name 'no_insult'"):
        check_monitors(ProfanityReward(), watched * 2)
    with pytest.raises(RewardOptionError, match="monitors take rewards"):
        check_monitors(ProfanityReward(), ["vader"])
