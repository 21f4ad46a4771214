"""Catalogues that carry their own queries: rows of (query text, product), a product possibly in several rows.

Training then uses the rows as they are; this module derives what the attribute-derived path builds otherwise:
the catalogue of distinct products and the evaluation queries with their relevance sets.

Example:
```python
>>> columns = CatalogueColumns(query="search_term")
>>> products = unique_products(split, columns)
>>> queries = evaluation_queries_from_column(split, columns=columns, num_queries=500, seed=0)
>>> queries[0].template
'dataset'
```
"""

import random

from .catalogue import CatalogueColumns, normalise_value
from .queries import EvaluationQuery


def unique_products(dataset, columns: CatalogueColumns):
    """The first row of every product id (a catalogue built from (query, product) rows).

    Example:
    ```python
    >>> len(unique_products(query_product_rows, CatalogueColumns())) <= len(query_product_rows)
    True
    ```
    """
    seen: set[str] = set()
    keep = []
    for index, product_id in enumerate(dataset[columns.product_id]):
        if str(product_id) not in seen:
            seen.add(str(product_id))
            keep.append(index)
    return dataset if len(keep) == len(dataset) else dataset.select(keep)


def evaluation_queries_from_column(
    dataset, *, columns: CatalogueColumns, num_queries: int, seed: int
) -> list[EvaluationQuery]:
    """Evaluation queries read from the dataset's query column: every product a query text is paired with is
    relevant to it. Queries are sampled (seeded) when there are more than `num_queries`.

    Example:
    ```python
    >>> queries = evaluation_queries_from_column(split, columns=CatalogueColumns(query="search_term"),
    ...                                          num_queries=500, seed=0)
    ```
    """
    relevant: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    for text, product_id in zip(dataset[columns.query], dataset[columns.product_id]):
        if not isinstance(text, str) or not text.strip():
            continue
        key = normalise_value(text)
        texts.setdefault(key, text.strip())
        relevant.setdefault(key, set()).add(str(product_id))
    keys = sorted(relevant)
    random.Random(seed).shuffle(keys)
    return [
        EvaluationQuery(
            query_id=f"q{position:05d}",
            text=texts[key],
            attributes={},
            relevant_ids=relevant[key],
            source_product_id=min(relevant[key]),
            colour_absent_from_titles=False,
            template="dataset",
        )
        for position, key in enumerate(keys[:num_queries])
    ]


__all__ = ["evaluation_queries_from_column", "unique_products"]
