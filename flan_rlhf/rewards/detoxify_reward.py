"""Non-toxicity reward from Detoxify (Unitary's Jigsaw-trained toxicity classifiers).

Variants (``model_type``): ``original`` (BERT, Jigsaw 2018, 6 labels), ``unbiased`` (RoBERTa,
Civil Comments, adds ``sexual_explicit`` and identity labels), ``multilingual`` (XLM-R),
``original-small`` and ``unbiased-small`` (ALBERT). Every label is an independent sigmoid.

Offline: ``Detoxify(model_type)`` downloads a checkpoint from GitHub releases and the BERT/
RoBERTa config + tokenizer from the hub. To run without network pass ``checkpoint`` (the
``.ckpt`` file) and ``huggingface_config_path`` (a folder with the config + tokenizer saved by
``save_pretrained``); the ``model_type`` stored inside the checkpoint
(``config.arch.args.model_type``) must then itself name a local folder, since Detoxify 0.5
reads the config from it before looking at ``huggingface_config_path``.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Sequence

import torch

from flan_rlhf.errors import first_line
from flan_rlhf.rewards.base import Reward, RewardOptionError
from flan_rlhf.rewards.long_text import LongText, check_long_text, score_by_worst_chunk, token_length, token_window
from flan_rlhf.rewards.text_batches import freeze_for_inference, sequence_classifier_logits, texts_to_score

DETOXIFY_MODEL_TYPES = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")


def normalise_label_weights(labels: str | dict[str, float]) -> dict[str, float]:
    """``"toxicity"`` -> ``{"toxicity": 1.0}``; a dict is checked and scaled to sum to 1.

    Raises:
        ValueError: empty dict, a negative weight, or all weights zero.
    """
    if isinstance(labels, str):
        return {labels: 1.0}
    weights = {str(label): float(weight) for label, weight in dict(labels).items()}
    if not weights:
        raise RewardOptionError("labels is empty: name one Detoxify label or give {label: weight, ...}")
    negative = [label for label, weight in weights.items() if weight < 0]
    if negative:
        raise RewardOptionError(f"Detoxify label weights must be >= 0, got negative weights for {negative}")
    total = sum(weights.values())
    if total <= 0:
        raise RewardOptionError("Detoxify label weights sum to 0: give at least one label a positive weight")
    return {label: weight / total for label, weight in weights.items()}


class DetoxifyReward(Reward):
    """Reward ``1 - weighted toxicity`` in ``[0, 1]``; weighted toxicity = sum_l w_l * p_l, sum_l w_l = 1.

    Args:
        model_type: one of ``original``, ``unbiased``, ``multilingual``, ``original-small``,
            ``unbiased-small`` (ignored for downloading when ``checkpoint`` is given).
        labels: one label name (``toxicity``, ``severe_toxicity``, ``obscene``, ``threat``,
            ``insult``, ``identity_attack``, ...) or ``{label: weight}``; weights are normalised
            to sum to 1. With several labels each ``1 - p_label`` is a component
            (``<name>_<label>``) and the reward is their weighted mean.
        checkpoint: local ``.ckpt`` path (the Detoxify release file, or one you built).
        huggingface_config_path: local folder with the matching HF config + tokenizer.
        name: component name in logs.
        batch_size: texts per forward pass.
        max_length: the classifier's window in tokens, special tokens included (Detoxify's models
            read 512); a longer input is cut to it (``long_text: whole``) or chunked.
        long_text: ``worst_chunk`` (default): a text longer than ``max_length`` tokens is split into
            chunks that fit (whole sentences grouped while they fit, an over-long sentence cut at a
            word), every chunk of the batch is scored in one batched pass, and each label of the
            text gets its highest probability over the chunks; a text that fits is scored exactly
            as with ``whole``. ``whole``: the text is cut to ``max_length`` tokens and its end is
            not read, so an insult past the first 512 tokens is never seen.
        score_prompt: score ``prompt + "\\n" + response``. Off by default: a toxic prompt (the
            point of RealToxicityPrompts) would make every reply look toxic, and the long,
            unchanged prompt dominates the classifier's input, so the reward stops depending on
            the response.
        trust_checkpoint: Detoxify unpickles ``checkpoint`` with ``weights_only=False``, which
            runs any code a crafted file holds. So a local ``checkpoint`` is first scanned
            (``torch.serialization.get_unsafe_globals_in_checkpoint``, nothing executed) and
            refused if it needs more than tensors and plain containers (the layout Detoxify
            reads: a dict of config and state_dict). ``true`` skips the scan for a file you trust.
    """

    def __init__(
        self,
        model_type: str = "original",
        labels: str | dict[str, float] = "toxicity",
        checkpoint: str | None = None,
        huggingface_config_path: str | None = None,
        name: str = "non_toxicity",
        batch_size: int = 32,
        max_length: int | None = 512,
        score_prompt: bool = False,
        trust_checkpoint: bool = False,
        long_text: LongText = "worst_chunk",
    ) -> None:
        if checkpoint is None and model_type not in DETOXIFY_MODEL_TYPES:
            raise RewardOptionError(
                f"unknown Detoxify model_type {model_type!r}: pick one of {', '.join(DETOXIFY_MODEL_TYPES)}"
            )
        if batch_size < 1:
            raise RewardOptionError(f"batch_size must be >= 1, got {batch_size}: pass a positive batch size")
        self.model_type = model_type
        self.label_weights = normalise_label_weights(labels)
        self.checkpoint = checkpoint
        self.huggingface_config_path = huggingface_config_path
        self.name = name
        self.batch_size = batch_size
        self.max_length = max_length
        self.score_prompt = score_prompt
        self.trust_checkpoint = trust_checkpoint
        self.long_text = check_long_text(long_text)
        self._detoxify = None

    def setup(self, device: torch.device | str = "cpu") -> "DetoxifyReward":
        """Load the checkpoint once (eval mode, no grads), check the labels, move to ``device``.

        Raises:
            FileNotFoundError: ``checkpoint`` or ``huggingface_config_path`` does not exist.
            OSError: the checkpoint or its config cannot be had (offline); one line naming the fix.
            ValueError: a requested label is not one of the checkpoint's labels.
        """
        if self._detoxify is None:
            self._detoxify = self._load()
            unknown = [label for label in self.label_weights if label not in self._detoxify.class_names]
            if unknown:
                raise ValueError(
                    f"Detoxify {self.model_type!r} has no label(s) {unknown}; "
                    f"pick from {self._detoxify.class_names}"
                )
            freeze_for_inference(self._detoxify.model)
        self._detoxify.model.to(device)
        self._detoxify.device = device
        return self

    def _load(self):
        from detoxify import Detoxify
        from detoxify.detoxify import MODEL_URLS

        local_paths = {"checkpoint": self.checkpoint, "huggingface_config_path": self.huggingface_config_path}
        for option, path in local_paths.items():
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"Detoxify {option} {path!r} does not exist: fix the path")
        if self.checkpoint is not None and not self.trust_checkpoint:
            refuse_unsafe_pickle(self.checkpoint)
        # torch.hub prints 'Downloading: ...' to stdout before it tries the network; offline that line
        # would come before the one-line error, so it is held back and shown only if the load succeeds.
        held_back = io.StringIO()
        try:
            with contextlib.redirect_stdout(held_back):
                detoxify = Detoxify(
                    model_type=self.model_type,
                    checkpoint=self.checkpoint,
                    device="cpu",
                    huggingface_config_path=self.huggingface_config_path,
                )
            sys.stdout.write(held_back.getvalue())
            return detoxify
        except OSError as err:  # URLError, huggingface_hub offline errors and missing files are all OSError
            reason = first_line(err)[:200]
            if self.checkpoint is None:
                fix = (
                    f"download {MODEL_URLS.get(self.model_type, 'the checkpoint')} once with network access "
                    "and pass checkpoint: <that file> and huggingface_config_path: "
                    "<folder with the HF config + tokenizer saved by save_pretrained>"
                )
            else:
                fix = (
                    "offline, the checkpoint's config.arch.args.model_type must be a local folder "
                    "with the HF config + tokenizer (and huggingface_config_path should point to it too)"
                )
            raise OSError(f"cannot load Detoxify {self.model_type!r} offline ({reason}); fix: {fix}") from err

    @property
    def class_names(self) -> list[str]:
        """All labels of the loaded checkpoint, in output order."""
        if self._detoxify is None:
            self.setup()
        return list(self._detoxify.class_names)

    def label_scores(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Probability of every label (its worst chunk's), ``{label: float32 tensor (batch,)}`` (sigmoid per label)."""
        return self._by_label(self._worst_chunk_probabilities(texts_to_score(None, texts)))

    def toxicity(self, texts: Sequence[str]) -> torch.Tensor:
        """Weighted toxicity ``sum_l w_l * p_l`` of each text, float32 tensor of shape ``(batch,)``.

        With ``long_text: worst_chunk`` each ``p_l`` is label ``l``'s highest probability over the
        text's chunks (the chunks may differ from label to label).
        """
        scores = self.label_scores(texts)
        weighted = [weight * scores[label] for label, weight in self.label_weights.items()]
        return torch.stack(weighted, dim=0).sum(dim=0)

    def _worst_chunk_probabilities(self, texts: list[str]) -> torch.Tensor:
        """``(batch, n_labels)`` probabilities of texts already through :func:`texts_to_score`."""
        if self._detoxify is None:
            self.setup()
        tokenizer = self._detoxify.tokenizer
        window = token_window(tokenizer, self.max_length) if self.long_text == "worst_chunk" else None
        return score_by_worst_chunk(texts, self._probabilities, window, token_length(tokenizer), worst="max")

    def _by_label(self, probabilities: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(batch, n_labels)`` -> ``{label: (batch,)}`` in the checkpoint's label order."""
        return {label: probabilities[:, column] for column, label in enumerate(self.class_names)}

    def _probabilities(self, texts: list[str]) -> torch.Tensor:
        """Sigmoid of the classifier's logits, ``batch_size`` texts per pass: ``(n, n_labels)``."""
        logits = sequence_classifier_logits(
            self._detoxify.model, self._detoxify.tokenizer, texts, self.batch_size, self.max_length
        )
        return torch.sigmoid(logits)

    def _component_name(self, label: str) -> str:
        return self.name if len(self.label_weights) == 1 else f"{self.name}_{label}"

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: 1 - p}`` for one label, else ``{<name>_<label>: 1 - p_label}``; each ``(batch,)``."""
        scores = self._by_label(self._worst_chunk_probabilities(texts_to_score(prompts, responses, self.score_prompt)))
        return {self._component_name(label): 1.0 - scores[label] for label in self.label_weights}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted mean of the per-label non-toxicities: ``1 - weighted toxicity``, shape ``(batch,)``."""
        weighted = [
            weight * components[self._component_name(label)] for label, weight in self.label_weights.items()
        ]
        return torch.stack(weighted, dim=0).sum(dim=0)


def refuse_unsafe_pickle(path: str) -> None:
    """Raise ``ValueError`` if ``torch.load(path, weights_only=True)`` would refuse ``path``.

    Scans the pickle's globals without executing anything (a checkpoint of tensors, dicts,
    lists and strings passes), so a later ``weights_only=False`` load runs no foreign code.
    """
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - not a torch zip checkpoint at all
        raise ValueError(f"Detoxify checkpoint {path!r} is not a readable torch checkpoint ({err}); re-download it") from err
    if unsafe:
        raise ValueError(
            f"Detoxify checkpoint {path!r} pickles Python objects ({', '.join(unsafe[:4])}) that would run when "
            "loaded; set trust_checkpoint: true only if the file comes from a source you trust"
        )
