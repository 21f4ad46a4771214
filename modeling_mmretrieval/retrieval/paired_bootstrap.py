"""Paired bootstrap confidence intervals for the difference between two retrievers on the same queries.

Two models evaluated on the same queries give paired per-query values (e.g. nDCG@10). Resampling the
queries with replacement, and taking the mean difference of each resample, gives the sampling distribution
of the mean difference; its 2.5th and 97.5th percentiles bound a 95% interval. An interval above zero says
the first model is better on queries drawn like these, not merely on this query set. With several training
seeds, each query's value is first averaged over the seeds of its model, so the interval covers the query
sample and the seed average together (Koehn 2004; Sakai 2006).

Example:
```python
>>> first = {"q1": 0.9, "q2": 0.7, "q3": 0.8, "q4": 0.6, "q5": 0.9}
>>> second = {"q1": 0.6, "q2": 0.7, "q3": 0.5, "q4": 0.5, "q5": 0.7}
>>> interval = paired_bootstrap(first, second, seed=0)
>>> round(interval.mean_difference, 3), interval.excludes_zero
(0.18, True)
```
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class BootstrapInterval:
    """Mean of `first - second` over the paired queries, with its bootstrap interval at `confidence`."""

    mean_difference: float
    low: float
    high: float
    num_queries: int
    confidence: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def relative_to(self, baseline_mean: float) -> float:
        """The mean difference as a share of the baseline's mean (e.g. +0.25 for +25%)."""
        return self.mean_difference / baseline_mean if baseline_mean else float("nan")

    def __str__(self) -> str:
        return f"{self.mean_difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def mean_over_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-query values averaged over the runs of one model (the queries every run evaluated)."""
    if not per_seed:
        raise ValueError("no runs to average")
    shared = set(per_seed[0]).intersection(*per_seed[1:])
    return {query: float(np.mean([run[query] for run in per_seed])) for query in sorted(shared)}


def paired_bootstrap(
    first: Mapping[str, float],
    second: Mapping[str, float],
    *,
    num_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapInterval:
    """The paired bootstrap interval of `mean(first[q] - second[q])` over the queries both evaluated.

    Raises `ValueError` when the two share no query (they were not evaluated on the same queries).
    """
    queries = sorted(set(first) & set(second))
    if not queries:
        raise ValueError("the two runs share no query: a paired comparison needs the same queries")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    differences = np.array([first[query] - second[query] for query in queries], dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled = rng.integers(0, len(differences), size=(num_resamples, len(differences)))
    means = differences[resampled].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return BootstrapInterval(float(differences.mean()), float(low), float(high), len(queries), confidence)


__all__ = ["BootstrapInterval", "mean_over_seeds", "paired_bootstrap"]
