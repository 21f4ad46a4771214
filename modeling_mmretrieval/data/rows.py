"""Catalogue rows in batches, from a `datasets.Dataset` or any iterable of row dicts.

Indexing and the image-feature cache both read a catalogue one batch at a time, so memory holds one batch
of decoded images whatever the catalogue's size.

Example:
    >>> rows = ({"product_id": f"sku-{i}"} for i in range(5))
    >>> [len(batch) for batch in row_batches(rows, 2)]
    [2, 2, 1]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any


def is_map_style_dataset(rows: Any) -> bool:
    """Whether `rows` is a `datasets.Dataset` (random access, `select`, column-batched reads).

    Example:
        >>> is_map_style_dataset([{"product_id": "sku-1"}])
        False
    """
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(rows, datasets.Dataset)


def known_row_count(rows: Any, num_rows: int | None = None) -> int | None:
    """The number of rows in `rows`: its `len()`, or `num_rows` given for an iterable without one (checked
    against `len()` where both exist); None when neither tells.

    Example:
        >>> known_row_count([{}, {}]), known_row_count(iter([{}]), num_rows=1), known_row_count(iter([]))
        (2, 1, None)
    """
    if isinstance(rows, Mapping):
        raise TypeError(
            "rows must be an iterable of row dicts, not a mapping of columns; use datasets.Dataset.from_dict"
        )
    length = len(rows) if hasattr(rows, "__len__") else None
    if num_rows is None:
        return length
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative integer, got {num_rows!r}")
    if length is not None and length != num_rows:
        raise ValueError(f"num_rows={num_rows} but rows has {length} rows")
    return num_rows


def row_batches(rows: Any, batch_size: int) -> Iterator[list[dict]]:
    """Lists of up to `batch_size` row dicts from a `datasets.Dataset` or any iterable of rows.

    Example:
        >>> next(row_batches([{"product_id": "sku-1"}, {"product_id": "sku-2"}], 8))
        [{'product_id': 'sku-1'}, {'product_id': 'sku-2'}]
    """
    if is_map_style_dataset(rows):
        # Column-batched reads are much faster than row access, and still decode one batch of images.
        for columns in rows.iter(batch_size=batch_size):
            names = list(columns)
            yield [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
        return
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


__all__ = ["is_map_style_dataset", "known_row_count", "row_batches"]
