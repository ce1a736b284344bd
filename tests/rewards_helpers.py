"""Tiny models the reward tests build themselves (no downloads).

The classifiers have a zeroed classification weight and a chosen bias, so their logits are
the bias for every input: the expected scores are known by hand. :func:`one_word_classifier`
adds one reaction: its logits move by a chosen amount when one word is among the tokens it reads.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

WORDS = ["you", "are", "kind", "stupid", "thank", "idiot", "lovely", "hello", "world", "the", "a"]
DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]


def write_bert_tokenizer(directory: Path) -> BertTokenizer:
    """A word-level BertTokenizer over :data:`WORDS`, saved to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab_file))
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_bert_classifier(num_labels: int, bias: list[float] | None = None, dropout: float = 0.1, **config) -> BertForSequenceClassification:
    """A 1-layer BERT classifier; with ``bias`` its logits are exactly ``bias`` for any input."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=5 + len(WORDS),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            num_labels=num_labels,
            **config,
        )
    )
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    return model


#: How far the :func:`one_word_classifier`'s signal goes: ``tanh`` of the first coordinate of a
#: layer-normalised one-hot vector of width 16, ``(15/16) / sqrt(15/256)`` (about 0.9991).
WORD_SIGNAL = math.tanh((15 / 16) / math.sqrt(15 / 256))


def one_word_classifier(word: str, bias: list[float], reaction: list[float], **config) -> BertForSequenceClassification:
    """A 1-layer BERT whose logits are ``bias + reaction * WORD_SIGNAL`` if ``word`` is among the tokens
    it reads (once or more, anywhere), else exactly ``bias``.

    How: only ``word``'s embedding is non-zero (a one-hot), attention is uniform (zero queries and
    keys), so the first token's hidden state is that one-hot's share of the average, which the
    layer norms scale back to the same vector whatever the share; the feed-forward adds nothing,
    the pooler is the identity (then ``tanh``) and the classifier reads its first coordinate.
    Truncation hides the word: a text cut before it scores ``bias``.
    """
    model = tiny_bert_classifier(len(bias), None, 0.0, **config)
    word_id = WORDS.index(word) + 5
    hidden = model.config.hidden_size
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.bert.embeddings.word_embeddings.weight[word_id, 0] = 1.0
        layer_norms = [model.bert.embeddings.LayerNorm, *(module for name, module in model.named_modules()
                                                         if name.endswith("output.LayerNorm"))]
        for layer_norm in layer_norms:
            layer_norm.weight.fill_(1.0)
        for layer in model.bert.encoder.layer:
            layer.attention.self.value.weight.copy_(torch.eye(hidden))
            layer.attention.output.dense.weight.copy_(torch.eye(hidden))
        model.bert.pooler.dense.weight.copy_(torch.eye(hidden))
        model.classifier.weight[:, 0] = torch.tensor(reaction)
        model.classifier.bias.copy_(torch.tensor(bias))
    return model


def save_classifier(
    directory: Path,
    id2label: dict[int, str],
    bias: list[float] | None,
    dropout: float = 0.1,
    reacting_to: tuple[str, list[float]] | None = None,
) -> Path:
    """Save a tiny classifier + tokenizer as a Hugging Face folder; returns the folder.

    ``reacting_to=(word, reaction)`` saves a :func:`one_word_classifier` instead.
    """
    labels = {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    if reacting_to is None:
        model = tiny_bert_classifier(len(id2label), bias, dropout, **labels)
    else:
        model = one_word_classifier(reacting_to[0], bias, reacting_to[1], **labels)
    model.save_pretrained(directory)
    write_bert_tokenizer(directory)
    return directory


def save_detoxify_checkpoint(
    directory: Path, bias: list[float], reacting_to: tuple[str, list[float]] | None = None
) -> tuple[Path, Path]:
    """A Detoxify-format checkpoint around a tiny BERT (STACK.md): returns ``(checkpoint, hf_dir)``.

    ``config.arch.args.model_type`` is the local HF folder, as Detoxify 0.5 needs offline.
    ``reacting_to=(word, reaction)`` wraps a :func:`one_word_classifier` instead.
    """
    hf_dir = directory / "tiny-bert"
    if reacting_to is None:
        model = tiny_bert_classifier(len(DETOXIFY_CLASSES), bias)
    else:
        model = one_word_classifier(reacting_to[0], bias, reacting_to[1])
    model.save_pretrained(hf_dir)
    write_bert_tokenizer(hf_dir)
    checkpoint = directory / "tiny_detoxify.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": str(hf_dir),
                        "model_name": "BertForSequenceClassification",
                        "tokenizer_name": "BertTokenizer",
                        "num_classes": len(DETOXIFY_CLASSES),
                    }
                },
                "dataset": {"args": {"classes": DETOXIFY_CLASSES}},
            },
            "state_dict": model.state_dict(),
        },
        checkpoint,
    )
    return checkpoint, hf_dir
