"""Prompt templates and the token-length limit applied to templated prompts.

A template is a string with exactly one ``{text}`` placeholder; the raw prompt column value
replaces it verbatim (``str.replace``, not ``str.format``, so braces inside dialogues or custom
templates are never interpreted). Named presets:

- ``raw``: ``"{text}"``.
- ``summarize_dialogue``: ``"Summarize the following conversation.\\n\\n{text}\\n\\nSummary:"``, the
  prompt of the widely copied FLAN-T5 + DialogSum detoxification recipe (Hugging Face /
  DeepLearning.AI "Generative AI with LLMs", lab 3).
- ``continue_text``: ``"Continue the following text:\\n\\n{text}"``, an instruction for
  continuation prompts such as RealToxicityPrompts (our wording, FLAN-instruction style).
"""
from __future__ import annotations

from typing import Any

from flan_rlhf.data.loading import DataConfigError
from flan_rlhf.tokens import count_tokens, first_tokens_text

TEXT_PLACEHOLDER = "{text}"

TEMPLATE_PRESETS: dict[str, str] = {
    "raw": "{text}",
    "summarize_dialogue": "Summarize the following conversation.\n\n{text}\n\nSummary:",
    "continue_text": "Continue the following text:\n\n{text}",
}


def resolve_template(name_or_template: str) -> str:
    """Return the template string for a preset name, or validate and return a custom template.

    Raises:
        DataConfigError: the value is neither a preset name nor a string with exactly one ``{text}``.
    """
    if name_or_template in TEMPLATE_PRESETS:
        return TEMPLATE_PRESETS[name_or_template]
    placeholder_count = name_or_template.count(TEXT_PLACEHOLDER)
    if placeholder_count != 1:
        raise DataConfigError(
            f"template {name_or_template!r} is neither a preset ({', '.join(TEMPLATE_PRESETS)}) nor a string "
            f"with exactly one {TEXT_PLACEHOLDER} placeholder (found {placeholder_count}); set "
            f"--data.template to a preset name or e.g. 'Question: {TEXT_PLACEHOLDER} Answer:'"
        )
    return name_or_template


def apply_template(template: str, text: str) -> str:
    """Insert ``text`` into ``template`` at its ``{text}`` placeholder (verbatim, no format parsing)."""
    head, tail = template.split(TEXT_PLACEHOLDER, 1)
    return head + text + tail


def truncate_to_token_limit(
    tokenizer: Any, template: str, text: str, max_tokens: int, option: str = "--data.max_prompt_tokens"
) -> str:
    """Shorten ``text`` so that ``apply_template(template, text)`` has at most ``max_tokens`` tokens.

    The end of the text is cut, never the template, so instructions such as ``Summary:`` stay
    in place. The budget for the text is ``max_tokens`` minus the tokens of the template filled
    with an empty text; because tokenisation is not exactly additive, the result is re-counted
    and the budget shrunk by the excess until it fits (at most a few rounds).

    Args:
        option: the setting that asked for ``max_tokens``, named in the error.

    Returns:
        The kept part of ``text`` (a prefix; ``text`` itself when the prompt already fits).

    Raises:
        DataConfigError: the template alone needs ``max_tokens`` tokens or more.
    """
    if count_tokens(tokenizer, [apply_template(template, text)])[0] <= max_tokens:
        return text
    overhead = count_tokens(tokenizer, [apply_template(template, "")])[0]
    if overhead >= max_tokens:
        raise DataConfigError(
            f"the prompt template alone is {overhead} tokens, which leaves no room under "
            f"{option}={max_tokens}; raise {option} or use a shorter "
            "--data.template"
        )
    budget = max_tokens - overhead
    while True:
        kept = first_tokens_text(tokenizer, text, budget)
        length = count_tokens(tokenizer, [apply_template(template, kept)])[0]
        if length <= max_tokens or budget <= 0:
            return kept
        budget -= length - max_tokens
