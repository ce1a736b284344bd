"""Write the demo corpus and train its tokenizer, reusing what an earlier run left behind.

Layout under ``root`` (default ``artifacts/demo``)::

    corpus/train.jsonl, corpus/validation.jsonl, corpus/test.jsonl, corpus/manifest.json
    tokenizer/tokenizer.json, tokenizer/tokenizer_config.json, tokenizer/manifest.json

A cached corpus is reused only when its manifest records the same generator settings, task
(``tail`` or ``woven``, :data:`~flan_rlhf.demo.corpus.TASKS`) and generator version
(:func:`~flan_rlhf.demo.corpus.generator_fingerprint` of that task), and a
cached tokenizer only when it was trained on that very corpus (by content hash), so changing
the seed never silently pairs a new corpus with an old tokenizer. SFT is not run here: the
pipeline runs it through :class:`flan_rlhf.sft.SFTModule` and a Trainer (``configs/demo_sft.yaml``).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flan_rlhf.demo.corpus import SPLITS, generator_fingerprint, write_corpus
from flan_rlhf.demo.tokenizer import train_corpus_tokenizer
from flan_rlhf.io import atomic_file

MANIFEST = "manifest.json"


def _template_texts() -> list[str]:
    """The fixed words of the prompt template presets, so the tokenizer has them as whole tokens."""
    from flan_rlhf.data.templates import TEMPLATE_PRESETS, TEXT_PLACEHOLDER

    return [template.replace(TEXT_PLACEHOLDER, " ") for template in TEMPLATE_PRESETS.values()]


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    with atomic_file(folder / MANIFEST) as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _files_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def prepare_demo_assets(
    root: str | os.PathLike = "artifacts/demo",
    seed: int = 0,
    rebuild: bool = False,
    n_train: int = 4000,
    n_val: int = 400,
    n_test: int = 400,
    toxic_share: float = 0.33,
    vocab_size: int = 4000,
    task: str = "tail",
) -> dict[str, Path]:
    """Make (or reuse) the demo corpus and tokenizer.

    Args:
        root: artefact folder.
        seed: corpus seed (the tokenizer is deterministic given the corpus).
        rebuild: rewrite both even when cached copies match.
        n_train, n_val, n_test, toxic_share: corpus settings (see :func:`write_corpus`).
        vocab_size: tokenizer vocabulary cap.
        task: how the corpus makes toxic summaries (``tail`` or ``woven``, see
            :func:`~flan_rlhf.demo.corpus.generate_split`); recorded in the corpus manifest, so a
            corpus of the other task under the same ``root`` is rewritten, never reused.

    Returns:
        ``{"corpus_dir", "train", "validation", "test", "tokenizer"}`` paths.
    """
    root = Path(root)
    corpus_dir, tokenizer_dir = root / "corpus", root / "tokenizer"
    corpus_settings = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, "toxic_share": toxic_share,
                       "task": task}
    manifest = {**corpus_settings, "generator": generator_fingerprint(task)}
    split_paths = {split: corpus_dir / f"{split}.jsonl" for split in SPLITS}

    corpus_cached = (
        not rebuild
        and _read_manifest(corpus_dir) == manifest
        and all(path.is_file() for path in split_paths.values())
    )
    if not corpus_cached:
        split_paths = write_corpus(corpus_dir, **corpus_settings)
        _write_manifest(corpus_dir, manifest)

    corpus_files = [split_paths[split] for split in SPLITS]
    tokenizer_settings = {"corpus_sha256": _files_sha256(corpus_files), "vocab_size": vocab_size}
    tokenizer_cached = (
        not rebuild
        and _read_manifest(tokenizer_dir) == tokenizer_settings
        and (tokenizer_dir / "tokenizer.json").is_file()
    )
    if not tokenizer_cached:
        # Train on train + validation only: test text stays unseen, as with a real tokenizer.
        train_corpus_tokenizer(
            [split_paths["train"], split_paths["validation"]], tokenizer_dir,
            vocab_size=vocab_size, extra_texts=_template_texts(),
        )
        _write_manifest(tokenizer_dir, tokenizer_settings)
    return {"corpus_dir": corpus_dir, **split_paths, "tokenizer": tokenizer_dir}
