"""Paired bootstrap confidence intervals for before/after comparisons.

The unit of resampling is the prompt: both policies answered the same prompts, so one
resample draws ``n`` prompt indices with replacement and evaluates *both* sides on them
(paired; Koehn 2004, "Statistical significance tests for machine translation evaluation").
Intervals are percentile intervals (Efron & Tibshirani 1993, ch. 13) over ``n_resamples``
resamples drawn with a seeded ``numpy.random.Generator``, so a report is reproducible.

Two entry points:

* :func:`paired_bootstrap` for a per-prompt value whose statistic is the mean
  (e.g. the per-prompt max toxicity -> Expected Maximum Toxicity).
* :func:`paired_bootstrap_statistic` for any statistic of a set of resampled prompt indices,
  vectorised over resamples: ``statistic(indices (R, n)) -> (R,)``. Use it for ratios of
  sums (:func:`ratio_statistic`: a mean over responses when prompts have different numbers
  of samples) and corpus-level metrics such as BLEU (sum the per-prompt sufficient
  statistics over the drawn indices, then compute BLEU once per resample).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

#: ``statistic(indices) -> values``: indices is an int array ``(R, n)`` of resampled unit
#: (prompt) indices, one row per resample; the result holds one value per row, shape ``(R,)``.
Statistic = Callable[[np.ndarray], np.ndarray]

#: Resamples evaluated per call of a statistic, bounding memory at about chunk * n * width.
RESAMPLE_CHUNK = 128


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile confidence interval."""

    value: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def width(self) -> float:
        return self.ci_high - self.ci_low


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Each side's statistic and the difference ``after - before``, each with its interval."""

    before: Interval
    after: Interval
    delta: Interval

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {"before": self.before.as_dict(), "after": self.after.as_dict(), "delta": self.delta.as_dict()}


def _check_settings(n_units: int, n_resamples: int, confidence: float) -> None:
    if n_units < 1:
        raise ValueError("bootstrap over no prompts: pass at least one per-prompt value")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: use at least 1 (1000 is the default)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: use a level strictly between 0 and 1, e.g. 0.95")


def bootstrap_indices(n_units: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Resampled unit indices with replacement, int64 ``(n_resamples, n_units)``, seeded."""
    _check_settings(n_units, n_resamples, 0.5)
    return np.random.default_rng(seed).integers(0, n_units, size=(n_resamples, n_units))


def index_counts(indices: np.ndarray, n_units: int) -> np.ndarray:
    """How often each unit was drawn in each resample: ``(R, n)`` indices -> ``(R, n_units)`` counts."""
    indices = np.asarray(indices)
    rows = indices.shape[0]
    flat = (indices + np.arange(rows)[:, None] * n_units).ravel()
    return np.bincount(flat, minlength=rows * n_units).reshape(rows, n_units)


def mean_statistic(values: np.ndarray) -> Statistic:
    """The mean of per-unit ``values`` ``(n,)`` over the drawn units."""
    values = np.asarray(values, dtype=np.float64)
    return lambda indices: values[indices].mean(axis=1)


def ratio_statistic(numerators: np.ndarray, denominators: np.ndarray) -> Statistic:
    """``sum(numerators[drawn]) / sum(denominators[drawn])``.

    With per-prompt sums of a per-response value and per-prompt response counts this is the
    mean over responses of the resampled prompts, exact for unequal samples per prompt.
    """
    numerators = np.asarray(numerators, dtype=np.float64)
    denominators = np.asarray(denominators, dtype=np.float64)
    if numerators.shape != denominators.shape:
        raise ValueError(
            f"ratio statistic: numerators {numerators.shape} vs denominators {denominators.shape}: "
            "pass one numerator and one denominator per unit"
        )
    return lambda indices: numerators[indices].sum(axis=1) / denominators[indices].sum(axis=1)


def _evaluate(statistic: Statistic, indices: np.ndarray) -> np.ndarray:
    values = np.asarray(statistic(indices), dtype=np.float64).reshape(-1)
    if values.shape[0] != indices.shape[0]:
        raise ValueError(
            f"statistic returned {values.shape[0]} values for {indices.shape[0]} resamples: "
            "return one value per row"
        )
    return values


def _interval(point: float, samples: np.ndarray, confidence: float) -> Interval:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return Interval(float(point), float(low), float(high))


def paired_bootstrap_statistic(
    statistic_before: Statistic,
    statistic_after: Statistic,
    n_units: int,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Paired percentile bootstrap of two statistics over the same resampled units.

    Args:
        statistic_before, statistic_after: :data:`Statistic` functions, vectorised over rows.
        n_units: number of units (prompts) ``n``; both statistics index the same units.
        n_resamples: resamples ``R``; seed: the generator's seed; confidence: e.g. 0.95.
    Returns:
        Point estimates on all units (``indices = arange(n)``) with percentile intervals; the
        delta is ``after - before`` computed on each resample.
    """
    _check_settings(n_units, n_resamples, confidence)
    identity = np.arange(n_units)[None, :]
    point_before = _evaluate(statistic_before, identity)[0]
    point_after = _evaluate(statistic_after, identity)[0]
    rng = np.random.default_rng(seed)
    before_samples, after_samples = [], []
    for start in range(0, n_resamples, RESAMPLE_CHUNK):
        indices = rng.integers(0, n_units, size=(min(RESAMPLE_CHUNK, n_resamples - start), n_units))
        before_samples.append(_evaluate(statistic_before, indices))
        after_samples.append(_evaluate(statistic_after, indices))
    before_values, after_values = np.concatenate(before_samples), np.concatenate(after_samples)
    return PairedBootstrapResult(
        before=_interval(point_before, before_values, confidence),
        after=_interval(point_after, after_values, confidence),
        delta=_interval(point_after - point_before, after_values - before_values, confidence),
    )


def paired_bootstrap(
    before: np.ndarray,
    after: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedBootstrapResult:
    """Paired bootstrap of the mean of per-prompt values.

    Args:
        before, after: per-prompt values ``(n,)`` for the same prompts in the same order.
    Returns:
        mean(before), mean(after) and mean(after) - mean(before), with percentile intervals.
    """
    before = np.asarray(before, dtype=np.float64).reshape(-1)
    after = np.asarray(after, dtype=np.float64).reshape(-1)
    if before.shape != after.shape:
        raise ValueError(
            f"paired bootstrap needs the same prompts on both sides: got {before.size} before and "
            f"{after.size} after values"
        )
    return paired_bootstrap_statistic(
        mean_statistic(before), mean_statistic(after), before.size, n_resamples, seed, confidence
    )
