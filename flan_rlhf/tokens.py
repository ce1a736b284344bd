"""Token counts and token-exact prefixes of texts, as a Hugging Face tokenizer sees them.

One place for "how long is this prompt" and "the part of this text that fits in N tokens",
shared by the data module (which cuts the inserted text of a template) and the rollout
(whose safety-net cut must report the prompt the model actually saw).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Token count of each text as the policy sees it (special tokens such as T5's ``</s>`` included)."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def first_tokens_text(tokenizer: Any, text: str, n_tokens: int) -> str:
    """The prefix of ``text`` covered by its first ``n_tokens`` tokens (no special tokens).

    Fast tokenizers cut the original string at the token's character offset, so the kept
    text is byte-identical to the source; slow tokenizers (e.g. ByT5) decode the kept ids.
    """
    if n_tokens <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]
        if n_tokens >= len(offsets):
            return text
        return text[: offsets[n_tokens - 1][1]]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if n_tokens >= len(ids):
        return text
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)


def special_token_count(tokenizer: Any) -> int:
    """How many special tokens the tokenizer adds to one text (T5: 1, ``</s>``; BERT: 2); 0 if it cannot say."""
    return int(tokenizer.num_special_tokens_to_add()) if hasattr(tokenizer, "num_special_tokens_to_add") else 0


def text_within_limit(tokenizer: Any, text: str, max_tokens: int) -> str:
    """What ``tokenizer(text, truncation=True, max_length=max_tokens)`` keeps of ``text``, as text.

    The tokenizer keeps the first ``max_tokens - num_special_tokens_to_add()`` tokens and adds
    its special tokens (T5: ``</s>``), so the kept text is those tokens' prefix of ``text``.
    """
    return first_tokens_text(tokenizer, text, max_tokens - special_token_count(tokenizer))


@dataclass(frozen=True)
class PromptTokenLimit:
    """A model's cap on prompt tokens, handed to the data module so the data cuts the inserted text
    (never the template) before the model would cut the end of the prompt.

    Attributes:
        tokenizer: the model's tokenizer (counts as the model counts).
        max_tokens: the cap, special tokens included.
        option: the setting it comes from, for messages (``--model.truncate_prompt_tokens``).
    """

    tokenizer: Any
    max_tokens: int
    option: str = "--model.truncate_prompt_tokens"
