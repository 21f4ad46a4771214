"""Ranked-retrieval metrics for query -> product search.

All metrics are computed per query and then averaged (macro average) over the evaluated queries.

Conventions (they matter when comparing numbers across papers and tools):

* **Run.** ``run[query_id]`` is either a ranked sequence of product ids (best first) or a mapping
  ``product_id -> score``. Scores are ranked highest first; equal scores are ordered by ascending
  product id so results never depend on dict order. A product may appear only once in a ranking.
* **Qrels.** ``qrels[query_id]`` is either a mapping ``product_id -> grade`` (graded relevance, grades are
  non-negative numbers, ``0`` meaning judged non-relevant) or a collection of product ids (binary
  relevance, every listed product has grade ``1``). Products absent from the judgements are non-relevant.
* **Binary metrics** (recall, precision, MRR, MAP, hit rate) treat every grade ``> 0`` as relevant.
* **nDCG** uses the grades as gains (``gain="linear"``, as trec_eval does) or ``2**grade - 1``
  (``gain="exponential"``) with the ``1 / log2(rank + 1)`` discount. The ideal DCG is built from *all*
  judgements of the query, not only the retrieved products, so a run that misses relevant products is
  penalised.
* **Precision@k** divides by ``k`` even when fewer than ``k`` products were retrieved.
* **MAP** sums precision at the rank of each relevant retrieved product and divides by the total number of
  relevant products; ``map@k`` only looks at the first ``k`` ranks, ``map`` at the whole ranking.
* **Queries.** The evaluated queries are the queries of ``qrels`` with at least one relevant product.
  Queries whose judgements are all non-relevant are skipped (every metric would be undefined or zero) and
  reported in :attr:`RetrievalEvaluation.skipped_query_ids`. Queries of ``qrels`` missing from ``run`` count
  as an empty ranking (all metrics ``0``) and are reported in :attr:`RetrievalEvaluation.missing_query_ids`.
  Queries of ``run`` that have no judgements are ignored and reported in
  :attr:`RetrievalEvaluation.unjudged_query_ids`.
"""

import logging
import math
from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


logger = logging.getLogger(__name__)

QueryId = Hashable
ProductId = Hashable
Ranking = Sequence[ProductId] | Mapping[ProductId, float]
Run = Mapping[QueryId, Ranking]
Judgements = Mapping[ProductId, float] | Collection[ProductId]
Qrels = Mapping[QueryId, Judgements]
Gain = Literal["linear", "exponential"]

METRIC_NAMES = ("recall", "precision", "ndcg", "mrr", "map", "hit_rate")
DEFAULT_K_VALUES = (10, 100)


# ---------------------------------------------------------------------------------------------------------------
# Input normalisation
# ---------------------------------------------------------------------------------------------------------------


def _is_real_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and not math.isnan(value)


def rank_by_score(scores: Mapping[ProductId, float], query_id: QueryId = None) -> list:
    """Order products by descending score, breaking ties by ascending product id.

    Example:

    ```python
    >>> rank_by_score({"p2": 0.5, "p1": 0.5, "p3": 0.9})
    ['p3', 'p1', 'p2']
    ```
    """
    for product_id, score in scores.items():
        if not _is_real_number(score):
            raise ValueError(
                f"Score of product {product_id!r} for query {query_id!r} must be a real number, got {score!r}."
            )
    try:
        return sorted(scores, key=lambda product_id: (-float(scores[product_id]), product_id))
    except TypeError as error:
        raise TypeError(
            f"Product ids of query {query_id!r} cannot be ordered against each other ({error}); use ids of a "
            "single type (all str or all int) so score ties can be broken deterministically."
        ) from None


def normalize_ranking(ranking: Ranking, query_id: QueryId = None) -> list:
    """Turn a ranked sequence or a ``product_id -> score`` mapping into a ranked list of product ids.

    Raises `ValueError` when a product id appears twice, since a duplicated product would be counted as
    several hits.
    """
    if isinstance(ranking, Mapping):
        return rank_by_score(ranking, query_id)
    if isinstance(ranking, (str, bytes)) or not isinstance(ranking, (Sequence, np.ndarray)):
        raise TypeError(
            f"Ranking of query {query_id!r} must be a sequence of product ids or a product_id -> score mapping, "
            f"got {type(ranking).__name__}."
        )
    product_ids = ranking.tolist() if isinstance(ranking, np.ndarray) else list(ranking)
    if len(set(product_ids)) != len(product_ids):
        duplicates = [product_id for product_id, count in Counter(product_ids).items() if count > 1]
        raise ValueError(f"Ranking of query {query_id!r} lists some products more than once: {duplicates[:5]!r}.")
    return product_ids


def normalize_run(run: Run) -> dict:
    """Return ``{query_id: [product_id, ...]}`` with every ranking validated and ordered best first."""
    if not isinstance(run, Mapping):
        raise TypeError(f"run must be a mapping query_id -> ranking, got {type(run).__name__}.")
    return {query_id: normalize_ranking(ranking, query_id) for query_id, ranking in run.items()}


def normalize_judgements(judgements: Judgements, query_id: QueryId = None) -> dict:
    """Return ``{product_id: grade}``; a plain collection of product ids means grade 1 for each."""
    if isinstance(judgements, Mapping):
        for product_id, grade in judgements.items():
            if not _is_real_number(grade) or grade < 0:
                raise ValueError(
                    f"Relevance grade of product {product_id!r} for query {query_id!r} must be a non-negative "
                    f"number, got {grade!r}."
                )
        return {product_id: float(grade) for product_id, grade in judgements.items()}
    if isinstance(judgements, (str, bytes)) or not isinstance(judgements, (Collection, np.ndarray)):
        raise TypeError(
            f"Judgements of query {query_id!r} must be a product_id -> grade mapping or a collection of relevant "
            f"product ids, got {type(judgements).__name__}."
        )
    product_ids = judgements.tolist() if isinstance(judgements, np.ndarray) else judgements
    return dict.fromkeys(product_ids, 1.0)


def normalize_qrels(qrels: Qrels) -> dict:
    """Return ``{query_id: {product_id: grade}}`` from graded or binary relevance judgements."""
    if not isinstance(qrels, Mapping):
        raise TypeError(f"qrels must be a mapping query_id -> judgements, got {type(qrels).__name__}.")
    if len(qrels) == 0:
        raise ValueError("qrels is empty: there is nothing to evaluate against.")
    return {query_id: normalize_judgements(judgements, query_id) for query_id, judgements in qrels.items()}


def _validate_k_values(k_values: Iterable[int]) -> tuple:
    k_values = tuple(k_values)
    if len(k_values) == 0:
        raise ValueError("k_values must contain at least one cutoff.")
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"Every cutoff in k_values must be a positive integer, got {k!r}.")
    return tuple(sorted(set(int(k) for k in k_values)))


def _validate_gain(gain: str) -> str:
    if gain not in ("linear", "exponential"):
        raise ValueError(f"gain must be 'linear' or 'exponential', got {gain!r}.")
    return gain


def _validate_metric_names(metrics: Iterable[str] | None) -> tuple:
    if metrics is None:
        return METRIC_NAMES
    metrics = tuple(metrics)
    unknown = [name for name in metrics if name not in METRIC_NAMES]
    if unknown or len(metrics) == 0:
        raise ValueError(f"Unknown or missing metric names {unknown!r}; choose among {METRIC_NAMES}.")
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Per-query metrics
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgedRanking:
    """One query's ranking joined with its judgements: the inputs every metric below needs."""

    ranked_grades: np.ndarray  # grade of the product at each rank (0 when unjudged)
    ideal_grades: np.ndarray  # all positive grades of the query, best first
    gain: Gain = "linear"

    @classmethod
    def from_ranking(
        cls, ranking: Sequence[ProductId], judgements: Mapping[ProductId, float], gain: Gain = "linear"
    ) -> "JudgedRanking":
        _validate_gain(gain)
        ranked_grades = np.array([judgements.get(product_id, 0.0) for product_id in ranking], dtype=np.float64)
        ideal_grades = np.sort(np.array([grade for grade in judgements.values() if grade > 0], dtype=np.float64))[::-1]
        return cls(ranked_grades=ranked_grades, ideal_grades=ideal_grades, gain=gain)

    @property
    def is_relevant(self) -> np.ndarray:
        return self.ranked_grades > 0

    @property
    def num_relevant(self) -> int:
        return len(self.ideal_grades)


def _gains(grades: np.ndarray, gain: Gain) -> np.ndarray:
    return np.exp2(grades) - 1.0 if gain == "exponential" else grades


def _discounted_cumulative_gain(gains: np.ndarray) -> float:
    # rank r (1-based) is discounted by log2(r + 1)
    return float(np.sum(gains / np.log2(np.arange(2, len(gains) + 2))))


def recall_at_k(judged: JudgedRanking, k: int) -> float:
    return float(judged.is_relevant[:k].sum()) / judged.num_relevant


def precision_at_k(judged: JudgedRanking, k: int) -> float:
    return float(judged.is_relevant[:k].sum()) / k


def hit_rate_at_k(judged: JudgedRanking, k: int) -> float:
    return float(judged.is_relevant[:k].any())


def reciprocal_rank_at_k(judged: JudgedRanking, k: int) -> float:
    hit_ranks = np.flatnonzero(judged.is_relevant[:k])
    return 1.0 / float(hit_ranks[0] + 1) if len(hit_ranks) else 0.0


def average_precision_at_k(judged: JudgedRanking, k: int | None = None) -> float:
    """Average precision over all relevant products; only the first ``k`` ranks count when ``k`` is given."""
    hits = judged.is_relevant[:k]
    precision_at_each_rank = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at_each_rank[hits].sum()) / judged.num_relevant


def ndcg_at_k(judged: JudgedRanking, k: int) -> float:
    ideal_dcg = _discounted_cumulative_gain(_gains(judged.ideal_grades[:k], judged.gain))
    return _discounted_cumulative_gain(_gains(judged.ranked_grades[:k], judged.gain)) / ideal_dcg


_METRIC_FUNCTIONS = {
    "recall": recall_at_k,
    "precision": precision_at_k,
    "ndcg": ndcg_at_k,
    "mrr": reciprocal_rank_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_rate_at_k,
}


def _metric_cutoffs(metrics: tuple, k_values: tuple) -> dict:
    """Map each output name ("ndcg@10", "map", ...) to its metric function and cutoff."""
    cutoffs = {f"{name}@{k}": (_METRIC_FUNCTIONS[name], k) for name in metrics for k in k_values}
    if "map" in metrics:
        # classical MAP reads the whole ranking
        cutoffs["map"] = (average_precision_at_k, None)
    return cutoffs


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalEvaluation:
    """Metric means and per-query values of one run, with the bookkeeping of which queries were evaluated.

    Attributes:
        means: metric name (e.g. ``"ndcg@10"``) -> mean over :attr:`evaluated_query_ids`.
        per_query: metric name -> ``{query_id: value}``.
        evaluated_query_ids: queries with at least one relevant product, in ``qrels`` order.
        skipped_query_ids: queries of ``qrels`` with no relevant product (left out of the means).
        missing_query_ids: evaluated queries absent from the run (scored as an empty ranking).
        unjudged_query_ids: queries of the run absent from ``qrels`` (ignored).
    """

    means: dict
    per_query: dict
    evaluated_query_ids: list
    skipped_query_ids: list = field(default_factory=list)
    missing_query_ids: list = field(default_factory=list)
    unjudged_query_ids: list = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return len(self.evaluated_query_ids)


def evaluate_run(
    run: Run,
    qrels: Qrels,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    metrics: Iterable[str] | None = None,
    gain: Gain = "linear",
) -> RetrievalEvaluation:
    """Evaluate a ranked run against relevance judgements, keeping per-query values.

    Args:
        run: ``query_id -> ranked product ids`` or ``query_id -> {product_id: score}``.
        qrels: ``query_id -> {product_id: grade}`` or ``query_id -> set of relevant product ids``.
        k_values: rank cutoffs; every metric is reported at each of them.
        metrics: subset of ``METRIC_NAMES`` to compute (all by default).
        gain: ``"linear"`` (grade) or ``"exponential"`` (``2**grade - 1``) gains for nDCG.

    Example:

    ```python
    >>> evaluation = evaluate_run({"q1": ["p3", "p1", "p2"]}, {"q1": {"p1": 2, "p2": 1}}, k_values=[2])
    >>> evaluation.means["recall@2"], evaluation.per_query["mrr@2"]
    (0.5, {'q1': 0.5})
    ```
    """
    cutoffs = _metric_cutoffs(_validate_metric_names(metrics), _validate_k_values(k_values))
    _validate_gain(gain)
    rankings = normalize_run(run)
    judgements = normalize_qrels(qrels)

    evaluated = [query_id for query_id, grades in judgements.items() if any(grade > 0 for grade in grades.values())]
    evaluated_set = set(evaluated)
    skipped = [query_id for query_id in judgements if query_id not in evaluated_set]
    missing = [query_id for query_id in evaluated if query_id not in rankings]
    unjudged = [query_id for query_id in rankings if query_id not in judgements]
    if not evaluated:
        raise ValueError(f"None of the {len(judgements)} queries in qrels has a relevant product (grade > 0).")
    if skipped:
        logger.warning(f"Skipping {len(skipped)} queries without any relevant product, e.g. {skipped[:3]!r}.")
    if missing:
        logger.warning(f"{len(missing)} judged queries are missing from the run and score 0, e.g. {missing[:3]!r}.")

    per_query = {name: {} for name in cutoffs}
    for query_id in evaluated:
        judged = JudgedRanking.from_ranking(rankings.get(query_id, []), judgements[query_id], gain)
        for name, (metric_function, k) in cutoffs.items():
            per_query[name][query_id] = metric_function(judged, k)
    means = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    return RetrievalEvaluation(
        means=means,
        per_query=per_query,
        evaluated_query_ids=evaluated,
        skipped_query_ids=skipped,
        missing_query_ids=missing,
        unjudged_query_ids=unjudged,
    )


def compute_retrieval_metrics(
    run: Run,
    qrels: Qrels,
    k_values: Iterable[int] = DEFAULT_K_VALUES,
    metrics: Iterable[str] | None = None,
    gain: Gain = "linear",
) -> dict:
    """Mean retrieval metrics of a run, e.g. ``{"recall@10": ..., "ndcg@10": ..., "mrr@10": ..., "map": ...}``.

    See :func:`evaluate_run` for the arguments, and for per-query values and the list of skipped queries.

    Example:

    ```python
    >>> run = {"q1": {"p1": 0.9, "p2": 0.1, "p3": 0.5}, "q2": ["p4", "p5"]}
    >>> qrels = {"q1": {"p1"}, "q2": {"p5": 1, "p6": 1}}
    >>> metrics = compute_retrieval_metrics(run, qrels, k_values=[1])
    >>> metrics["recall@1"], metrics["mrr@1"], metrics["map"]
    (0.5, 0.5, 0.625)
    ```
    """
    return evaluate_run(run, qrels, k_values=k_values, metrics=metrics, gain=gain).means

