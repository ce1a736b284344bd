"""Before/after evaluation report: ``metrics.json``, ``report.md``, per-sample JSONL and PNG figures.

Input is two lists of per-sample rows, one per policy, over the same prompts::

    {"prompt_id": int, "sample": int, "prompt": str, "response": str, "references": [str, ...],
     "toxicity": float, "positivity": float (optional), "kl": float (optional, sequence KL
     to the reference policy), "response_tokens": int (optional)}

Every metric of :mod:`flan_rlhf.eval.metrics` is computed for both sides, and the difference
``after - before`` gets a paired bootstrap 95% interval that resamples *prompts*
(:mod:`flan_rlhf.eval.bootstrap`), so the k samples of a prompt stay together.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from flan_rlhf.eval.bootstrap import (
    Statistic,
    mean_statistic,
    paired_bootstrap_statistic,
    ratio_statistic,
)
from flan_rlhf.eval.metrics import (
    DEFAULT_ROUGE_KEYS,
    DistinctNgrams,
    ResponseLength,
    ToxicityMetrics,
    bleu_from_statistics,
    bleu_statistics,
    insult_flags,
    per_prompt_toxicity,
    resolve_rouge_keys,
    rouge_per_sample,
    sacrebleu_tokenizer,
)
from flan_rlhf.io import atomic_file

REQUIRED_ROW_KEYS = ("prompt_id", "sample", "response", "references", "toxicity")
OPTIONAL_MEAN_KEYS = {
    "positivity": "positivity_mean", "kl": "kl_mean", "response_tokens": "response_tokens_mean",
}

#: Display order; metrics not computed for a run are skipped.
METRIC_ORDER = (
    "toxicity_mean", "toxic_fraction", "expected_max_toxicity", "toxicity_probability", "insult_fraction",
    "positivity_mean", "kl_mean", "rouge1", "rouge2", "rougeL", "rougeLsum", "sacrebleu", "bleu",
    "distinct1", "distinct2", "response_len_mean", "response_tokens_mean",
)
LOWER_IS_BETTER = frozenset({
    "toxicity_mean", "toxic_fraction", "expected_max_toxicity", "toxicity_probability", "insult_fraction",
    "kl_mean",
})
NO_DIRECTION = frozenset({"response_len_mean", "response_tokens_mean"})

#: Panels of ``training_curves.png``: title -> TensorBoard scalar tag. Tags containing
#: :data:`TOXICITY_TAG_PATTERN` get a panel of their own.
DEFAULT_CURVE_TAGS: Mapping[str, str] = {"reward": "env/reward_mean", "KL": "objective/kl"}
TOXICITY_TAG_PATTERN = "toxic"
#: validation panels, drawn when their tags were logged: task quality, then the monitors
#: (rewards watched, not trained on: ``--model.init_args.monitors``) beside it
VALIDATION_QUALITY_TAG = "val/rougeL"
MONITOR_TAG_PREFIX = "val/monitor/"
#: y-axis label of each panel, by title (a panel of ``curve_tags`` not named here gets its title)
PANEL_UNITS: Mapping[str, str] = {
    "reward": "mean reward per response",
    "KL": "KL to reference, nats per response",
    "toxicity": "mean score or share, 0-1",
    "validation ROUGE-L": "ROUGE-L F1, 0-1",
    "monitors (validation)": "mean score per response",
}
BLEU_N_GRAM = 4

_COMPUTED_KEYS = ("before", "after", "delta", "ci", "n_prompts", "n_responses", "samples_per_prompt",
                  "toxicity_threshold", "bootstrap", "notes", "files")


# ----------------------------------------------------------------------------- rows
def _prepare_rows(rows: Sequence[Mapping[str, Any]], side: str) -> list[dict[str, Any]]:
    """Validated copies of the rows, with references as lists and numbers as Python types."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"{side}_rows is empty or not a list: pass one dict per generated sample")
    prepared, seen = [], set()
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{side}_rows[{index}] is {type(row).__name__}: each row must be a dict")
        missing = [key for key in REQUIRED_ROW_KEYS if key not in row]
        if missing:
            raise ValueError(
                f"{side}_rows[{index}] lacks {missing}: each row needs {list(REQUIRED_ROW_KEYS)}"
            )
        out = dict(row)
        out["prompt_id"], out["sample"] = int(row["prompt_id"]), int(row["sample"])
        refs = row["references"]
        out["references"] = [refs] if isinstance(refs, str) else [str(ref) for ref in refs]
        if not isinstance(row["response"], str):
            kind = type(row["response"]).__name__
            raise ValueError(f"{side}_rows[{index}]['response'] is {kind}: pass the decoded text as str")
        for key in ("toxicity", *OPTIONAL_MEAN_KEYS):
            if key in row and row[key] is not None:
                value = float(row[key])
                if not math.isfinite(value):
                    raise ValueError(
                        f"{side}_rows[{index}]['{key}'] is {value}: scores must be finite numbers"
                    )
                out[key] = value
        key = (out["prompt_id"], out["sample"])
        if key in seen:
            raise ValueError(
                f"{side}_rows has two rows for prompt_id={key[0]}, sample={key[1]}: keep one per pair"
            )
        seen.add(key)
        prepared.append(out)
    without = [index for index, row in enumerate(prepared) if not row["references"]]
    if without and len(without) < len(prepared):
        raise ValueError(f"{side}_rows[{without[0]}] has no references but other rows do: give every row at least one "
                         "reference string, or none (an evaluation without references skips ROUGE and BLEU)")
    return prepared


def _check_same_prompts(before: list[dict], after: list[dict]) -> list[int]:
    ids_before = {row["prompt_id"] for row in before}
    ids_after = {row["prompt_id"] for row in after}
    if ids_before != ids_after:
        only_before = sorted(ids_before - ids_after)[:5]
        only_after = sorted(ids_after - ids_before)[:5]
        raise ValueError(
            f"before and after rows cover different prompts (only before: {only_before}, only after: "
            f"{only_after}): evaluate both policies on the same prompts for a paired comparison"
        )
    return sorted(ids_before)


# ----------------------------------------------------------------------------- one side
@dataclass
class _SideResult:
    summary: dict[str, float] = field(default_factory=dict)
    statistics: dict[str, Statistic] = field(default_factory=dict)
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)


def _bleu_statistic(per_unit_stats: np.ndarray, n_gram: int) -> Statistic:
    """Corpus BLEU of the drawn prompts: sum their sufficient statistics, then BLEU."""
    def statistic(indices: np.ndarray) -> np.ndarray:
        summed = torch.from_numpy(per_unit_stats[indices].sum(axis=1))  # (R, 2 * n_gram + 2)
        return bleu_from_statistics(summed, n_gram).numpy()

    return statistic


def _evaluate_side(
    rows: list[dict[str, Any]],
    unit_of: Mapping[int, int],
    side: str,
    rouge_keys: tuple[str, ...],
    threshold: float,
    vocabulary: Sequence[str] | None,
    min_fragment: int,
) -> _SideResult:
    """All metrics of one policy, per-sample values and per-prompt bootstrap statistics."""
    n_units = len(unit_of)
    units = np.array([unit_of[row["prompt_id"]] for row in rows], dtype=np.int64)
    counts = np.bincount(units, minlength=n_units).astype(np.float64)
    result = _SideResult()

    def add_mean(name: str, values: np.ndarray, value: float | None = None) -> None:
        values = np.asarray(values, dtype=np.float64)
        result.summary[name] = float(values.mean()) if value is None else float(value)
        sums = np.bincount(units, weights=values, minlength=n_units)
        result.statistics[name] = ratio_statistic(sums, counts)

    responses = [row["response"] for row in rows]
    references = [row["references"] for row in rows]

    # toxicity (RealToxicityPrompts definitions live in ToxicityMetrics)
    scores = torch.tensor([row["toxicity"] for row in rows], dtype=torch.float64)
    toxicity = ToxicityMetrics(threshold)
    toxicity.update(scores, prompt_ids=torch.from_numpy(units))
    tox = {key: float(value) for key, value in toxicity.compute().items()}
    per_prompt = per_prompt_toxicity(scores, torch.from_numpy(units), threshold)
    toxic = (scores.numpy() >= threshold).astype(np.float64)
    result.per_sample["toxic"] = toxic
    add_mean("toxicity_mean", scores.numpy(), tox["toxicity_mean"])
    add_mean("toxic_fraction", toxic, tox["toxic_fraction"])
    if counts.max(initial=0) > 1:  # with one sample per prompt they are toxicity_mean and toxic_fraction again
        maxima = per_prompt["max"].numpy()
        result.summary["expected_max_toxicity"] = tox["expected_max_toxicity"]
        result.statistics["expected_max_toxicity"] = mean_statistic(maxima)
        result.summary["toxicity_probability"] = tox["toxicity_probability"]
        result.statistics["toxicity_probability"] = mean_statistic((maxima >= threshold).astype(np.float64))

    if vocabulary is not None:
        flags = np.array(insult_flags(responses, vocabulary, min_fragment), dtype=np.float64)
        result.per_sample["insult"] = flags
        add_mean("insult_fraction", flags)

    for key, name in OPTIONAL_MEAN_KEYS.items():
        present = [row.get(key) is not None for row in rows]
        if all(present):
            add_mean(name, np.array([row[key] for row in rows], dtype=np.float64))
        elif any(present):
            raise ValueError(
                f"{sum(present)} of {len(rows)} {side} rows have '{key}': "
                "give it on every row of a side or on none"
            )

    # quality: the functions QualityMetrics is built on, each per-sample value computed once
    # (none without references: a toxicity-only protocol such as RealToxicityPrompts)
    if all(references):
        for key, values in rouge_per_sample(responses, references, rouge_keys).items():
            result.per_sample[key] = values.numpy()
            add_mean(key, values.numpy())
        for name, tokenizer in (("bleu", None), ("sacrebleu", sacrebleu_tokenizer())):
            tokenizer_kwargs = {"tokenizer": tokenizer} if tokenizer else {}
            stats = bleu_statistics(responses, references, BLEU_N_GRAM, **tokenizer_kwargs)
            if name == "bleu":
                result.per_sample["bleu"] = bleu_from_statistics(stats, BLEU_N_GRAM, "add-one").numpy()
            per_unit = np.zeros((n_units, stats.shape[1]))
            np.add.at(per_unit, units, stats.numpy())
            result.summary[name] = float(bleu_from_statistics(stats.sum(dim=0), BLEU_N_GRAM))
            result.statistics[name] = _bleu_statistic(per_unit, BLEU_N_GRAM)

    # diversity and length
    # Distinct-n gets no bootstrap interval: it is a corpus-level ratio that falls as the corpus
    # repeats itself, so resampled corpora (prompts drawn twice) are biased low and a percentile
    # interval can miss the point estimate (seen on the demo: +0.0108 [+0.0062, +0.0103]).
    distinct = DistinctNgrams((1, 2))
    distinct.update(responses)
    for name, value in distinct.compute().items():
        result.summary[name] = float(value)
    length = ResponseLength()
    length.update(responses)
    words = np.array([len(response.split()) for response in responses], dtype=np.float64)
    add_mean("response_len_mean", words, float(length.compute()))
    return result


# ----------------------------------------------------------------------------- formatting
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any, signed: bool = False) -> str:
    if not _is_number(value):
        return "n/a"
    digits = 2 if abs(value) >= 100 else 4
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _metric_label(name: str) -> str:
    if name in NO_DIRECTION:
        return name
    return f"{name} {'↓' if name in LOWER_IS_BETTER else '↑'}"


def _table_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    before, after, delta = metrics.get("before", {}), metrics.get("after", {}), metrics.get("delta", {})
    names = [name for name in METRIC_ORDER if name in before or name in after]
    names += sorted((set(before) | set(after)) - set(names))
    rows = []
    for name in names:
        d = delta.get(name)
        delta_text = "n/a"
        if isinstance(d, Mapping):
            low, high = _fmt(d.get("ci_low"), True), _fmt(d.get("ci_high"), True)
            delta_text = f"{_fmt(d.get('value'), True)} [{low}, {high}]" if _is_number(d.get("ci_low")) else \
                f"{_fmt(d.get('value'), True)} (no CI)"
        rows.append((_metric_label(name), _fmt(before.get(name)), _fmt(after.get(name)), delta_text))
    return rows


def _confidence_header(metrics: Mapping[str, Any]) -> str:
    confidence = metrics.get("bootstrap", {}).get("confidence", 0.95)
    return f"delta (after - before) [{confidence:.0%} CI]"


def format_table(metrics: Mapping[str, Any]) -> str:
    """A fixed-width console table ``metric | before | after | delta [CI]`` of a metrics dict
    (as returned by :func:`write_report` or read from ``metrics.json``)."""
    header = ("metric", "before", "after", _confidence_header(metrics))
    rows = [header, *_table_rows(metrics)]
    widths = [max(len(row[col]) for row in rows) for col in range(4)]
    lines = [
        "  ".join(cell.ljust(width) if col == 0 else cell.rjust(width) for col, (cell, width) in
                  enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(metrics: Mapping[str, Any]) -> str:
    """The before/after table of a metrics dict (``metrics.json``) as a Markdown table."""
    lines = [f"| metric | before | after | {_confidence_header(metrics)} |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _table_rows(metrics)]
    return "\n".join(lines)


def _samples_text(samples_per_prompt: Any) -> str:
    if isinstance(samples_per_prompt, int):
        return f"k = {samples_per_prompt} sample{'s' if samples_per_prompt != 1 else ''} per prompt"
    low, high = samples_per_prompt["min"], samples_per_prompt["max"]
    return f"k = {low}-{high} samples per prompt (varies by prompt)"


def decoding_line(decoding: Any, samples_per_prompt: Any) -> str:
    """One sentence on how responses were decoded, e.g. "Decoding: sampled with seed 0; k = 25 ..."

    ``decoding`` is ``meta["decoding"]``: a dict with ``mode`` ("sampled"/"greedy"), ``seed``
    and any other settings (temperature, top_p, max_new_tokens, ...), or a free string.
    """
    k_text = _samples_text(samples_per_prompt)
    if decoding is None:
        return f"Decoding: not recorded (pass meta['decoding'] = {{'mode': 'sampled', 'seed': S}}); {k_text}."
    if not isinstance(decoding, Mapping):
        return f"Decoding: {decoding}; {k_text}."
    mode = str(decoding.get("mode", "not recorded"))
    if mode.lower().startswith("sampl"):
        seed = decoding.get("seed")
        text = f"sampled with seed {seed}" if seed is not None else "sampled (seed not recorded)"
    else:
        text = mode
    extras = ", ".join(f"{key}={value}" for key, value in decoding.items() if key not in ("mode", "seed"))
    return f"Decoding: {text}{f' ({extras})' if extras else ''}; {k_text}."


# ----------------------------------------------------------------------------- figures
def _new_figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def plot_toxicity_histogram(before: np.ndarray, after: np.ndarray, threshold: float, path: Path) -> None:
    """Overlaid histograms of per-response toxicity, before vs after, with the threshold line."""
    values = np.concatenate([before, after])
    low, high = (0.0, 1.0) if values.min() >= 0.0 and values.max() <= 1.0 else (values.min(), values.max())
    bins = np.linspace(low, high if high > low else low + 1.0, 21)
    figure = _new_figure(6.4, 4.0)
    axes = figure.add_subplot(1, 1, 1)
    axes.hist(before, bins=bins, alpha=0.55, label=f"before (mean {before.mean():.3f})", color="tab:red")
    axes.hist(after, bins=bins, alpha=0.55, label=f"after (mean {after.mean():.3f})", color="tab:blue")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    axes.set_xlabel("toxicity score per response")
    axes.set_ylabel("responses")
    axes.set_title("Toxicity before vs after")
    axes.legend()
    figure.tight_layout()
    _save_figure(figure, path)


def read_scalar_curves(tb_logdir: str | Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Scalars of every TensorBoard run under ``tb_logdir``: ``{run: {tag: (steps, values)}}``.

    A run is a folder holding ``events.out.tfevents.*`` files (``tb_logdir`` itself or any
    folder below it, e.g. Lightning's ``version_N``); its name is the path relative to
    ``tb_logdir`` ("." for ``tb_logdir`` itself).
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    root = Path(tb_logdir)
    runs: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for run_dir in sorted({path.parent for path in root.rglob("events.out.tfevents.*")}):
        accumulator = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
        accumulator.Reload()
        curves = {}
        for tag in accumulator.Tags().get(SCALARS, []):
            events = sorted(accumulator.Scalars(tag), key=lambda event: event.step)
            steps = np.array([event.step for event in events])
            curves[tag] = (steps, np.array([event.value for event in events], dtype=np.float64))
        runs[str(run_dir.relative_to(root))] = curves
    return runs


def curve_panels(all_tags: Sequence[str], curve_tags: Mapping[str, str] = DEFAULT_CURVE_TAGS, where: str = "the logs"
                 ) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The panels of the training-curves figure for the logged scalar tags ``all_tags``.

    Returns:
        ``(panels, notes)``: ``[(title, tags)]`` in order: one per tag of ``curve_tags`` that was logged,
        then toxicity tags (:data:`TOXICITY_TAG_PATTERN`), validation ROUGE-L and the monitors
        (``val/monitor/*``) when logged; one note per tag of ``curve_tags`` missing from ``where``.
    """
    panels: list[tuple[str, list[str]]] = []
    notes: list[str] = []
    for title, tag in curve_tags.items():
        if tag in all_tags:
            panels.append((title, [tag]))
        else:
            notes.append(f"training curves: tag '{tag}' ({title}) not found under {where}; panel skipped")
    monitor_tags = [tag for tag in all_tags if tag.startswith(MONITOR_TAG_PREFIX)]
    used = {tag for _, tags in panels for tag in tags} | set(monitor_tags)
    toxicity_tags = [tag for tag in all_tags if TOXICITY_TAG_PATTERN in tag.lower() and tag not in used]
    if toxicity_tags:  # optional: a run whose reward logs no toxicity tag has nothing to draw here
        panels.append(("toxicity", toxicity_tags))
    if VALIDATION_QUALITY_TAG in all_tags and VALIDATION_QUALITY_TAG not in used:
        panels.append(("validation ROUGE-L", [VALIDATION_QUALITY_TAG]))
    if monitor_tags:
        panels.append(("monitors (validation)", monitor_tags))
    return panels, notes


def plot_training_curves(
    tb_logdir: str | Path, path: Path, curve_tags: Mapping[str, str] = DEFAULT_CURVE_TAGS
) -> tuple[bool, list[str]]:
    """Draw reward, KL, toxicity and validation (ROUGE-L, monitors) curves read back from TensorBoard event files.

    Returns:
        ``(drawn, notes)``: whether ``path`` was written, and one note per missing tag of
        ``curve_tags`` (a missing tag skips its panel; with no tag at all no figure is
        written). The toxicity and validation panels are drawn only when their tags exist,
        without a note (:func:`curve_panels`). Every panel has axis labels (:data:`PANEL_UNITS`).
    """
    runs = read_scalar_curves(tb_logdir)
    if not runs:
        return False, [f"training curves: no TensorBoard event files under {tb_logdir}; figure skipped"]
    all_tags = sorted({tag for curves in runs.values() for tag in curves})
    panels, notes = curve_panels(all_tags, curve_tags, str(tb_logdir))
    if not panels:
        return False, notes + ["training curves: none of the tags were found; figure skipped"]
    figure = _new_figure(4.2 * len(panels), 3.4)
    for position, (title, tags) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        for run, curves in runs.items():
            for tag in tags:
                if tag in curves:
                    steps, values = curves[tag]
                    name = tag.removeprefix(MONITOR_TAG_PREFIX)  # a monitor by its name
                    label = name if len(runs) == 1 else f"{run}: {name}"
                    axes.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        axes.set_title(title)
        axes.set_xlabel("training iteration")
        axes.set_ylabel(PANEL_UNITS.get(title, title))
        axes.legend(fontsize="small")
    figure.tight_layout()
    _save_figure(figure, path)
    return True, notes


# ----------------------------------------------------------------------------- JSON helpers
def _jsonable(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy/torch scalars and arrays -> Python values."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_default(value: Any) -> Any:
    """numpy/torch values in extra row fields -> Python values; anything else -> str."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    return str(value)


def _save_figure(figure, path: Path) -> None:
    """``figure`` as a PNG at ``path``, written atomically."""
    with atomic_file(path, "wb") as handle:
        figure.savefig(handle, format="png")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line; rows hold validated (finite) numbers, so no NaN reaches the file."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


# ----------------------------------------------------------------------------- the report
def write_report(
    before_rows: Sequence[Mapping[str, Any]],
    after_rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    meta: Mapping[str, Any] | None = None,
    tb_logdir: str | Path | None = None,
    *,
    insult_vocabulary: Sequence[str] | None = None,
    min_fragment: int = 4,
    toxicity_threshold: float = 0.5,
    rouge_keys: Sequence[str] = DEFAULT_ROUGE_KEYS,
    rouge_lsum: bool | str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    curve_tags: Mapping[str, str] = DEFAULT_CURVE_TAGS,
) -> dict[str, Any]:
    """Evaluate both policies' samples, compare them with paired bootstrap CIs, write the report.

    Args:
        before_rows, after_rows: per-sample dicts (see the module docstring) for the reference
            and the trained policy, covering the same prompt ids.
        out_dir: created if needed; receives ``metrics.json``, ``report.md``,
            ``samples_before.jsonl``, ``samples_after.jsonl``, ``toxicity_hist.png`` and, with
            ``tb_logdir``, ``training_curves.png``.
        meta: run facts merged at the top level of ``metrics.json`` (e.g. ``n_test``,
            ``ppo_steps``, ``wall_s``, ``decoding`` = ``{"mode": "sampled", "seed": 0, ...}``,
            ``data`` = :meth:`flan_rlhf.data.SplitReport.as_dict` of the evaluated split, whose
            ``summary`` line ``report.md`` shows). ``n_test`` defaults to the number of prompts.
        tb_logdir: TensorBoard log folder whose reward/KL/toxicity scalars are drawn.
        insult_vocabulary: words whose presence (or >= ``min_fragment``-letter fragments)
            gives ``insult_fraction``; omitted when None.
        toxicity_threshold: a response with score >= threshold counts as toxic.
        rouge_keys, rouge_lsum: ROUGE keys; ``rougeLsum`` per
            :func:`flan_rlhf.eval.metrics.resolve_rouge_keys`.
        n_resamples, seed, confidence: paired bootstrap over prompts.
        curve_tags: TensorBoard tags to draw, ``{panel title: tag}``.
    Returns:
        The dict written to ``metrics.json``: ``before``/``after`` ({metric: value}),
        ``delta`` ({metric: {value, ci_low, ci_high}}), ``ci`` (each side's interval),
        counts, settings, ``notes``, ``files`` and the ``meta`` keys.
    """
    meta = dict(meta or {})
    clashes = sorted(set(meta) & set(_COMPUTED_KEYS))
    if clashes:
        raise ValueError(f"meta keys {clashes} clash with keys the report computes: rename them")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"meta is not JSON-serialisable ({err}): pass plain numbers, strings, lists and dicts"
        ) from err
    if tb_logdir is not None and not Path(tb_logdir).is_dir():
        raise FileNotFoundError(
            f"tb_logdir {tb_logdir} is not a folder: pass the TensorBoard log folder or None"
        )
    before = _prepare_rows(before_rows, "before")
    after = _prepare_rows(after_rows, "after")
    prompt_ids = _check_same_prompts(before, after)
    unit_of = {prompt_id: unit for unit, prompt_id in enumerate(prompt_ids)}
    keys = resolve_rouge_keys(rouge_keys, rouge_lsum)  # type: ignore[arg-type]

    sides = {
        name: _evaluate_side(rows, unit_of, name, keys, toxicity_threshold, insult_vocabulary, min_fragment)
        for name, rows in (("before", before), ("after", after))
    }
    delta, ci = {}, {"before": {}, "after": {}}
    for name in METRIC_ORDER:
        if name in sides["before"].statistics and name in sides["after"].statistics:
            result = paired_bootstrap_statistic(
                sides["before"].statistics[name], sides["after"].statistics[name], len(prompt_ids),
                n_resamples, seed, confidence,
            )
            delta[name] = result.delta.as_dict()
            ci["before"][name] = {"ci_low": result.before.ci_low, "ci_high": result.before.ci_high}
            ci["after"][name] = {"ci_low": result.after.ci_low, "ci_high": result.after.ci_high}

    for name in METRIC_ORDER:  # point-only metrics (distinct-n): the difference, no interval
        if name not in delta and name in sides["before"].summary and name in sides["after"].summary:
            delta[name] = {"value": sides["after"].summary[name] - sides["before"].summary[name],
                           "ci_low": None, "ci_high": None}
    samples = sorted({
        count for rows in (before, after) for count in Counter(row["prompt_id"] for row in rows).values()
    })
    samples_per_prompt: Any = samples[0] if len(samples) == 1 else {"min": samples[0], "max": samples[-1]}
    with_references = "bleu" in sides["before"].summary
    notes = [
        "ROUGE takes the best-matching reference per sample (torchmetrics accumulate='best').",
        "BLEU is corpus-level (n-gram statistics summed over all responses), 0-1 scale. sacrebleu (13a tokens, "
        "punctuation split off) is the figure papers report; bleu splits on spaces only, so 'park.' and 'park' "
        "differ and it sits lower on real text.",
    ] if with_references else ["No references: ROUGE and BLEU are not computed."]
    notes += [
        f"Intervals: paired percentile bootstrap over prompts, {n_resamples} resamples, seed {seed}.",
        "distinct-n has no interval: resampled corpora repeat n-grams, which biases it low.",
    ]
    if "rougeLsum" in keys and with_references:
        notes.append(
            "rougeLsum splits sentences with nltk punkt_tab (when nltk has no trained one, the package's "
            "own with an English abbreviation list)."
        )
    for name in sorted(set(sides["before"].summary) ^ set(sides["after"].summary)):
        notes.append(f"{name} is only available for one side; no delta.")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": "metrics.json", "report": "report.md", "samples_before": "samples_before.jsonl",
             "samples_after": "samples_after.jsonl", "toxicity_hist": "toxicity_hist.png"}
    for name, rows in (("before", before), ("after", after)):
        extra = sides[name].per_sample
        _write_jsonl(out / f"samples_{name}.jsonl", [
            {**row, **{key: (int(values[i]) if key in ("toxic", "insult") else float(values[i]))
                       for key, values in extra.items()}}
            for i, row in enumerate(rows)
        ])
    plot_toxicity_histogram(
        np.array([row["toxicity"] for row in before]), np.array([row["toxicity"] for row in after]),
        toxicity_threshold, out / files["toxicity_hist"],
    )
    if tb_logdir is not None:
        drawn, curve_notes = plot_training_curves(tb_logdir, out / "training_curves.png", curve_tags)
        notes.extend(curve_notes)
        if drawn:
            files["training_curves"] = "training_curves.png"

    metrics: dict[str, Any] = {
        "n_test": len(prompt_ids),
        **meta,
        "before": sides["before"].summary,
        "after": sides["after"].summary,
        "delta": delta,
        "ci": ci,
        "n_prompts": len(prompt_ids),
        "n_responses": {"before": len(before), "after": len(after)},
        "samples_per_prompt": samples_per_prompt,
        "toxicity_threshold": toxicity_threshold,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "confidence": confidence, "unit": "prompt",
                      "method": "paired percentile"},
        "notes": notes,
        "files": files,
    }
    metrics = _jsonable(metrics)
    metrics_text = json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"
    with atomic_file(out / files["metrics"]) as handle:
        handle.write(metrics_text)
    with atomic_file(out / files["report"]) as handle:
        handle.write(_markdown_report(metrics, meta))
    return metrics


def _markdown_report(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    n_responses = metrics["n_responses"]
    lines = [
        "# Before/after evaluation",
        "",
        decoding_line(meta.get("decoding"), metrics["samples_per_prompt"]),
        "",
        f"Prompts: {metrics['n_prompts']}; responses: {n_responses['before']} before, "
        f"{n_responses['after']} after; a response is toxic when its score is "
        f">= {metrics['toxicity_threshold']:g}. "
        "↓ lower is better, ↑ higher is better.",
        "",
        markdown_table(metrics),
        "",
    ]
    data = meta.get("data")
    if isinstance(data, Mapping) and "summary" in data:
        lines += [f"Data: {data['summary']}", ""]
    other_meta = {key: value for key, value in meta.items() if key not in ("decoding", "data")}
    if other_meta:
        lines += ["Run: " + ", ".join(f"{key} = {value}" for key, value in other_meta.items()), ""]
    lines += ["Notes:", *[f"- {note}" for note in metrics["notes"]], ""]
    files = metrics["files"]
    lines.append(f"![toxicity histogram]({files['toxicity_hist']})")
    if "training_curves" in files:
        lines.append(f"![training curves]({files['training_curves']})")
    return "\n".join(lines) + "\n"
