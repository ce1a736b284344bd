"""Sentence boundaries (flan_rlhf/sentences.py): Punkt with the package's English abbreviations.

ROUGE-Lsum's use of them is tested in tests/eval/test_metrics.py; the reward chunker's in
tests/rewards/test_long_text.py.
"""
from __future__ import annotations

from flan_rlhf.sentences import sentence_pieces, sentence_spans, split_sentences


def test_pieces_cut_after_each_sentence_and_at_line_breaks_and_keep_every_character():
    text = 'Anna left. Bob stayed! Did Carl go? "Yes." Then\nDora came'
    assert sentence_pieces(text) == ["Anna left.", " Bob stayed!", " Did Carl go?", ' "Yes."', " Then", "\nDora came"]
    assert "".join(sentence_pieces(text)) == text
    assert sentence_pieces("no break here") == ["no break here"]
    assert sentence_pieces("") == []


def test_pieces_keep_abbreviations_inside_their_sentence():
    text = "He has a Ph.D. in math. Bus No. 5 left at 6 p.m. on Jan. 3. They met."
    assert sentence_pieces(text) == ["He has a Ph.D. in math.", " Bus No. 5 left at 6 p.m. on Jan. 3.", " They met."]
    assert split_sentences(text) == [piece.strip() for piece in sentence_pieces(text)]
    assert [text[a:b] for a, b in sentence_spans(text)] == split_sentences(text)
