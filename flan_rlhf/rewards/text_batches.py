"""Turning (prompt, response) strings into batches and sequence-classifier logits.

Shared by the model-based rewards (classifier, detoxify, preference) so that all of them
batch, truncate, run in eval mode and skip autograd in the same way.
"""
from __future__ import annotations

import html
import inspect
from typing import Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")

PROMPT_RESPONSE_SEPARATOR = "\n"


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Yield consecutive slices of ``items`` of at most ``batch_size`` elements."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def texts_to_score(prompts: Sequence[str] | None, responses: Sequence[str], score_prompt: bool = False) -> list[str]:
    """The strings a single-text scorer sees: the response, or ``prompt + "\\n" + response``, decoded.

    The one place every reward's text passes before it is scored (``components`` and the
    ``toxicity(texts)`` of the toxicity rewards alike): HTML entities are decoded
    (``html.unescape``: ``&#8220;`` -> ``“``, ``&amp;`` -> ``&``), since scraped text carries them and
    a scorer would read ``&#8220;`` as the word ``8220``. Each text is decoded exactly once.

    Args:
        prompts: ``batch`` prompt strings (ignored, and may be ``None``, unless ``score_prompt``).
        responses: ``batch`` response strings.
        score_prompt: join each prompt in front of its response.

    Returns:
        ``batch`` strings.
    """
    if not score_prompt:
        return [html.unescape(str(response)) for response in responses]
    if prompts is None or len(prompts) != len(responses):
        raise ValueError(
            f"got {0 if prompts is None else len(prompts)} prompts for {len(responses)} responses: "
            "pass one prompt per response"
        )
    return [
        html.unescape(f"{prompt}{PROMPT_RESPONSE_SEPARATOR}{response}") for prompt, response in zip(prompts, responses)
    ]


def freeze_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode (dropout off) and stop gradients to its parameters."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def sequence_classifier_logits(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    max_length: int | None,
    text_pairs: Sequence[str] | None = None,
) -> torch.Tensor:
    """Logits of a Hugging Face sequence classifier, batched, in eval mode, without autograd.

    ``torch.no_grad`` rather than ``inference_mode``: inference tensors raise when a caller
    later mixes them into a graph (e.g. reward minus a KL term that still carries grad).

    Args:
        model: an ``AutoModelForSequenceClassification``-style module returning ``.logits``.
        tokenizer: its tokenizer.
        texts: ``batch`` strings (first segment).
        batch_size: strings per forward pass.
        max_length: truncate inputs to this many tokens (``None``: the tokenizer's limit).
        text_pairs: optional ``batch`` second segments (encoded as a text pair).

    Returns:
        float32 CPU tensor of shape ``(batch, num_labels)``.
    """
    if model.training:
        model.eval()
    device = next(model.parameters()).device
    accepted = forward_argument_names(model)
    chunks: list[torch.Tensor] = []
    indices = list(range(len(texts)))
    for index_batch in batched(indices, batch_size):
        first = [texts[i] for i in index_batch]
        second = [text_pairs[i] for i in index_batch] if text_pairs is not None else None
        encoded = tokenizer(
            first,
            second,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        # Only the inputs the model's forward accepts (some tokenizers add token_type_ids a model lacks).
        encoded = {key: value.to(device) for key, value in encoded.items() if key in accepted}
        chunks.append(model(**encoded).logits.float().cpu())
    if not chunks:
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        return torch.zeros(0, num_labels)
    return torch.cat(chunks, dim=0)


def forward_argument_names(model: torch.nn.Module) -> set[str]:
    """Names of the keyword arguments ``model.forward`` accepts."""
    return set(inspect.signature(model.forward).parameters)
