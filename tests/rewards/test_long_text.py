"""The pure functions that score a long text by its worst chunk (flan_rlhf/rewards/long_text.py),
on hand-computed cases: sentences, greedy grouping, hard splits, owners and the per-text reduction."""
from __future__ import annotations

import math

import pytest
import torch
from tests.rewards_helpers import write_bert_tokenizer

from flan_rlhf.rewards.long_text import (
    chunk_texts,
    hard_split,
    split_into_chunks,
    token_length,
    token_window,
    worst_per_text,
)
from flan_rlhf.tokens import count_tokens


# -- the chunker, on hand-computed cases -------------------------------------------------------
def test_sentences_are_grouped_greedily_while_they_fit():
    # "Aa bb." (6) + " Cc dd." (7) = 13 <= 14; + " Ee ff." would be 20; " Ee ff." + " Gg." = 11
    assert split_into_chunks("Aa bb. Cc dd. Ee ff. Gg.", 14, len) == ["Aa bb. Cc dd.", "Ee ff. Gg."]
    # a length that counts words plus 2 (like a tokenizer's special tokens): "a b. c d." is 4 + 2 = 6
    words_plus_two = lambda text: len(text.split()) + 2  # noqa: E731
    assert split_into_chunks("a b. c d. e f.", 6, words_plus_two) == ["a b. c d.", "e f."]


def test_an_over_long_sentence_is_hard_split_at_words():
    # " Aaaa bbbb cccc dddd." (21) > 10: " Aaaa bbbb" (next char a space), then the longest 10 of the
    # rest is " cccc dddd" but cuts "dddd." -> back to its last space: " cccc"; " dddd." + " Ok." = 10 fits
    assert split_into_chunks("Hi. Aaaa bbbb cccc dddd. Ok.", 10, len) == ["Hi.", "Aaaa bbbb", "cccc", "dddd. Ok."]
    assert hard_split("abcdefghij", 4, len) == ["abcd", "efgh", "ij"]  # one word longer than the window
    assert hard_split(" aaa bbb ccc", 5, len) == [" aaa", " bbb", " ccc"]


def test_empty_blank_and_exactly_fitting_texts():
    assert split_into_chunks("", 5, len) == [""]
    assert split_into_chunks(" " * 12, 5, len) == [""]  # too long, but nothing to score but blank
    assert split_into_chunks("Aa. Bb.", 7, len) == ["Aa. Bb."]  # exactly the window: unchanged
    assert split_into_chunks("Aa. Bb.", 6, len) == ["Aa.", "Bb."]
    assert split_into_chunks("  short  ", 80, len) == ["  short  "]  # a text that fits is not even stripped
    with pytest.raises(ValueError, match="window"):
        split_into_chunks("x", 0, len)


def test_chunk_texts_lists_every_chunk_with_its_text():
    chunks, owner = chunk_texts(["Aa. Bb.", "", "Cc."], 4, len)  # " Bb." is 4 with its space
    assert chunks == ["Aa.", "Bb.", "", "Cc."]
    assert owner.tolist() == [0, 0, 1, 2] and owner.dtype == torch.long
    assert chunk_texts(["Aa. Bb."], None, len)[0] == ["Aa. Bb."]  # no window: whole


def test_worst_per_text_is_the_max_or_min_per_text_and_label():
    scores = torch.tensor([[0.1, 0.9], [0.7, 0.2], [0.3, 0.3]])
    owner = torch.tensor([0, 0, 1])
    assert torch.equal(worst_per_text(scores, owner, 2, "max"), torch.tensor([[0.7, 0.9], [0.3, 0.3]]))
    assert torch.equal(worst_per_text(scores, owner, 2, "min"), torch.tensor([[0.1, 0.2], [0.3, 0.3]]))
    assert torch.equal(worst_per_text(scores[:, 0], owner, 2, "max"), torch.tensor([0.7, 0.3]))
    with_nan = worst_per_text(torch.tensor([0.2, float("nan"), 0.4]), owner, 2, "max")
    assert math.isnan(with_nan[0].item()) and with_nan[1].item() == pytest.approx(0.4)


def test_token_chunks_fit_the_model_window_and_lose_no_word(tmp_path):
    tokenizer = write_bert_tokenizer(tmp_path / "tok")
    text = "You are kind. " * 30 + "hello world the a " * 12 + "you are stupid."
    window = token_window(tokenizer, 16)
    chunks = split_into_chunks(text, window, token_length(tokenizer))
    assert window == 16 and len(chunks) > 1
    assert max(count_tokens(tokenizer, chunks)) <= 16  # [CLS] ... [SEP] included: truncation would cut nothing
    assert " ".join(chunks).split() == text.split()
    assert token_window(tokenizer, None) is None  # no model_max_length saved: no usable window
    assert token_window(tokenizer, 2) is None  # room for the special tokens only
