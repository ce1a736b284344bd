"""Evaluation: torchmetrics metrics (quality, toxicity, diversity, insults), paired bootstrap, reports.

The README's "Evaluation" section gives the protocol and every metric's definition.
"""
from flan_rlhf.eval.bootstrap import (
    Interval,
    PairedBootstrapResult,
    bootstrap_indices,
    index_counts,
    mean_statistic,
    paired_bootstrap,
    paired_bootstrap_statistic,
    ratio_statistic,
)
from flan_rlhf.eval.metrics import (
    DistinctNgrams,
    InsultMatcher,
    QualityMetrics,
    ResponseLength,
    ToxicityMetrics,
    bleu_from_statistics,
    bleu_statistics,
    distinct_n,
    insult_flags,
    insult_fraction,
    per_prompt_toxicity,
    resolve_rouge_keys,
    rouge_per_sample,
    sentence_splitter_available,
    split_sentences,
)
from flan_rlhf.sentences import PACKAGED_NLTK_DATA
from flan_rlhf.eval.report import format_table, read_scalar_curves, write_report

__all__ = [
    "PACKAGED_NLTK_DATA",
    "DistinctNgrams",
    "InsultMatcher",
    "Interval",
    "PairedBootstrapResult",
    "QualityMetrics",
    "ResponseLength",
    "ToxicityMetrics",
    "bleu_from_statistics",
    "bleu_statistics",
    "bootstrap_indices",
    "distinct_n",
    "format_table",
    "index_counts",
    "insult_flags",
    "insult_fraction",
    "mean_statistic",
    "paired_bootstrap",
    "paired_bootstrap_statistic",
    "per_prompt_toxicity",
    "ratio_statistic",
    "read_scalar_curves",
    "resolve_rouge_keys",
    "rouge_per_sample",
    "sentence_splitter_available",
    "split_sentences",
    "write_report",
]
