"""Sentence boundaries, one way for the package: nltk's Punkt (Kiss & Strunk 2006).

A trained ``punkt_tab`` that nltk already has wins. Otherwise the package's own English Punkt
parameters (:data:`PACKAGED_NLTK_DATA`) are used, written by hand rather than trained (nltk's
trained model has no stated licence to ship it under): ``abbrev_types.txt`` lists ~130 English
abbreviations (titles, degrees such as b.a and ph.d, no, months, units, u.s, inc, ...) after
which a period does not end a sentence unless the next word is capitalised and in
``sent_starters.txt`` (pronouns, articles, then/but/so, ...), Punkt's frequent-sentence-starter
rule (section 4.1.3 of the paper); no collocations or orthographic statistics. Nothing is ever
downloaded.

ROUGE-Lsum compares :func:`split_sentences`; the rewards cut long texts at
:func:`sentence_pieces`, which keep every character.
"""
from __future__ import annotations

import functools
from pathlib import Path

#: The nltk data folder shipped inside the package (``tokenizers/punkt_tab/english``).
PACKAGED_NLTK_DATA = Path(__file__).resolve().parent / "assets" / "nltk_data"


def sentence_splitter_available(use_packaged: bool = True) -> bool:
    """Whether nltk can split sentences, without any download.

    A trained ``punkt_tab`` that nltk already finds wins. Otherwise, with ``use_packaged``,
    :data:`PACKAGED_NLTK_DATA` is appended to ``nltk.data.path`` (a process-wide side effect).
    """
    try:
        import nltk
    except ImportError:
        return False

    def found() -> bool:
        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            return True
        except LookupError:
            return False

    if found():
        return True
    if use_packaged and (PACKAGED_NLTK_DATA / "tokenizers" / "punkt_tab" / "english").is_dir():
        if str(PACKAGED_NLTK_DATA) not in nltk.data.path:
            nltk.data.path.append(str(PACKAGED_NLTK_DATA))
        return found()
    return False


@functools.lru_cache(maxsize=1)
def _punkt():
    """The English Punkt tokenizer nltk finds (loaded once per process)."""
    if not sentence_splitter_available():
        raise FileNotFoundError(
            "splitting sentences needs nltk's punkt_tab data (the package ships its own): "
            "reinstall flan-rlhf, or run nltk.download('punkt_tab')"
        )
    from nltk.tokenize.punkt import PunktTokenizer

    return PunktTokenizer("english")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character offsets of each sentence of ``text`` (whitespace between them excluded)."""
    return list(_punkt().span_tokenize(text))


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``, as ``nltk.sent_tokenize`` gives them: "Bus No. 5 left." and
    "a Ph.D. in math" stay whole; "He has a Ph.D. He teaches." is two."""
    return [text[start:end] for start, end in sentence_spans(text)]


def sentence_pieces(text: str) -> list[str]:
    """``text`` cut where a sentence ends and where a line breaks; the pieces join back to ``text`` exactly.

    The whitespace after a sentence, and a line break, begin the next piece
    (``"Hi there. Bye"`` -> ``["Hi there.", " Bye"]``), so a tokenizer counts a concatenation of
    pieces as it counts the original text.
    """
    cuts = {end for _, end in sentence_spans(text)} | {index for index, char in enumerate(text) if char == "\n"}
    bounds = [0, *sorted(cut for cut in cuts if 0 < cut < len(text)), len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
