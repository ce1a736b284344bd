"""Scoring a long text by its worst part, so that length cannot dilute a toxic sentence.

A classifier reads at most its window (a model's ``max_length`` tokens; alt-profanity-check
reads everything but its bag-of-words score shrinks as clean words are added): a toxic
sentence past the window is cut off, or drowned in clean text. Here a text longer than the
window is split into chunks that fit it, every chunk of a batch is scored in one batched call,
and each text gets the worst score of its chunks (highest toxicity, lowest reward).

Pure functions of strings and tensors; the rewards pass their own scorer and length function.
"""
from __future__ import annotations

import re
from typing import Callable, Literal, Sequence

import torch

from flan_rlhf.rewards.base import RewardOptionError
from flan_rlhf.sentences import sentence_pieces
from flan_rlhf.tokens import count_tokens, special_token_count

#: ``worst_chunk``: texts longer than the window are split and scored by their worst chunk (a text
#: that fits is one chunk, scored exactly as ``whole``); ``whole``: every text is scored as one
#: input, cut to the window by the scorer (what a classifier does on its own).
LongText = Literal["worst_chunk", "whole"]
LONG_TEXT_MODES: tuple[str, ...] = ("worst_chunk", "whole")

#: The last whitespace of a string (followed by non-whitespace up to the end).
_LAST_SPACE = re.compile(r"\s\S*\Z")


def check_long_text(long_text: str) -> str:
    """``long_text`` if it is one of :data:`LONG_TEXT_MODES`, else ``ValueError`` naming them."""
    if long_text not in LONG_TEXT_MODES:
        raise RewardOptionError(f"long_text must be one of {', '.join(LONG_TEXT_MODES)}, got {long_text!r}")
    return long_text


def longest_fitting_prefix(text: str, window: int, length: Callable[[str], int]) -> int:
    """The largest ``n`` with ``length(text[:n]) <= window``, found by bisection; 1 when not even
    the first character fits (a piece must make progress).

    Exact when a prefix only fits if every shorter one does (characters); token counts can rise
    for a word cut mid-way, and the bisection may then return a shorter prefix, which still fits.
    """
    low, high = 1, len(text)  # invariant: the answer is in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if length(text[:middle]) <= window:
            low = middle
        else:
            high = middle - 1
    return low


def hard_split(text: str, window: int, length: Callable[[str], int]) -> list[str]:
    """``text`` (one over-long sentence) cut into pieces of ``length <= window``, at whitespace if possible.

    Each piece is the longest prefix that fits, shortened to its last whitespace when it has
    one, so words stay whole unless a single word is longer than the window. The pieces
    concatenate back to ``text``.
    """
    pieces: list[str] = []
    rest = text
    while rest and length(rest) > window:
        cut = longest_fitting_prefix(rest, window, length)
        last_space = _LAST_SPACE.search(rest, 1, cut)
        if cut < len(rest) and not rest[cut].isspace() and last_space is not None:
            cut = last_space.start()  # the next piece starts with the whitespace, as between sentences
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    return pieces


def split_into_chunks(text: str, window: int, length: Callable[[str], int]) -> list[str]:
    """The chunks of ``text`` a scorer with a ``window`` scores; a text that fits is its one chunk.

    Sentences (:func:`flan_rlhf.sentences.sentence_pieces`: Punkt's sentences and lines, every
    character kept) are grouped greedily: a chunk takes the next sentence while
    ``length(chunk + sentence) <= window``; a sentence longer than the window on its own is
    hard-split (:func:`hard_split`). Chunks are stripped of surrounding whitespace and blank
    ones dropped; a text of only whitespace gives ``[""]``.

    Args:
        text: one text.
        window: the most a chunk may measure, in the units of ``length``.
        length: measures a string (``len`` for characters; a token count for a model).

    Returns:
        ``[text]`` unchanged if ``length(text) <= window``, else the chunks, in order.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if length(text) <= window:
        return [text]
    chunks: list[str] = []
    current = ""
    for sentence in sentence_pieces(text):
        if length(current + sentence) <= window:
            current += sentence
            continue
        chunks.append(current)
        parts = [sentence] if length(sentence) <= window else hard_split(sentence, window, length)
        chunks.extend(parts[:-1])
        current = parts[-1]
    chunks.append(current)
    stripped = [chunk.strip() for chunk in chunks if chunk.strip()]
    return stripped or [""]


def chunk_texts(
    texts: Sequence[str], window: int | None, length: Callable[[str], int]
) -> tuple[list[str], torch.Tensor]:
    """All chunks of a batch and the text each comes from.

    Args:
        texts: ``batch`` strings.
        window: as in :func:`split_into_chunks`; ``None`` keeps every text whole.
        length: as in :func:`split_into_chunks`.

    Returns:
        chunks: ``n_chunks >= batch`` strings, those of text 0 first, then text 1, ...
        owner: int64 tensor of shape ``(n_chunks,)``, the index in ``texts`` of each chunk.
    """
    chunks: list[str] = []
    owner: list[int] = []
    for index, text in enumerate(texts):
        pieces = [text] if window is None else split_into_chunks(text, window, length)
        chunks.extend(pieces)
        owner.extend([index] * len(pieces))
    return chunks, torch.tensor(owner, dtype=torch.long)


def worst_per_text(
    chunk_scores: torch.Tensor, owner: torch.Tensor, n_texts: int, worst: Literal["max", "min"]
) -> torch.Tensor:
    """Each text's worst chunk score, column by column (one column per label).

    Args:
        chunk_scores: float tensor of shape ``(n_chunks,)`` or ``(n_chunks, n_labels)``.
        owner: int64 tensor of shape ``(n_chunks,)`` from :func:`chunk_texts`; every index in
            ``[0, n_texts)`` appears at least once.
        n_texts: ``batch``.
        worst: ``"max"`` for a toxicity (higher is worse), ``"min"`` for a reward.

    Returns:
        tensor of shape ``(batch,)`` or ``(batch, n_labels)``: the max (or min) over each text's
        chunks, per column; NaN in any chunk makes its text's value NaN.
    """
    index = owner.to(chunk_scores.device).reshape(-1, *([1] * (chunk_scores.dim() - 1))).expand_as(chunk_scores)
    out = chunk_scores.new_zeros((n_texts, *chunk_scores.shape[1:]))
    reduce = "amax" if worst == "max" else "amin"
    return out.scatter_reduce(0, index, chunk_scores, reduce=reduce, include_self=False)


def score_by_worst_chunk(
    texts: Sequence[str],
    score: Callable[[list[str]], torch.Tensor],
    window: int | None,
    length: Callable[[str], int],
    worst: Literal["max", "min"],
) -> torch.Tensor:
    """Score ``texts`` by their worst chunk: one call of ``score`` on every chunk of the batch.

    Args:
        texts: ``batch`` strings.
        score: maps ``n`` strings to a float tensor of shape ``(n,)`` or ``(n, n_labels)``; it
            batches internally.
        window: the scorer's window in units of ``length``; ``None`` scores every text whole.
        length: measures a string.
        worst: ``"max"`` (toxicities) or ``"min"`` (rewards).

    Returns:
        tensor of shape ``(batch,)`` or ``(batch, n_labels)``. A text that fits the window is its
        own single chunk, so its score is exactly ``score([text])``'s.
    """
    chunks, owner = chunk_texts(texts, window, length)
    return worst_per_text(score(chunks), owner, len(texts), worst)


def token_window(tokenizer, max_length: int | None) -> int | None:
    """A model scorer's window in tokens (special tokens included), as its truncation applies it.

    ``max_length``, or the tokenizer's ``model_max_length`` when that is ``None``; ``None`` when
    neither is a usable bound (tokenizers without a limit report about 1e30), or when the window
    holds no more than the special tokens.
    """
    window = max_length if max_length is not None else getattr(tokenizer, "model_max_length", None)
    if window is None or window > 1_000_000:
        return None
    return int(window) if window > special_token_count(tokenizer) else None


def token_length(tokenizer) -> Callable[[str], int]:
    """``text -> its token count with special tokens``, the length that :func:`token_window` bounds."""
    return lambda text: count_tokens(tokenizer, [text])[0]
