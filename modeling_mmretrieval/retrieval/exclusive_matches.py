"""Exclusive-match analysis: which products does one model retrieve in its top k that the other misses?

Following Liu & Lopez Ramos (arXiv:2501.07365), the products in the multimodal model's top k that are absent
from the text-only model's top k show what images add to retrieval; checking how many of them are relevant tells
whether that extra recall is useful. The opposite direction (text-only exclusives) comes at no extra cost.
"""

import math
from dataclasses import dataclass

from .metrics import Qrels, Run, normalize_qrels, normalize_run


def _products_missing_from(ranking: list, other_ranking: list, k: int) -> list:
    """Products of ``ranking[:k]`` absent from ``other_ranking[:k]``, in the order of ``ranking``."""
    other_top_k = set(other_ranking[:k])
    return [product_id for product_id in ranking[:k] if product_id not in other_top_k]


def _check_same_queries(multimodal_run: dict, text_run: dict) -> None:
    if not multimodal_run and not text_run:
        raise ValueError("Both runs are empty: there is no query to compare.")
    only_multimodal = [query_id for query_id in multimodal_run if query_id not in text_run]
    only_text = [query_id for query_id in text_run if query_id not in multimodal_run]
    if only_multimodal or only_text:
        raise ValueError(
            "Both runs must rank the same queries; "
            f"{len(only_multimodal)} only in multimodal_run (e.g. {only_multimodal[:3]!r}), "
            f"{len(only_text)} only in text_run (e.g. {only_text[:3]!r})."
        )


@dataclass(frozen=True)
class ExclusiveMatches:
    """Products one model retrieves in its top k and the other does not, per query.

    Attributes:
        per_query: ``query_id -> [product_id, ...]`` exclusive products, in the retrieving model's rank order.
        relevant_per_query: the relevant subset of :attr:`per_query` (``None`` when no qrels were given).
    """

    per_query: dict
    relevant_per_query: dict | None = None

    @property
    def total(self) -> int:
        return sum(len(product_ids) for product_ids in self.per_query.values())

    @property
    def mean_per_query(self) -> float:
        return self.total / len(self.per_query) if self.per_query else math.nan

    @property
    def num_relevant(self) -> int | None:
        if self.relevant_per_query is None:
            return None
        return sum(len(product_ids) for product_ids in self.relevant_per_query.values())

    @property
    def relevant_share(self) -> float | None:
        """Fraction of exclusive products that are relevant; NaN when there is no exclusive product at all."""
        if self.relevant_per_query is None:
            return None
        return self.num_relevant / self.total if self.total else math.nan

    def summary(self) -> dict:
        summary = {"total": self.total, "mean_per_query": self.mean_per_query}
        if self.relevant_per_query is not None:
            summary.update(num_relevant=self.num_relevant, relevant_share=self.relevant_share)
        return summary


def _exclusive_matches_of(rankings: dict, other_rankings: dict, k: int, judgements: dict | None) -> ExclusiveMatches:
    """Exclusive matches of ``rankings`` against ``other_rankings``, split by relevance when judgements exist."""
    per_query = {
        query_id: _products_missing_from(ranking, other_rankings[query_id], k)
        for query_id, ranking in rankings.items()
    }
    if judgements is None:
        return ExclusiveMatches(per_query)
    relevant_per_query = {
        query_id: [product_id for product_id in product_ids if judgements.get(query_id, {}).get(product_id, 0) > 0]
        for query_id, product_ids in per_query.items()
    }
    return ExclusiveMatches(per_query, relevant_per_query)


@dataclass(frozen=True)
class ExclusiveMatchReport:
    """Exclusive matches of a multimodal and a text-only run over the same queries.

    Attributes:
        k: the rank cutoff both top-k lists were cut at.
        multimodal_exclusive: products in the multimodal top k missing from the text-only top k.
        text_exclusive: products in the text-only top k missing from the multimodal top k.
    """

    k: int
    multimodal_exclusive: ExclusiveMatches
    text_exclusive: ExclusiveMatches

    @property
    def num_queries(self) -> int:
        return len(self.multimodal_exclusive.per_query)

    def summary(self) -> dict:
        """Flat dict such as ``{"k": 100, "num_queries": 50, "multimodal_exclusive/total": 812, ...}``."""
        summary = {"k": self.k, "num_queries": self.num_queries}
        for direction in ("multimodal_exclusive", "text_exclusive"):
            for name, value in getattr(self, direction).summary().items():
                summary[f"{direction}/{name}"] = value
        return summary

    def __str__(self) -> str:
        lines = [f"Exclusive matches in the top {self.k} over {self.num_queries} queries"]
        for label, matches in (("multimodal only", self.multimodal_exclusive), ("text only", self.text_exclusive)):
            line = f"  {label:<15}: {matches.total} products, {matches.mean_per_query:.2f} per query"
            if matches.relevant_per_query is not None:
                line += f", {matches.num_relevant} relevant ({matches.relevant_share:.1%})"
            lines.append(line)
        return "\n".join(lines)


def exclusive_matches(
    multimodal_run: Run, text_run: Run, qrels: Qrels | None = None, k: int = 100
) -> ExclusiveMatchReport:
    """Compare the top-k products of a multimodal and a text-only run, query by query.

    Args:
        multimodal_run: ``query_id -> ranked product ids`` (or ``{product_id: score}``) of the multimodal model.
        text_run: the same for the text-only model; it must rank the same queries.
        qrels: optional relevance judgements (``query_id -> {product_id: grade}`` or a set of relevant ids).
            A product is relevant when its grade is ``> 0``; unjudged products and queries count as non-relevant.
        k: rank cutoff applied to both runs.

    Returns:
        `ExclusiveMatchReport`.

    Example:

    ```python
    >>> report = exclusive_matches(
    ...     {"q1": ["red-dress", "blue-dress", "red-skirt"]},
    ...     {"q1": ["blue-dress", "red-shirt", "red-dress"]},
    ...     qrels={"q1": {"red-dress", "red-skirt"}},
    ...     k=2,
    ... )
    >>> report.multimodal_exclusive.per_query, report.multimodal_exclusive.relevant_share
    ({'q1': ['red-dress']}, 1.0)
    ```
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    multimodal_rankings = normalize_run(multimodal_run)
    text_rankings = normalize_run(text_run)
    _check_same_queries(multimodal_rankings, text_rankings)
    judgements = normalize_qrels(qrels) if qrels is not None else None

    return ExclusiveMatchReport(
        k=k,
        multimodal_exclusive=_exclusive_matches_of(multimodal_rankings, text_rankings, k, judgements),
        text_exclusive=_exclusive_matches_of(text_rankings, multimodal_rankings, k, judgements),
    )
