"""The offline demo's own data and tokenizer.

No pretrained FLAN-T5 or DialogSum can be downloaded on an offline machine, so the demo
generates a small dialogue-summarisation corpus in DialogSum's format (:mod:`.corpus`), trains
a tokenizer on it (:mod:`.tokenizer`), and :mod:`.prepare` caches both under
``artifacts/demo``. The small T5 is built by :func:`flan_rlhf.policy.build_t5_from_config` and
fine-tuned by :class:`flan_rlhf.sft.SFTModule`.
"""
from flan_rlhf.demo.corpus import INSULT_VOCABULARY, generate_split, write_corpus

__all__ = ["INSULT_VOCABULARY", "generate_split", "write_corpus"]
