"""Tiny models the reward tests build themselves (no downloads).

The classifiers have a zeroed classification weight and a chosen bias, so their logits are
the bias for every input: the expected scores are known by hand.
"""
from __future__ import annotations

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


def save_classifier(directory: Path, id2label: dict[int, str], bias: list[float] | None, dropout: float = 0.1) -> Path:
    """Save a tiny classifier + tokenizer as a Hugging Face folder; returns the folder."""
    model = tiny_bert_classifier(
        len(id2label), bias, dropout, id2label=id2label, label2id={name: index for index, name in id2label.items()}
    )
    model.save_pretrained(directory)
    write_bert_tokenizer(directory)
    return directory


def save_detoxify_checkpoint(directory: Path, bias: list[float]) -> tuple[Path, Path]:
    """A Detoxify-format checkpoint around a tiny BERT (STACK.md): returns ``(checkpoint, hf_dir)``.

    ``config.arch.args.model_type`` is the local HF folder, as Detoxify 0.5 needs offline.
    """
    hf_dir = directory / "tiny-bert"
    model = tiny_bert_classifier(len(DETOXIFY_CLASSES), bias)
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
