"""Hybrid ranking: the dense (model) ranking and the lexical (BM25) ranking of a catalogue, fused.

The two signals disagree usefully: BM25 finds exact brand names, colours and model numbers a model may blur,
the model finds synonyms and, with images, what no text says. `ProductRanker` ranks with either alone or with
both fused, inside the same filters (`allowed`), over one `ProductIndex` and one `LexicalIndex` built once.

Fusions (`Fusion.method`):

- `"rrf"`, reciprocal rank fusion (Cormack et al., 2009): a product scores `sum over rankers of
  1 / (rrf_k + rank)`, its 1-based rank in each ranker's top `depth` list (nothing from a list it is not in).
  It reads ranks only, so it needs no calibration between the rankers' scores; `rrf_k` (default 60, the
  paper's value) damps the weight of the very first ranks.
- `"score"`, normalised score fusion: each candidate (the union of both rankers' top `depth` lists) gets its
  dense cosine score and its BM25 score; each is normalised per query over the candidates, by min-max scaling to
  [0, 1] (`normalisation="minmax"`) or to zero mean and unit variance (`"zscore"`); the fused score is
  `alpha * dense + (1 - alpha) * lexical`. A ranker whose candidates all score the same contributes 0.

Only products that share a word with the query enter the lexical list. Fused results are ordered by fused
score, ties broken by catalogue (row) order.

Example:
```python
>>> ranker = ProductRanker(index, LexicalIndex.from_products(products, ("title", "brand", "description")),
...                        ranker="hybrid", fusion=Fusion("rrf"))
>>> embed = lambda texts: embed_queries(model, processor, texts)
>>> scores, ids = ranker.search(["red nike running shoes"], k=10, embed=embed, allowed=table.allowed(product_filter))
```
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .index import ProductIndex
from .lexical import LexicalIndex

RANKERS = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "score")
NORMALISATIONS = ("minmax", "zscore")
DEFAULT_RRF_K = 60
DEFAULT_ALPHA = 0.5
# Candidates taken from each ranker before fusing (at least the k asked for).
DEFAULT_DEPTH = 100


@dataclass(frozen=True)
class Fusion:
    """How `ProductRanker` fuses the dense and lexical rankings (see the module docstring).

    Args:
        method: `"rrf"` (reciprocal rank fusion) or `"score"` (normalised score fusion).
        rrf_k: the rank offset of reciprocal rank fusion.
        alpha: the dense ranker's weight in score fusion, in [0, 1] (the lexical one's is `1 - alpha`).
        normalisation: `"minmax"` or `"zscore"`, per query, for score fusion.
        depth: candidates taken from each ranker (raised to k when k is larger).

    Example:
    ```python
    >>> Fusion("score", alpha=0.7, normalisation="zscore").describe()
    'score fusion (zscore, alpha=0.7 dense), depth 100'
    ```
    """

    method: str = "rrf"
    rrf_k: float = DEFAULT_RRF_K
    alpha: float = DEFAULT_ALPHA
    normalisation: str = "minmax"
    depth: int = DEFAULT_DEPTH

    def __post_init__(self):
        if self.method not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.method!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if not (isinstance(self.rrf_k, (int, float)) and math.isfinite(self.rrf_k) and self.rrf_k >= 0):
            raise ValueError(f"rrf_k must be a non-negative number, got {self.rrf_k!r}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be a positive integer, got {self.depth!r}")

    def describe(self) -> str:
        if self.method == "rrf":
            return f"reciprocal rank fusion (k={self.rrf_k:g}), depth {self.depth}"
        return f"score fusion ({self.normalisation}, alpha={self.alpha:g} dense), depth {self.depth}"

    def to_dict(self) -> dict:
        return {"method": self.method, "rrf_k": self.rrf_k, "alpha": self.alpha,
                "normalisation": self.normalisation, "depth": self.depth}


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], rrf_k: float = DEFAULT_RRF_K) -> dict[int, float]:
    """`{item: sum of 1 / (rrf_k + rank)}` over ranked lists of items (rank 1 first; -1 entries are empty slots).

    Example:
    ```python
    >>> fused = reciprocal_rank_fusion([[7, 3], [3, 9]], rrf_k=60)
    >>> sorted(fused, key=fused.get, reverse=True)
    [3, 7, 9]
    ```
    """
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate((item for item in ranking if item >= 0), start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (rrf_k + rank)
    return fused


def fused_ranker(rankers: Sequence[Callable], rrf_k: float = DEFAULT_RRF_K, depth: int = DEFAULT_DEPTH) -> Callable:
    """A ranker `(products, query texts, k) -> top-k product ids per query` that fuses other such rankers (e.g.
    `held_out_evaluation.model_ranker` and `lexical.bm25_ranker`) by reciprocal rank fusion of their top
    `max(k, depth)` lists; what the evaluators rank with to compare a hybrid with its parts.

    Example:
    ```python
    >>> rank = fused_ranker([model_ranker(model, processor), bm25_ranker()])
    >>> HeldOutEvaluator(test_split).evaluate(rank).means()["all/ndcg@10"]
    ```
    """
    def rank(products, texts, k: int) -> list[list[str]]:
        runs = [ranker(products, texts, max(k, depth)) for ranker in rankers]
        fused_lists = []
        for rankings in zip(*runs):
            ids = list(dict.fromkeys(pid for ranking in rankings for pid in ranking))  # first seen, first in ties
            position = {pid: index for index, pid in enumerate(ids)}
            fused = reciprocal_rank_fusion([[position[pid] for pid in ranking] for ranking in rankings], rrf_k)
            fused_lists.append([ids[item] for item in sorted(fused, key=lambda item: (-fused[item], item))[:k]])
        return fused_lists

    return rank


def normalised_scores(scores: np.ndarray, normalisation: str = "minmax") -> np.ndarray:
    """One query's candidate scores min-max scaled to [0, 1] or z-scored; all zeros when they are all equal.

    Example:
    ```python
    >>> normalised_scores(np.array([2.0, 4.0, 3.0])).tolist(), normalised_scores(np.array([5.0, 5.0])).tolist()
    ([0.0, 1.0, 0.5], [0.0, 0.0])
    ```
    """
    scores = np.asarray(scores, dtype=np.float64)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if scores.size == 0:
        return scores
    if normalisation == "minmax":
        spread = scores.max() - scores.min()
        return (scores - scores.min()) / spread if spread > 0 else np.zeros_like(scores)
    deviation = scores.std()
    return (scores - scores.mean()) / deviation if deviation > 0 else np.zeros_like(scores)


def _ordered(candidates: np.ndarray, fused: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best candidates by fused score, ties broken by row position."""
    order = np.lexsort((candidates, -fused))[:k]
    return fused[order], candidates[order]


class ProductRanker:
    """Dense, lexical or hybrid ranking of one catalogue: a `ProductIndex` and its `LexicalIndex`.

    Args:
        index: the dense index (its rows fix the row order).
        lexical: the BM25 index over the same products in the same row order (`LexicalIndex.from_products`
            on `ProductTable` rows); needed by the `"lexical"` and `"hybrid"` rankers.
        ranker: `"dense"`, `"lexical"` or `"hybrid"`.
        fusion: how `"hybrid"` fuses (`Fusion`).

    `search(texts, k, embed=..., allowed=...)` returns `(scores, ids)` like `ProductIndex.search` for a batch:
    a `(Q, k)` float tensor and Q lists of k product ids (k capped at the allowed products; slots no ranker
    could fill have score -inf and id None). Scores are cosine similarities (dense), BM25 scores (lexical) or
    fused scores (hybrid). `embed(texts)` returns L2-normalised query embeddings; the lexical ranker never
    calls it.

    Example:
    ```python
    >>> index = ProductIndex.from_embeddings(torch.eye(3), ["a", "b", "c"])
    >>> ranker = ProductRanker(index, LexicalIndex(["red shirt", "blue jeans", "red cap"]), ranker="hybrid")
    >>> # dense ranks b, a, c; BM25 ranks c (both words), a ("red"): fused, c and a overtake b
    >>> ranker.search(["red cap"], k=2, embed=lambda texts: torch.eye(3)[[1]])[1]
    [['c', 'a']]
    ```
    """

    def __init__(
        self,
        index: ProductIndex,
        lexical: LexicalIndex | None = None,
        *,
        ranker: str = "dense",
        fusion: Fusion | None = None,
    ):
        if ranker not in RANKERS:
            raise ValueError(f"ranker must be one of {RANKERS}, got {ranker!r}")
        if ranker != "dense":
            if lexical is None:
                raise ValueError(f"the {ranker!r} ranker needs a LexicalIndex of the catalogue")
            if len(lexical) != len(index):
                raise ValueError(f"the lexical index holds {len(lexical)} products but the index holds {len(index)}")
        self.index = index
        self.lexical = lexical
        self.ranker = ranker
        self.fusion = fusion or Fusion()

    @property
    def needs_embeddings(self) -> bool:
        return self.ranker != "lexical"

    def search(
        self,
        texts: Sequence[str],
        k: int = 10,
        *,
        embed: Callable[[list[str]], torch.Tensor] | None = None,
        query_embeddings: torch.Tensor | None = None,
        allowed: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, list[list]]:
        """Top-k `(scores, ids)` for the query `texts`; see the class docstring. Give `embed` or the texts'
        `query_embeddings` for the dense and hybrid rankers."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.needs_embeddings and query_embeddings is None:
            if embed is None:
                raise ValueError(f"the {self.ranker!r} ranker needs query embeddings: pass embed or query_embeddings")
            query_embeddings = embed(texts)
        if self.ranker == "dense":
            return self.index.search(query_embeddings, k=k, allowed=allowed)
        if self.ranker == "lexical":
            scores, positions = self.lexical.search(texts, k, allowed=allowed)
        else:
            scores, positions = self._hybrid(texts, query_embeddings, k, allowed)
        return scores, self._ids(positions)

    def _ids(self, positions: torch.Tensor) -> list[list]:
        ids = self.index.ids
        return [[ids[position] if position >= 0 else None for position in row] for row in positions.tolist()]

    def _hybrid(
        self, texts: list[str], query_embeddings: torch.Tensor, k: int, allowed: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        fusion = self.fusion
        depth = max(fusion.depth, k)
        _, dense_positions = self.index.search_positions(query_embeddings, k=depth, allowed=allowed)
        _, lexical_positions = self.lexical.search(texts, depth, allowed=allowed)
        dense_positions = dense_positions.reshape(len(texts), -1).numpy()
        allowed_count = len(self.index) if allowed is None else int(np.count_nonzero(allowed))
        k = min(k, allowed_count)
        scores = torch.full((len(texts), k), float("-inf"))
        positions = torch.full((len(texts), k), -1, dtype=torch.long)
        queries = torch.as_tensor(query_embeddings, dtype=torch.float32).reshape(len(texts), -1).numpy()
        for row, text in enumerate(texts):
            dense, lexical = dense_positions[row], lexical_positions[row].numpy()
            if fusion.method == "rrf":
                fused_by_item = reciprocal_rank_fusion([dense, lexical], fusion.rrf_k)
                candidates = np.fromiter(fused_by_item, dtype=np.int64, count=len(fused_by_item))
                fused = np.array([fused_by_item[item] for item in candidates.tolist()], dtype=np.float64)
            else:
                candidates = np.union1d(dense[dense >= 0], lexical[lexical >= 0]).astype(np.int64)
                # Every candidate's own score from both rankers, even from the ranker whose list it missed.
                vectors = np.asarray(self.index.embeddings[candidates], dtype=np.float64)
                dense_scores = vectors @ queries[row].astype(np.float64)
                lexical_scores = self.lexical.scores(text)[candidates]
                fused = fusion.alpha * normalised_scores(dense_scores, fusion.normalisation) + (
                    1 - fusion.alpha
                ) * normalised_scores(lexical_scores, fusion.normalisation)
            best_scores, best_positions = _ordered(candidates, fused, k)
            scores[row, : len(best_positions)] = torch.from_numpy(best_scores.astype(np.float32))
            positions[row, : len(best_positions)] = torch.from_numpy(best_positions)
        return scores, positions


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_DEPTH",
    "DEFAULT_RRF_K",
    "FUSIONS",
    "Fusion",
    "fused_ranker",
    "NORMALISATIONS",
    "ProductRanker",
    "RANKERS",
    "normalised_scores",
    "reciprocal_rank_fusion",
]
