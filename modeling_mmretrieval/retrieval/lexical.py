"""Lexical retrieval with BM25 (the `bm25s` library): a ranker of its own, a baseline beside the dense models,
and the lexical half of hybrid ranking (`retrieval.hybrid`).

BM25 scores a product by the query words its text contains, weighted by how rare they are; it knows nothing
of images or synonyms, which is what makes it a useful reference point for both, and a useful complement to
dense scores (exact brand names, colours and model numbers).

A `LexicalIndex` is built once over a catalogue's texts, in the row order of its `ProductIndex`, and then
answers any number of searches, with the same `allowed` mask as `ProductIndex.search` for filters.

Example:
```python
>>> lexical = LexicalIndex(["Red Shirt", "Blue Jeans", "Red Dress"])
>>> scores, positions = lexical.search(["red shirt"], k=5)
>>> positions.tolist()  # "Blue Jeans" shares no word with the query: not a match
[[0, 2, -1]]
>>> rank = bm25_ranker(fields=("title", "brand"))
>>> rank([{"product_id": "1", "title": "Red Shirt"}, {"product_id": "2", "title": "Blue Jeans"}], ["red shirt"], 1)
[['1']]
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..data.catalogue import CatalogueColumns

# The CatalogueColumns fields whose text the lexical index reads by default.
DEFAULT_LEXICAL_FIELDS = ("title", "brand", "description")


def _require_bm25s():
    try:
        import bm25s
    except ImportError as error:  # an optional dependency: only lexical and hybrid ranking need it
        raise ImportError(
            "lexical and hybrid ranking need the bm25s package: pip install 'modeling_mmretrieval[lexical]'"
        ) from error
    return bm25s


def lexical_fields(columns: CatalogueColumns | None = None, fields: Sequence[str] = DEFAULT_LEXICAL_FIELDS) -> tuple:
    """The catalogue column names of the `CatalogueColumns` `fields` the catalogue has (mapped, Nones dropped).

    Example:
    ```python
    >>> lexical_fields(CatalogueColumns(title="name", brand=None))
    ('name', 'description')
    ```
    """
    columns = columns or CatalogueColumns()
    return tuple(name for name in (getattr(columns, field) for field in fields) if name is not None)


def product_text(product: Mapping, fields: Sequence[str]) -> str:
    """The text the lexical index reads for one product: its `fields` joined by spaces (missing ones skipped).

    Example:
    ```python
    >>> product_text({"title": "Red Shirt", "brand": None, "description": "Cotton"}, ("title", "brand", "description"))
    'Red Shirt Cotton'
    ```
    """
    return " ".join(str(product[name]) for name in fields if product.get(name) not in (None, ""))


class LexicalIndex:
    """BM25 over one text per product (row order = the `ProductIndex`'s), built once, searched many times.

    Words are lower-cased and English stop words dropped (bm25s's defaults); no stemming. Results are ranked
    by BM25 score, ties broken by row order, so a search is deterministic. Indexing a few tens of thousands of
    short product texts takes about a second.

    Example:
    ```python
    >>> lexical = LexicalIndex.from_products([{"title": "Nike Running Shoes"}, {"title": "Puma Cap"}], ("title",))
    >>> (lexical.scores("nike shoes") > 0).tolist()
    [True, False]
    ```
    """

    def __init__(self, texts: Sequence[str]):
        bm25s = _require_bm25s()
        self._bm25s = bm25s
        self.count = len(texts)
        self._retriever = bm25s.BM25()
        if self.count:
            corpus_tokens = bm25s.tokenize([str(text) for text in texts], show_progress=False)
            self._retriever.index(corpus_tokens, show_progress=False)

    @classmethod
    def from_products(cls, products: Sequence[Mapping], fields: Sequence[str]) -> LexicalIndex:
        """The index of `products` (row dicts, in index row order) over their `fields` columns."""
        return cls([product_text(product, fields) for product in products])

    def __len__(self) -> int:
        return self.count

    def _query_tokens(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize([str(text) for text in texts], return_ids=False, show_progress=False)

    def scores(self, text: str) -> np.ndarray:
        """The BM25 score of every product for one query (float32, 0 where no query word occurs)."""
        return self._scores_of_tokens(self._query_tokens([text])[0])

    def _scores_of_tokens(self, tokens: list[str]) -> np.ndarray:
        known = self._retriever.get_tokens_ids(tokens) if self.count else []
        if not known:  # no query word occurs in the catalogue (bm25s cannot score an empty query)
            return np.zeros(self.count, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(known), dtype=np.float32)

    def search(
        self,
        texts: Sequence[str],
        k: int,
        *,
        allowed: np.ndarray | None = None,
        matches_only: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores, positions)`: the top `k` products per query as `(Q, k)` tensors, by score then row order.

        With `matches_only` (default) only products that share a word with the query are returned; the
        remaining slots have score -inf and position -1 (a product with no query word is not a lexical
        match). `allowed`, a boolean mask over the rows, restricts the search as in `ProductIndex.search`.

        Example:
        ```python
        >>> LexicalIndex(["red shirt", "red cap", "blue cap"]).search(["red cap"], 3, allowed=np.array([1, 0, 1], bool))
        (tensor([[0.1880, 0.1880,   -inf]]), tensor([[ 0,  2, -1]]))
        ```
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if allowed is not None and (np.asarray(allowed).dtype != np.bool_ or len(allowed) != self.count):
            raise ValueError(f"allowed must be a boolean mask of {self.count} products")
        k = min(int(k), self.count)
        texts = [texts] if isinstance(texts, str) else list(texts)
        scores = torch.full((len(texts), k), float("-inf"))
        positions = torch.full((len(texts), k), -1, dtype=torch.long)
        if k == 0:
            return scores, positions
        for row, tokens in enumerate(self._query_tokens(texts)):
            product_scores = self._scores_of_tokens(tokens)
            eligible = np.ones(self.count, dtype=bool) if allowed is None else np.asarray(allowed).copy()
            if matches_only:
                eligible &= product_scores > 0
            candidates = np.flatnonzero(eligible)
            # Score descending, then row ascending: lexsort's last key is the primary one.
            order = candidates[np.lexsort((candidates, -product_scores[candidates]))][:k]
            scores[row, : len(order)] = torch.from_numpy(product_scores[order])
            positions[row, : len(order)] = torch.from_numpy(order)
        return scores, positions


def bm25_ranker(fields: Sequence[str] = ("title", "brand", "description"), columns: CatalogueColumns | None = None):
    """A ranker `(products, query texts, k) -> top-k product ids per query` over the joined `fields` (row keys).

    Every product is ranked (those sharing no word with a query last, in catalogue order), so each list
    holds k ids. The lexical index of a products list is built on its first call and reused while the same
    list is ranked again.
    """
    columns = columns or CatalogueColumns()
    built: dict = {}

    def rank(products: Sequence, texts: Sequence[str], k: int) -> list[list[str]]:
        if built.get("products") is not products:
            built.update(products=products, index=LexicalIndex.from_products(products, fields))
        ids = [str(product[columns.product_id]) for product in products]
        _, positions = built["index"].search(texts, k, matches_only=False)
        return [[ids[position] for position in row] for row in positions.tolist()]

    return rank


__all__ = ["DEFAULT_LEXICAL_FIELDS", "LexicalIndex", "bm25_ranker", "lexical_fields", "product_text"]
