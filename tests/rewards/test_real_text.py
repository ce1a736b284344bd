"""Rewards on real text: HTML entities decoded once before any scorer (texts_to_score), and long
texts scored by their worst chunk, so that neither a scorer's window nor length hides an insult.

Each reward test here imports only the public rewards, so each fails on its own on code without
these features; the wiring tests import the chunker to know which chunks to expect."""
from __future__ import annotations

import math

import pytest
import torch
from tests.rewards.sentences import INSULTING, KIND
from tests.rewards_helpers import WORD_SIGNAL, save_classifier, save_detoxify_checkpoint

from flan_rlhf.rewards import ClassifierReward, DetoxifyReward, ProfanityReward, VaderReward
from flan_rlhf.rewards.text_batches import texts_to_score


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def clean_text(n_chars: int) -> str:
    """The kind sentences in turn until the text has at least ``n_chars`` characters."""
    pieces, index = [], 0
    while sum(len(piece) + 1 for piece in pieces) < n_chars:
        pieces.append(KIND[index % len(KIND)])
        index += 1
    return " ".join(pieces)


def test_long_text_options_are_checked_when_built():
    for build in (lambda: ProfanityReward(long_text="auto"), lambda: DetoxifyReward(long_text="longest"),
                  lambda: ClassifierReward(model="not-loaded", long_text="truncate")):
        with pytest.raises(ValueError, match="worst_chunk, whole"):
            build()
    with pytest.raises(ValueError, match="window"):
        ProfanityReward(window=0)
    assert ClassifierReward(model="not-loaded")._model is None  # built without loading anything


# -- HTML entities: decoded once, in texts_to_score -----------------------------------------------
ENCODED = ["#Person1# says: I don&#39;t like it.", "&quot;Shut up, you moron,&quot; #Person1# shouts.",
           "Tom &amp; Mary&#8217;s wedding is on Saturday &mdash; everyone is invited."]
PLAIN = ["#Person1# says: I don't like it.", '"Shut up, you moron," #Person1# shouts.',
         "Tom & Mary’s wedding is on Saturday — everyone is invited."]


def test_texts_to_score_decodes_entities_once():
    assert texts_to_score([""] * 3, ENCODED, score_prompt=False) == PLAIN
    assert texts_to_score(["a &lt; b"], ["c &gt; d"], score_prompt=True) == ["a < b\nc > d"]
    assert texts_to_score([""], ["&amp;lt;"], score_prompt=False) == ["&lt;"]  # an escaped entity stays what it says


def test_profanity_and_vader_score_entity_text_as_the_plain_text():
    profanity, vader = ProfanityReward(), VaderReward()
    assert torch.equal(profanity.toxicity(ENCODED), profanity.toxicity(PLAIN))  # compare's path
    assert torch.equal(profanity([""] * 3, ENCODED), profanity([""] * 3, PLAIN))
    assert torch.equal(vader([""] * 3, ENCODED), vader([""] * 3, PLAIN))


def test_classifier_and_detoxify_score_entity_text_as_the_plain_text(tmp_path):
    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, [2.0, -2.0], reacting_to=("stupid", [-4.0, 4.0]))
    classifier = ClassifierReward(model=str(folder), label="hate", output="prob")
    encoded, plain = ["you are &#115;tupid", "you &amp; kind"], ["you are stupid", "you & kind"]
    assert torch.equal(classifier([""] * 2, encoded), classifier([""] * 2, plain))
    assert classifier([""], plain[:1]).item() > 0.5 > classifier([""], ["you are kind"]).item()  # the word matters
    once = ["you are &amp;#115;tupid"]  # decoded once: "&#115;tupid", not the word; twice would make it "stupid"
    assert torch.equal(classifier([""], once), classifier([""], ["you are kind"]))

    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, [-2.0] * 6, reacting_to=("stupid", [4.0] + [0.0] * 5))
    detoxify = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir))
    assert torch.equal(detoxify.toxicity(encoded), detoxify.toxicity(plain))  # compare's path
    assert detoxify.toxicity(encoded)[0].item() == pytest.approx(sigmoid(-2.0 + 4.0 * WORD_SIGNAL), abs=1e-5)
    assert torch.equal(detoxify([""] * 2, encoded), detoxify([""] * 2, plain))
    assert torch.equal(detoxify.toxicity(once), detoxify.toxicity(["you are kind"]))


# -- long texts: the worst chunk, not the diluted or cut whole ----------------------------------
def test_profanity_flags_an_insult_after_20000_clean_characters():
    clean = clean_text(20_000)
    text = f"{clean} {INSULTING[0]}"
    assert len(clean) >= 20_000
    reward = ProfanityReward()
    assert reward.toxicity([text]).item() >= 0.5
    assert reward([""], [text]).item() <= 0.5
    assert reward.toxicity([clean]).item() < 0.5  # the flag is the insult's, not the clean text's
    assert ProfanityReward(long_text="whole").toxicity([text]).item() < 0.5  # diluted, as before


def test_a_short_window_classifier_sees_an_insult_past_its_window(tmp_path):
    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, [2.0, -2.0], reacting_to=("stupid", [-4.0, 4.0]))
    text = "You are kind. " * 1430 + "You are stupid."  # 20,035 characters; the word is the last but one token
    hateful, kind = sigmoid(4.0 - 8.0 * WORD_SIGNAL), sigmoid(4.0)  # p(nothate) with / without the word
    nothate = ClassifierReward(model=str(folder), label="nothate", output="prob", max_length=16, batch_size=1024)
    assert nothate([""], [text]).item() == pytest.approx(hateful, abs=1e-5)
    whole = ClassifierReward(model=str(folder), label="nothate", output="prob", max_length=16, long_text="whole")
    assert whole([""], [text]).item() == pytest.approx(kind, abs=1e-5)  # the window cuts the word off
    penalty = ClassifierReward(model=str(folder), label="hate", output="prob", sign=-1, max_length=16, batch_size=1024)
    assert penalty([""], [text]).item() == pytest.approx(-(1 - hateful), abs=1e-5)  # the most hateful chunk

    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, [-2.0] * 6, reacting_to=("stupid", [4.0] + [0.0] * 5))
    detoxify = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), max_length=16,
                              batch_size=1024)
    assert detoxify.toxicity([text]).item() >= 0.5
    cut = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), max_length=16,
                         long_text="whole")
    assert cut.toxicity([text]).item() == pytest.approx(sigmoid(-2.0), abs=1e-5)


def test_short_texts_score_exactly_as_before(tmp_path):
    from profanity_check import predict_prob

    texts = KIND + INSULTING
    assert max(map(len, texts)) <= 80  # ProfanityReward's default window
    before = torch.as_tensor(predict_prob(texts), dtype=torch.float32)
    assert torch.equal(ProfanityReward().toxicity(texts), before)
    mixed = ProfanityReward().toxicity([clean_text(2_000), *texts])  # a long text in the same batch
    assert torch.equal(mixed[1:], before)

    folder = save_classifier(tmp_path / "clf", {0: "nothate", 1: "hate"}, bias=None, dropout=0.0)
    reward = ClassifierReward(model=str(folder), label="hate", max_length=16).setup()
    short = ["you are kind", "you are stupid idiot", "hello", "thank you world", "a", ""]
    assert torch.equal(reward([""] * 6, short), reward.logits(short)[:, 1])  # the model's own logits, whole
    assert reward([""] * 6, short).std() > 0  # a random model: the scores do depend on the text


def test_every_chunk_is_scored_in_one_call_and_reduces_to_its_text(monkeypatch):
    """Profanity: the per-chunk scores of one batched call reduce, row by row, to each text's score."""
    from profanity_check import predict_prob

    from flan_rlhf.rewards.long_text import chunk_texts, split_into_chunks

    reward = ProfanityReward().setup()
    texts = [KIND[0], clean_text(300) + " " + INSULTING[0] + " " + clean_text(300), clean_text(500)]
    calls: list[list[str]] = []
    monkeypatch.setattr(reward, "_predict_prob", lambda batch: calls.append(list(batch)) or predict_prob(batch))
    scores = reward.toxicity(texts)
    chunks, owner = chunk_texts(texts, reward.window, len)
    assert calls == [chunks] and len(chunks) > len(texts)
    for row, text in enumerate(texts):
        own = split_into_chunks(text, reward.window, len)
        assert own == [chunk for chunk, index in zip(chunks, owner.tolist()) if index == row]
        assert scores[row].item() == pytest.approx(float(predict_prob(own).max()), abs=1e-7)
    assert scores[1] >= 0.5 > scores[2]


def test_detoxify_takes_each_label_from_its_own_worst_chunk(tmp_path, monkeypatch):
    """Two labels that react in opposite ways to one word: each text's value per label is that
    label's max over the text's chunks, and the weighted toxicity combines those maxima."""
    import flan_rlhf.rewards.detoxify_reward as detoxify_module
    from flan_rlhf.rewards.long_text import chunk_texts, token_length

    checkpoint, hf_dir = save_detoxify_checkpoint(tmp_path, [0.0, 1.0, -1.0, 0.0, 0.0, 0.0],
                                                  reacting_to=("stupid", [3.0, -3.0, 0.0, 0.0, 0.0, 0.0]))
    reward = DetoxifyReward(checkpoint=str(checkpoint), huggingface_config_path=str(hf_dir), max_length=16,
                            labels={"toxicity": 1.0, "severe_toxicity": 1.0}).setup()
    texts = ["you are kind", "You are kind. " * 8 + "You are stupid. " + "You are kind. " * 4, "you are stupid"]
    calls = []
    logits_of = detoxify_module.sequence_classifier_logits
    monkeypatch.setattr(detoxify_module, "sequence_classifier_logits",
                        lambda *args, **kwargs: calls.append(args[2]) or logits_of(*args, **kwargs))
    per_label = reward.label_scores(texts)
    chunks, owner = chunk_texts(texts, 16, token_length(reward._detoxify.tokenizer))
    assert calls == [chunks] and len(chunks) > len(texts)

    with_word, without = sigmoid(3.0 * WORD_SIGNAL), sigmoid(0.0)
    severe_with, severe_without = sigmoid(1.0 - 3.0 * WORD_SIGNAL), sigmoid(1.0)
    assert per_label["toxicity"].tolist() == pytest.approx([without, with_word, with_word], abs=1e-5)
    # the long text's severe_toxicity comes from a chunk without the word, its toxicity from the one with it
    assert per_label["severe_toxicity"].tolist() == pytest.approx([severe_without, severe_without, severe_with], abs=1e-5)
    assert per_label["obscene"].tolist() == pytest.approx([sigmoid(-1.0)] * 3, abs=1e-5)
    expected = 0.5 * per_label["toxicity"] + 0.5 * per_label["severe_toxicity"]
    assert torch.allclose(reward.toxicity(texts), expected, atol=1e-6)
    total, components = reward.score([""] * 3, texts)
    assert torch.allclose(components["non_toxicity_severe_toxicity"], 1 - per_label["severe_toxicity"], atol=1e-6)
    assert torch.allclose(total, 1 - expected, atol=1e-6)
