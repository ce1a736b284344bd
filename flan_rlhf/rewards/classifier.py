"""Any Hugging Face sequence classifier as a reward, reading one label chosen BY NAME.

The popular FLAN-T5 detox recipe rewards with the ``nothate`` logit of
facebook/roberta-hate-speech-dynabench-r4-target. Copies of it index the label by position in
the output of a ``pipeline``, which sorts scores by value, so they read whichever label scored
highest. Here the column index comes from ``model.config.id2label`` and nothing else.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch

from flan_rlhf.errors import first_line
from flan_rlhf.rewards.base import Reward, RewardOptionError
from flan_rlhf.rewards.long_text import LongText, check_long_text, score_by_worst_chunk, token_length, token_window
from flan_rlhf.rewards.text_batches import freeze_for_inference, sequence_classifier_logits, texts_to_score


def label_index(id2label: dict, label: str, model_name: str = "the model") -> int:
    """Column of ``label`` in a classifier's output, looked up in its ``id2label``.

    An exact match wins; otherwise a unique case-insensitive match is accepted.

    Raises:
        ValueError: the label is not one of the model's labels (the message lists them).
    """
    by_name = {str(name): int(index) for index, name in id2label.items()}
    if label in by_name:
        return by_name[label]
    folded = [name for name in by_name if name.lower() == label.lower()]
    if len(folded) == 1:
        return by_name[folded[0]]
    available = ", ".join(repr(name) for name in sorted(by_name, key=by_name.get))
    raise ValueError(
        f"label {label!r} is not a label of {model_name}; pick one of its id2label names: {available}"
    )


def load_sequence_classifier(model: str, tokenizer: str | None = None, local_files_only: bool = False):
    """Load ``(model, tokenizer)`` with the Auto classes from a hub id or a local folder.

    Raises:
        OSError: one line naming the model and the fix when it cannot be loaded (offline, typo).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        loaded_model = AutoModelForSequenceClassification.from_pretrained(
            model, local_files_only=local_files_only
        )
        loaded_tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or model, local_files_only=local_files_only
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load sequence classifier {model!r} ({first_line(err)}); download it once with network "
            f"access, or pass the path of a folder saved with save_pretrained (model + tokenizer)"
        ) from err
    return loaded_model, loaded_tokenizer


class ClassifierReward(Reward):
    """Reward = one named label's logit or probability from a sequence classifier.

    Args:
        model: hub id or local folder of an ``AutoModelForSequenceClassification``.
        label: the label to read, by name from ``config.id2label`` (never by position).
        output: ``"logit"`` (raw, unbounded; the recipe's choice) or ``"prob"`` (softmax over the
            labels; sigmoid for multi-label or single-output models).
        sign: ``1`` rewards the label, ``-1`` penalises it (e.g. ``label: hate, sign: -1``).
        name: component name in logs; defaults to the label.
        tokenizer: tokenizer id/folder when it differs from ``model``.
        batch_size: texts per forward pass.
        max_length: the classifier's window in tokens, special tokens included (``None``: the
            tokenizer's ``model_max_length``); a longer input is cut to it (``long_text: whole``) or chunked.
        long_text: ``worst_chunk`` (default): a text longer than the window is split into chunks
            that fit (whole sentences grouped while they fit, an over-long sentence cut at a word),
            every chunk of the batch is scored in one batched pass, and the text gets its worst
            chunk's score, the lowest ``sign * label score`` (so the most hateful chunk for
            ``label: nothate`` or for ``label: hate, sign: -1``); a text that fits is scored exactly
            as with ``whole``. ``whole``: the text is cut to the window and its end is not read.
        score_prompt: score ``prompt + "\\n" + response``. Off by default: the prompt is identical
            for every sample of a prompt and usually much longer than the response, so it dominates
            the classifier's view and the reward barely depends on what the policy wrote.
        local_files_only: never touch the network (fail fast offline).
    """

    def __init__(
        self,
        model: str = "facebook/roberta-hate-speech-dynabench-r4-target",
        label: str = "nothate",
        output: Literal["logit", "prob"] = "logit",
        sign: Literal[1, -1] = 1,
        name: str | None = None,
        tokenizer: str | None = None,
        batch_size: int = 32,
        max_length: int | None = 512,
        score_prompt: bool = False,
        local_files_only: bool = False,
        long_text: LongText = "worst_chunk",
    ) -> None:
        if output not in ("logit", "prob"):
            raise RewardOptionError(f"output must be 'logit' or 'prob', got {output!r}")
        if sign not in (1, -1):
            raise RewardOptionError(f"sign must be 1 or -1, got {sign!r}")
        if batch_size < 1:
            raise RewardOptionError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
        self.model_name = model
        self.label = label
        self.output = output
        self.sign = sign
        self.name = name or label
        self.tokenizer_name = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.score_prompt = score_prompt
        self.local_files_only = local_files_only
        self.long_text = check_long_text(long_text)
        self._model = None
        self._tokenizer = None
        self._label_index: int | None = None

    def setup(self, device: torch.device | str = "cpu") -> "ClassifierReward":
        """Load the model once (eval mode, no grads), check the label, move to ``device``."""
        if self._model is None:
            model, tokenizer = load_sequence_classifier(
                self.model_name, self.tokenizer_name, self.local_files_only
            )
            self._label_index = label_index(model.config.id2label, self.label, repr(self.model_name))
            self._model = freeze_for_inference(model)
            self._tokenizer = tokenizer
        self._model.to(device)
        return self

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """All labels' logits of each text as the model reads it (cut to ``max_length``, not decoded
        nor chunked): float32 CPU tensor of shape ``(batch, num_labels)``."""
        if self._model is None:
            self.setup()
        return sequence_classifier_logits(
            self._model, self._tokenizer, list(texts), self.batch_size, self.max_length
        )

    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        """All labels' probabilities, shape ``(batch, num_labels)`` (softmax, or sigmoid if multi-label)."""
        logits = self.logits(texts)
        config = self._model.config
        if config.problem_type == "multi_label_classification" or logits.shape[-1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def label_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """The chosen label's logit or probability (per ``output``), unsigned, shape ``(batch,)``.

        Texts are decoded (:func:`texts_to_score`); with ``long_text: worst_chunk`` a text longer
        than the window gets its worst chunk's value (the lowest for ``sign: 1``, highest for ``-1``).
        """
        return self._worst_chunk_label_scores(texts_to_score(None, texts))

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: sign * label score}``, shape ``(batch,)``."""
        texts = texts_to_score(prompts, responses, self.score_prompt)
        return {self.name: self.sign * self._worst_chunk_label_scores(texts)}

    def _worst_chunk_label_scores(self, texts: list[str]) -> torch.Tensor:
        """``(batch,)`` unsigned label scores of texts already through :func:`texts_to_score`."""
        if self._model is None:
            self.setup()
        window = token_window(self._tokenizer, self.max_length) if self.long_text == "worst_chunk" else None
        worst = "min" if self.sign == 1 else "max"
        return score_by_worst_chunk(texts, self._label_values, window, token_length(self._tokenizer), worst=worst)

    def _label_values(self, texts: list[str]) -> torch.Tensor:
        """The chosen label's logit or probability of each text as the model reads it: ``(n,)``."""
        values = self.logits(texts) if self.output == "logit" else self.probabilities(texts)
        return values[:, self._label_index]
