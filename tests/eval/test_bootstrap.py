"""Paired bootstrap: coverage, width, pairing, and the statistic-over-indices path."""
import numpy as np
import pytest
import torch
from torchmetrics.text import BLEUScore

from flan_rlhf.eval.bootstrap import (
    bootstrap_indices,
    index_counts,
    mean_statistic,
    paired_bootstrap,
    paired_bootstrap_statistic,
    ratio_statistic,
)
from flan_rlhf.eval.metrics import bleu_from_statistics, bleu_statistics


def _synthetic(n, rng, true_delta=-0.1):
    """Per-prompt values: after = before + true_delta + noise, so the population difference is true_delta."""
    before = rng.normal(0.5, 0.2, size=n)
    return before, before + true_delta + rng.normal(0.0, 0.1, size=n)


def test_ci_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(123)
    covered = 0
    for trial in range(40):
        before, after = _synthetic(200, rng)
        delta = paired_bootstrap(before, after, n_resamples=400, seed=trial).delta
        assert delta.ci_low <= delta.value <= delta.ci_high
        assert delta.value == pytest.approx(after.mean() - before.mean())
        covered += delta.ci_low <= -0.1 <= delta.ci_high
    assert covered >= 34  # 95% nominal; 34/40 leaves room for sampling noise (P(fail) < 1%)


def test_ci_is_narrower_with_more_prompts():
    rng = np.random.default_rng(7)
    small = paired_bootstrap(*_synthetic(100, rng), seed=0).delta
    large = paired_bootstrap(*_synthetic(1600, rng), seed=0).delta
    assert large.width < 0.5 * small.width  # width ~ 1/sqrt(n): expected ratio 1/4


def test_pairing_removes_the_shared_prompt_variance():
    before = np.random.default_rng(0).uniform(0, 1, size=50)
    result = paired_bootstrap(before, before + 0.1)
    assert result.delta.ci_low == pytest.approx(0.1) and result.delta.ci_high == pytest.approx(0.1)
    assert result.before.width > 0.1  # each side alone is uncertain; the paired difference is not


def test_statistic_path_equals_a_plain_loop_over_seeded_indices():
    values_before = np.arange(10, dtype=float)
    values_after = values_before ** 2 / 10
    indices = bootstrap_indices(10, n_resamples=300, seed=5)
    loop = [values_after[row].mean() - values_before[row].mean() for row in indices]
    result = paired_bootstrap_statistic(mean_statistic(values_before), mean_statistic(values_after), 10,
                                        n_resamples=300, seed=5)
    assert result.delta.ci_low == pytest.approx(np.quantile(loop, 0.025))
    assert result.delta.ci_high == pytest.approx(np.quantile(loop, 0.975))


def test_ratio_statistic_weights_prompts_by_their_sample_count():
    # prompt 0: two samples summing to 1.0; prompt 1: one sample of 4.0 -> mean over samples = 5/3
    statistic = ratio_statistic(np.array([1.0, 4.0]), np.array([2.0, 1.0]))
    assert statistic(np.array([[0, 1]]))[0] == pytest.approx(5 / 3)
    assert statistic(np.array([[0, 0]]))[0] == pytest.approx(0.5)  # prompt 0 drawn twice
    assert index_counts(np.array([[0, 0], [1, 0]]), 2).tolist() == [[2, 0], [1, 1]]


def test_corpus_bleu_statistic_equals_bleu_of_the_resampled_corpus():
    preds = ["the cat sat on the mat", "a dog ran in the park", "hello there my friend",
             "it is raining today"]
    refs = ["the cat sat on a mat", "the dog ran in a park", "hello my good friend", "it rains today"]
    per_prompt = bleu_statistics(preds, refs).numpy()
    drawn = np.array([[0, 0, 1, 3]])
    statistic = bleu_from_statistics(torch.from_numpy(per_prompt[drawn].sum(axis=1)))[0].item()
    expected = BLEUScore()([preds[i] for i in drawn[0]], [[refs[i]] for i in drawn[0]]).item()
    assert statistic == pytest.approx(expected, abs=1e-6)


def test_unpaired_input_is_rejected():
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(np.zeros(3), np.zeros(3), confidence=95)
