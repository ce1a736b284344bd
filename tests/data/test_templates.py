"""Prompt templates and token-limit truncation (flan_rlhf.data.templates)."""
from __future__ import annotations

import pytest
from transformers import ByT5Tokenizer

from flan_rlhf.data.loading import DataConfigError
from flan_rlhf.data.templates import apply_template, resolve_template, truncate_to_token_limit
from flan_rlhf.tokens import count_tokens, text_within_limit


def test_presets_and_custom_templates():
    assert apply_template(resolve_template("raw"), "Hi there") == "Hi there"
    assert apply_template(resolve_template("summarize_dialogue"), "#Person1#: Hi.") == (
        "Summarize the following conversation.\n\n#Person1#: Hi.\n\nSummary:")
    continued = apply_template(resolve_template("continue_text"), "So I said")
    assert continued == "Continue the following text:\n\nSo I said"
    custom = resolve_template("Q: {text} A:")
    # braces in the text or template are not format fields
    assert apply_template(custom, "what is {x}?") == "Q: what is {x}? A:"


@pytest.mark.parametrize("bad", ["summarise", "no placeholder", "{text} and {text}"])
def test_bad_template_names_presets_and_placeholder(bad):
    expected = r"neither a preset \(raw, summarize_dialogue, continue_text\).*\{text\}"
    with pytest.raises(DataConfigError, match=expected):
        resolve_template(bad)


def test_truncation_keeps_template_and_fits_the_token_limit():
    tokenizer = ByT5Tokenizer()  # one token per UTF-8 byte, plus </s>
    assert count_tokens(tokenizer, ["abc", "é"]) == [4, 3]
    # raw: 10 bytes of text + </s> = 11 tokens
    assert truncate_to_token_limit(tokenizer, "{text}", "abcdefghijklmno", 11) == "abcdefghij"
    template = resolve_template("summarize_dialogue")
    overhead = len(template.replace("{text}", "").encode()) + 1
    kept = truncate_to_token_limit(tokenizer, template, "abcdefgh", overhead + 2)
    assert kept == "ab"
    assert apply_template(template, kept) == "Summarize the following conversation.\n\nab\n\nSummary:"
    # a 2-byte character is never split: budget 2 bytes for "hé..." keeps only "h"
    assert truncate_to_token_limit(tokenizer, "{text}", "héllo", 4) == "hé"
    assert truncate_to_token_limit(tokenizer, "{text}", "héllo", 3) == "h"
    assert truncate_to_token_limit(tokenizer, "{text}", "short", 50) == "short"


def test_template_longer_than_limit_is_rejected():
    with pytest.raises(DataConfigError, match=r"template alone is 50 tokens.*max_prompt_tokens=20"):
        truncate_to_token_limit(ByT5Tokenizer(), resolve_template("summarize_dialogue"), "abc", 20)


def test_text_within_limit_is_what_the_tokenizer_keeps():
    tokenizer = ByT5Tokenizer()
    # max_length 5 keeps 4 byte tokens + </s>, as tokenizer(truncation=True) does
    ids = tokenizer("abcdefgh", truncation=True, max_length=5)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text_within_limit(tokenizer, "abcdefgh", 5) == "abcd"
    assert text_within_limit(tokenizer, "abc", 50) == "abc"
