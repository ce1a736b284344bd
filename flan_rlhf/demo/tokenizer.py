"""A small subword tokenizer trained on the demo corpus in well under a second.

BPE over Metaspace words (SentencePiece's ``▁`` word-start marker, as T5's own tokenizer),
with ``. , ? ! : ; '`` split off as their own tokens so ``beer.`` and ``beer`` share one word
token and copying a slot from the dialogue into the summary is one token. We tried Unigram
first: on this small corpus the ``tokenizers`` Unigram trainer kept ``▁`` as a separate piece
before frequent words (``▁`` ``and``), doubling sequence lengths; BPE merges them.

Special tokens follow T5: ``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1 (appended
to every encoded text by the post-processor), ``<unk>`` = 2. Characters never seen in training
(outside ASCII) become ``<unk>``. The result is wrapped as ``T5TokenizerFast`` and saved with
``save_pretrained``, so ``AutoTokenizer.from_pretrained(dir)`` reloads it offline.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Iterable, Sequence

from flan_rlhf.io import atomic_folder

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK)  # ids 0, 1, 2 in this order
WORD_START = "\u2581"  # "▁", SentencePiece's word-start marker
SPLIT_PUNCTUATION = r"[.,?!:;']"
# Every printable ASCII character is in the base alphabet, so ASCII text never maps to <unk>.
EXTRA_TEXT_REPEATS = 100
BASE_ALPHABET: tuple[str, ...] = tuple(string.ascii_letters + string.digits + string.punctuation) + (WORD_START,)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2):
    """Train a BPE tokenizer on ``texts`` and wrap it as a ``T5TokenizerFast``.

    Args:
        texts: training texts (dialogues, summaries, prompt templates).
        vocab_size: upper bound on the vocabulary; on the demo corpus BPE runs out of merges
            first (about 1.4k tokens for 4000 rows), which keeps the model small.
        min_frequency: a pair must occur this often to be merged.

    Returns:
        ``T5TokenizerFast`` with ``pad_token_id == 0``, ``eos_token_id == 1``, ``unk_token_id == 2``,
        right padding, and ``</s>`` appended to every encoded text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= len(BASE_ALPHABET) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges over the {len(BASE_ALPHABET)}-character base "
            f"alphabet - pass vocab_size >= 200 (the demo uses 4000)"
        )
    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always"),
            pre_tokenizers.Split(Regex(SPLIT_PUNCTUATION), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(BASE_ALPHABET),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != expected_id:  # T5 models assume pad=0, eos=1
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected_id} - tokenizers changed its trainer")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, SPECIAL_TOKENS.index(EOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512, padding_side="right"
    )
    tokenizer.padding_side = "right"  # T5 convention (TRL PR #262: left padding broke T5)
    return tokenizer


def corpus_texts(corpus_files: Sequence[str | os.PathLike], fields: Sequence[str] = ("dialogue", "summary")) -> list[str]:
    """The ``fields`` of every row of the given jsonl files, in file order."""
    texts = []
    for path in corpus_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file '{path}' not found - write it first with flan_rlhf.demo.write_corpus")
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    texts.extend(str(row[f]) for f in fields if f in row)
    return texts


def save_tokenizer_atomically(tokenizer, out_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` into a temporary sibling folder that then replaces ``out_dir``.

    Written through :func:`flan_rlhf.io.atomic_folder`: a crash never leaves a half-written
    tokenizer folder that a later run would reuse.
    """
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        tokenizer.save_pretrained(tmp)
    return out


def train_corpus_tokenizer(
    corpus_files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 4000,
    extra_texts: Sequence[str] = (),
) -> Path:
    """Train on the dialogues and summaries of ``corpus_files`` plus ``extra_texts`` and save to
    ``out_dir``. Returns ``out_dir``.

    ``extra_texts`` (e.g. prompt templates such as "Summarize the following conversation.")
    are each added ``EXTRA_TEXT_REPEATS`` times, so their words pass ``min_frequency`` and
    become whole tokens like the corpus's own words instead of letter-by-letter pieces.
    """
    extra = [text for text in extra_texts for _ in range(EXTRA_TEXT_REPEATS)]
    tokenizer = train_tokenizer([*corpus_texts(corpus_files), *extra], vocab_size=vocab_size)
    return save_tokenizer_atomically(tokenizer, out_dir)
