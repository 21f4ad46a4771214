"""Lexical retrieval with BM25 (the `bm25s` library), as a baseline ranker beside the dense models.

BM25 scores a product by the query words its text contains, weighted by how rare they are; it knows nothing
of images or synonyms, which is what makes it a useful reference point for both.

Example:
```python
>>> rank = bm25_ranker(fields=("title", "brand"))
>>> rank([{"product_id": "1", "title": "Red Shirt"}, {"product_id": "2", "title": "Blue Jeans"}], ["red shirt"], 1)
[['1']]
```
"""

from collections.abc import Sequence

from ..data.catalogue import CatalogueColumns


def _require_bm25s():
    try:
        import bm25s
    except ImportError as error:  # an optional dependency: only lexical baselines need it
        raise ImportError("BM25 needs the bm25s package: pip install 'modeling_mmretrieval[lexical]'") from error
    return bm25s


def bm25_ranker(fields: Sequence[str] = ("title", "brand", "description"), columns: CatalogueColumns | None = None):
    """A ranker `(products, query texts, k) -> top-k product ids per query` over the joined `fields`.

    English stop words are dropped and words are lower-cased (bm25s's defaults); products are indexed on each
    call, which takes well under a second for a few thousand products.
    """
    bm25s = _require_bm25s()
    columns = columns or CatalogueColumns()

    def rank(products: Sequence, texts: Sequence[str], k: int) -> list[list[str]]:
        corpus = [" ".join(str(product.get(name) or "") for name in fields) for product in products]
        ids = [str(product[columns.product_id]) for product in products]
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(corpus, show_progress=False), show_progress=False)
        query_tokens = bm25s.tokenize(list(texts), show_progress=False)
        positions, _ = retriever.retrieve(query_tokens, k=min(k, len(ids)), show_progress=False)
        return [[ids[position] for position in row] for row in positions.tolist()]

    return rank


__all__ = ["bm25_ranker"]
