"""Evaluation metrics against values worked out by hand (and against torchmetrics' own classes)."""
import math

import pytest
import torch
from torchmetrics.text import BLEUScore, ROUGEScore, SacreBLEUScore

from flan_rlhf.eval import metrics as M
from flan_rlhf.eval.metrics import (
    DistinctNgrams,
    QualityMetrics,
    ResponseLength,
    ToxicityMetrics,
    bleu_from_statistics,
    bleu_statistics,
    distinct_n,
    insult_flags,
    insult_fraction,
    resolve_rouge_keys,
    rouge_per_sample,
    sacrebleu_tokenizer,
)


# ----------------------------------------------------------------------------- ROUGE
def test_rouge_single_reference_by_hand():
    # "the cat sat" vs "the cat ran": 2 of 3 unigrams match both ways -> P = R = F = 2/3;
    # bigrams {the cat, cat sat} vs {the cat, cat ran}: 1 of 2 -> 1/2; LCS "the cat" = 2 -> 2/3.
    scores = rouge_per_sample(["the cat sat"], ["the cat ran"])
    assert scores["rouge1"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert scores["rouge2"].item() == pytest.approx(1 / 2, abs=1e-6)
    assert scores["rougeL"].item() == pytest.approx(2 / 3, abs=1e-6)


def test_rouge_multi_reference_takes_best_reference():
    # vs "the cat sat on a mat": matches the, cat, sat, on, mat = 5 of 6 each way -> F = 5/6;
    # vs "a dog ran": nothing -> 0. The best reference wins, whatever its position.
    prediction = ["the cat sat on the mat"]
    for refs in (["a dog ran", "the cat sat on a mat"], ["the cat sat on a mat", "a dog ran"]):
        assert rouge_per_sample(prediction, [refs])["rouge1"].item() == pytest.approx(5 / 6, abs=1e-6)
    metric = QualityMetrics(rouge_lsum=False)
    metric.update(["the cat sat", "the cat sat on the mat"],
                  [["the cat ran"], ["a dog ran", "the cat sat on a mat"]])
    assert metric.compute()["rouge1"].item() == pytest.approx((2 / 3 + 5 / 6) / 2, abs=1e-6)


def test_rouge_lsum_by_hand_differs_from_rouge_l():
    # pred sentences [the cat sat] [it was fine]; ref sentences [it was fine] [the cat ran].
    # Lsum: union-LCS hits 3 (it was fine) + 2 (the cat) = 5 of 6 -> 5/6.
    # L on the whole text: LCS("the cat sat it was fine", "it was fine the cat ran") = 3 -> 1/2.
    assert M.sentence_splitter_available()  # the packaged splitter, offline
    scores = rouge_per_sample(["The cat sat. It was fine."], ["It was fine. The cat ran."],
                              ("rougeL", "rougeLsum"))
    assert scores["rougeLsum"].item() == pytest.approx(5 / 6, abs=1e-6)
    assert scores["rougeL"].item() == pytest.approx(1 / 2, abs=1e-6)


@pytest.mark.parametrize("text, sentences", [
    ("They take Bus No. 5 to the station. It is late.", ["They take Bus No. 5 to the station.", "It is late."]),
    ("She has a B.A. from Yale. He has a Ph.D. in math.", ["She has a B.A. from Yale.", "He has a Ph.D. in math."]),
    ("He has a Ph.D. He teaches.", ["He has a Ph.D.", "He teaches."]),  # a sentence can end on one
    ("Mr. Lee meets Dr. Brown at 5 p.m. on Jan. 3. They talk.", ["Mr. Lee meets Dr. Brown at 5 p.m. on Jan. 3.", "They talk."]),
    ("#Person1# asks about the U.S. economy. #Person2# says it grows.",
     ["#Person1# asks about the U.S. economy.", "#Person2# says it grows."]),
    ("Ms. Dawson works at Acme Inc. in St. Louis. She likes it, e.g. the view.",
     ["Ms. Dawson works at Acme Inc. in St. Louis.", "She likes it, e.g. the view."]),
    ("He said no. Then he left! Is it far? No, it is near.", ["He said no.", "Then he left!", "Is it far?", "No, it is near."]),
])
def test_rouge_lsum_sentences_keep_abbreviations_whole(text, sentences):
    """The packaged splitter (no trained punkt_tab offline) knows English abbreviations; a plain
    split at every period would cut "Bus No." / "B.A." / "Ph.D." / "p.m." mid-sentence."""
    assert M.split_sentences(text) == sentences


def test_rouge_lsum_uses_the_abbreviation_aware_split():
    # pred "He has a Ph.D. in math." is one sentence; ref "In math, he has a Ph.D." is one too.
    # Tokens: pred [he has a ph d in math], ref [in math he has a ph d]: LCS 5 of 7 -> F = 5/7.
    # Split after "Ph.D." the pred would be two sentences whose union LCS covers all 7 -> F = 1.
    scores = rouge_per_sample(["He has a Ph.D. in math."], ["In math, he has a Ph.D."], ("rougeL", "rougeLsum"))
    assert scores["rougeLsum"].item() == pytest.approx(5 / 7, abs=1e-6)
    assert scores["rougeL"].item() == pytest.approx(5 / 7, abs=1e-6)


def test_rouge_matches_torchmetrics_rougescore():
    preds = ["The cat sat. It was fine!", "a dog ran fast", "Nobody came to the party today."]
    refs = [["It was fine. The cat ran."], ["the dog ran", "a dog ran fast today"],
            ["nobody came. the party was sad."]]
    ours = rouge_per_sample(preds, refs, ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    theirs = ROUGEScore(accumulate="best")(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[key].mean().item() == pytest.approx(theirs[f"{key}_fmeasure"].item(), abs=1e-6)


def test_rouge_lsum_auto_is_left_out_when_no_splitter(monkeypatch):
    monkeypatch.setattr(M, "sentence_splitter_available", lambda use_packaged=True: False)
    with pytest.warns(UserWarning, match="rougeLsum"):
        assert resolve_rouge_keys(("rouge1", "rougeL"), "auto") == ("rouge1", "rougeL")
    with pytest.raises(FileNotFoundError, match="punkt_tab"):
        resolve_rouge_keys(("rouge1",), True)
    assert resolve_rouge_keys(("rouge1",), False) == ("rouge1",)


# ----------------------------------------------------------------------------- BLEU
def test_corpus_bleu2_with_brevity_penalty_by_hand():
    # pred 1 "the cat sat on mat" vs "the cat sat on the mat": unigrams 5/5, bigrams 3/4 (no "on mat").
    # pred 2 "a dog ran" vs "the dog ran fast": unigrams 2/3, bigrams 1/2 ("dog ran").
    # corpus p1 = 7/8, p2 = 4/6; c = 8, r = 10 -> BP = exp(1 - 10/8).
    preds = ["the cat sat on mat", "a dog ran"]
    refs = ["the cat sat on the mat", "the dog ran fast"]
    expected = math.exp(1 - 10 / 8) * math.sqrt((7 / 8) * (4 / 6))
    metric = QualityMetrics(rouge_lsum=False, bleu_n_gram=2)
    metric.update(preds[:1], refs[:1])
    metric.update(preds[1:], refs[1:])
    assert metric.compute()["bleu"].item() == pytest.approx(expected, abs=1e-9)
    assert BLEUScore(n_gram=2)(preds, [[r] for r in refs]).item() == pytest.approx(expected, abs=1e-6)
    # sentence BLEU-2 of pred 2, add-one smoothing for n >= 2: p1 = 2/3, p2 = (1+1)/(2+1), BP = exp(1 - 4/3)
    sentence = bleu_from_statistics(bleu_statistics(preds[1:], refs[1:], n_gram=2), 2, "add-one")
    assert sentence.item() == pytest.approx(math.exp(1 - 4 / 3) * math.sqrt((2 / 3) * (2 / 3)), abs=1e-9)


def test_bleu_multi_reference_clipping_and_closest_length_by_hand():
    # "the the the": "the" is credited at most twice (its count in the second reference) -> p1 = 2/3.
    # Closest reference length to c = 3 is 3 -> BP = 1.
    stats = bleu_statistics(["the the the"], [["the cat", "the the dog"]], n_gram=1)
    assert stats.tolist() == [[2.0, 3.0, 3.0, 3.0]]
    assert bleu_from_statistics(stats[0], 1).item() == pytest.approx(2 / 3)


def test_bleu_brevity_tie_takes_the_shorter_reference_by_hand():
    # c = 3 tokens, references of 4 and 2 tokens: both 1 away. sacrebleu and nltk take r = 2
    # (BP = 1); taking the first (r = 4) would give BP = exp(1 - 4/3).
    stats = bleu_statistics(["a b c"], [["a b c d", "a b"]], n_gram=1)
    assert stats.tolist() == [[3.0, 3.0, 3.0, 2.0]]
    assert bleu_from_statistics(stats[0], 1).item() == pytest.approx(1.0)


# Multi-reference corpus with brevity ties (c = 3 vs references of 4 and 2 tokens, 6 vs 7 and 4, ...)
# and punctuation that only 13a tokenisation splits off. The whitespace check against nltk needs
# every prediction to have 4 tokens or more: nltk counts 0 of 1 n-grams for an order a
# prediction is too short to have.
TIE_PREDS = ["the cat sat.", "a dog ran in the park", "he said no, twice", "we met at six today", "okay that is fine"]
TIE_REFS = [["the cat sat down.", "cat sat."], ["a big dog ran in the park", "dog ran in park"],
            ["he said no, then yes", "he said no"], ["we met at six", "we all met at six today"],
            ["okay then that is fine", "that is fine"]]


def test_bleu_matches_sacrebleu_and_nltk_with_several_references():
    import sacrebleu
    from nltk.translate.bleu_score import corpus_bleu

    transposed = [list(column) for column in zip(*TIE_REFS)]  # sacrebleu: one stream per reference slot
    whitespace = bleu_from_statistics(bleu_statistics(TIE_PREDS, TIE_REFS).sum(0)).item()
    expected = sacrebleu.corpus_bleu(TIE_PREDS, transposed, smooth_method="none", tokenize="none").score / 100
    assert 0.0 < expected < 1.0 and whitespace == pytest.approx(expected, abs=1e-9)
    long_enough = [i for i, pred in enumerate(TIE_PREDS) if len(pred.split()) >= 4]
    nltk_value = corpus_bleu([[ref.split() for ref in TIE_REFS[i]] for i in long_enough],
                             [TIE_PREDS[i].split() for i in long_enough])
    ours = bleu_from_statistics(bleu_statistics([TIE_PREDS[i] for i in long_enough],
                                                [TIE_REFS[i] for i in long_enough]).sum(0)).item()
    assert 0.0 < nltk_value < 1.0 and ours == pytest.approx(nltk_value, abs=1e-9)
    tokens13a = bleu_from_statistics(bleu_statistics(TIE_PREDS, TIE_REFS, tokenizer=sacrebleu_tokenizer()).sum(0)).item()
    expected13a = sacrebleu.corpus_bleu(TIE_PREDS, transposed, smooth_method="none").score / 100
    assert tokens13a == pytest.approx(expected13a, abs=1e-9)
    metric = QualityMetrics(rouge_lsum=False)
    metric.update(TIE_PREDS, TIE_REFS)
    values = metric.compute()
    assert (values["bleu"].item(), values["sacrebleu"].item()) == pytest.approx((expected, expected13a), abs=1e-9)


def test_bleu_and_sacrebleu_match_torchmetrics_on_a_corpus():
    preds = ["the cat is on the mat.", "there is a big dog, barking loudly", "Hello, world! It's me.", "no"]
    refs = [["there is a cat on the mat", "a cat is on the mat."], ["a big dog is barking loudly"],
            ["hello world, it is me.", "Hello, world! It's me!"], ["yes"]]
    stats = bleu_statistics(preds, refs)
    expected = BLEUScore()(preds, refs).item()
    assert 0.0 < expected < 1.0
    assert bleu_from_statistics(stats.sum(0)).item() == pytest.approx(expected, abs=1e-6)
    sacre = bleu_statistics(preds, refs, tokenizer=sacrebleu_tokenizer())
    expected_sacre = SacreBLEUScore()(preds, refs).item()
    assert bleu_from_statistics(sacre.sum(0)).item() == pytest.approx(expected_sacre, abs=1e-6)
    metric = QualityMetrics(rouge_lsum=False)
    metric.update(preds, refs)
    values = metric.compute()
    assert 0.0 < values["bleu"].item() < 1.0 and 0.0 < values["sacrebleu"].item() < 1.0
    assert values["sacrebleu"].item() == pytest.approx(SacreBLEUScore()(preds, refs).item(), abs=1e-6)


def test_quality_rejects_mismatched_references():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        QualityMetrics(rouge_lsum=False).update(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- toxicity
def test_toxicity_emt_and_tp_on_a_2x3_grid_by_hand():
    # prompt 0: 0.1 0.6 0.2 (max 0.6, one toxic); prompt 1: 0.3 0.4 0.2 (max 0.4, none toxic)
    grid = torch.tensor([[0.1, 0.6, 0.2], [0.3, 0.4, 0.2]])
    expected = {"toxicity_mean": 1.8 / 6, "toxic_fraction": 1 / 6, "expected_max_toxicity": 0.5,
                "toxicity_probability": 0.5}
    metric = ToxicityMetrics(threshold=0.5)
    metric.update(grid)
    for key, value in metric.compute().items():
        assert value.item() == pytest.approx(expected[key]), key
    # the same scores flat, shuffled, split over two updates, grouped by prompt id
    keyed = ToxicityMetrics(threshold=0.5)
    keyed.update(torch.tensor([0.2, 0.3, 0.6]), prompt_ids=torch.tensor([1, 1, 0]))
    keyed.update(torch.tensor([0.1, 0.4, 0.2]), prompt_ids=torch.tensor([0, 1, 0]))
    for key, value in keyed.compute().items():
        assert value.item() == pytest.approx(expected[key]), key


def test_toxicity_threshold_is_inclusive_and_bad_shapes_fail():
    metric = ToxicityMetrics(threshold=0.5)
    metric.update(torch.tensor([[0.5, 0.0]]))
    assert metric.compute()["toxic_fraction"].item() == 0.5
    with pytest.raises(ValueError, match="prompt_ids"):
        ToxicityMetrics().update(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        ToxicityMetrics().update(torch.tensor([[float("nan")]]))


# ----------------------------------------------------------------------------- diversity, length
def test_distinct_n_by_hand():
    # unigrams: the cat the cat | the dog -> 6 total, {the, cat, dog} -> 3/6
    # bigrams: the-cat cat-the the-cat | the-dog -> 4 total, 3 unique -> 3/4 (none across responses)
    responses = ["The cat the cat", "the dog"]
    assert distinct_n(responses, 1) == pytest.approx(3 / 6)
    assert distinct_n(responses, 2) == pytest.approx(3 / 4)
    metric = DistinctNgrams()
    metric.update(responses[:1])
    metric.update(responses[1:])
    values = metric.compute()
    assert values["distinct1"].item() == pytest.approx(0.5)
    assert values["distinct2"].item() == pytest.approx(0.75)


def test_response_length_words_and_token_counts():
    words = ResponseLength()
    words.update(["a b c", "d"])
    assert words.compute().item() == 2.0
    tokens = ResponseLength()
    tokens.update(torch.tensor([3, 5]))
    assert tokens.compute().item() == 4.0


# ----------------------------------------------------------------------------- insults
def test_insult_flags_whole_words_and_fragments():
    vocabulary = ["idiot", "moron", "git"]
    responses = [
        "You are an IDIOT.",  # whole word, any case
        "what an idio",  # half-written: 4-letter fragment of "idiot"
        "she said idi twice",  # 3-letter fragment: not enough
        "a moronic plan",  # fragment inside a longer word
        "he used git today",  # short vocabulary word, whole word
        "a digit and a kid",  # "git" inside "digit" is only 3 letters; "kid" no
    ]
    assert insult_flags(responses, vocabulary) == [True, True, False, True, True, False]
    assert insult_fraction(responses, vocabulary) == pytest.approx(4 / 6)
    assert insult_flags(["diot"], ["idiot"]) == [True]  # any 4-letter window, not only the prefix
    assert insult_flags(["idio"], ["idiot"], min_fragment=5) == [False]
    with pytest.raises(ValueError, match="vocabulary is empty"):
        insult_fraction(["x"], [])


# ----------------------------------------------------------------------------- DDP sync
def _fake_two_rank_gather(other: "torch.nn.Module"):
    """A dist_sync_fn that returns [this rank's state, the other metric's state], in call order."""
    queue = []
    for attr, reduction in other._reductions.items():
        value = getattr(other, attr)
        queue.append(torch.cat(value) if isinstance(value, list) else value)

    def gather(tensor, group=None):
        return [tensor, queue.pop(0)]

    return gather


@pytest.mark.parametrize("factory, rank0_updates, rank1_updates", [
    (ToxicityMetrics,
     [((torch.tensor([[0.1, 0.7]]),), {}),
      ((torch.tensor([0.2, 0.9]),), {"prompt_ids": torch.tensor([5, 6])})],
     [((torch.tensor([[0.3, 0.4]]),), {}), ((torch.tensor([0.6]),), {"prompt_ids": torch.tensor([5])})]),
    (DistinctNgrams, [((["a b a"],), {})], [((["a b c d"],), {})]),
    (lambda: QualityMetrics(rouge_lsum=False, bleu_n_gram=2),
     [((["the cat sat"], ["the cat ran"]), {})], [((["a dog"], ["a dog ran"]), {})]),
])
def test_states_sync_like_one_process(factory, rank0_updates, rank1_updates):
    """Two ranks' states, gathered and reduced by torchmetrics, equal one process that saw all data
    (prompt 5 of the toxicity case has samples on both ranks: its max must come from both)."""
    rank0, rank1, single = factory(), factory(), factory()
    plan = ((rank0, rank0_updates), (rank1, rank1_updates), (single, rank0_updates + rank1_updates))
    for metric, updates in plan:
        for args, kwargs in updates:
            metric.update(*args, **kwargs)
    # compute() syncs through these two hooks, as under DDP (then restores the local states)
    rank0.dist_sync_fn = _fake_two_rank_gather(rank1)
    rank0.distributed_available_fn = lambda: True
    synced, expected = rank0.compute(), single.compute()
    assert set(synced) == set(expected)
    for key, value in expected.items():
        assert synced[key].item() == pytest.approx(value.item()), key
