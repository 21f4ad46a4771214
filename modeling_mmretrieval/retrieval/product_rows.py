"""The rows of a `ProductIndex`: product embeddings, ids and display metadata, appendable while others read.

`ProductRows` is the storage half of the index (`ProductIndex` adds search, provenance and files on top).
Readers take one immutable snapshot (`_RowsState`) and never lock. `add` is serialised by a lock and
publishes rows copy-on-grow: new rows are written past the snapshot's count (invisible to its readers), or
into a grown copy, and only then is the new snapshot published. Product ids live in a `ProductIdTable`
(`product_ids.py`), which publishes appended ids the same way.

Example:
    >>> import torch
    >>> rows = ProductRows(torch.eye(2).numpy(), ["sku-1", "sku-2"])
    >>> rows.add(torch.tensor([[0.6, 0.8]]), ["sku-3"], metadata=[{"title": "Red shoes"}])
    >>> len(rows), rows.position_of("sku-3"), rows.metadata_for("sku-3")
    (3, 2, {'title': 'Red shoes'})
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .embedding_checks import as_float32_matrix, check_unit_rows
from .index_files import RowBlock, bounded_metadata
from .product_ids import ProductId, ProductIdTable, validated_product_id


class _RowsState(NamedTuple):
    """One immutable view of the rows; `add` publishes a new one instead of mutating visible rows."""

    storage: np.ndarray
    count: int
    dim: int | None

    @property
    def vectors(self) -> np.ndarray:
        return self.storage[: self.count]

    def with_room(self, extra_rows: int, dim: int) -> np.ndarray:
        """Storage that holds this state's rows and room for `extra_rows` more: this one where it can grow in
        place (its rows past `count` are invisible to readers), otherwise a copy of double the size."""
        needed = self.count + extra_rows
        storage = self.storage
        if (
            not isinstance(storage, np.memmap)
            and storage.flags.writeable
            and len(storage) >= needed
            and storage.shape[1] == dim
        ):
            return storage
        grown = np.empty((max(needed, 2 * self.count), dim), dtype=np.float32)
        if self.count:
            grown[: self.count] = self.vectors
        return grown


class ProductRows:
    """`(count, dim)` float32 embeddings with one unique product id (and optionally metadata) per row.

    The constructor trusts its caller (`ProductIndex.from_embeddings` checks the vectors); `embeddings` may
    be memory-mapped, and is then copied into memory on the first `add`.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[ProductId] | ProductIdTable,
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ):
        if embeddings.ndim != 2 or len(embeddings) != len(ids):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match {len(ids)} product ids")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata rows for {len(ids)} product ids")
        self._write_lock = threading.Lock()
        # A table given here (as `load` does) becomes the index's own: nothing else may append to it.
        self._id_table = ids if isinstance(ids, ProductIdTable) else ProductIdTable(ids)
        self._metadata = None if metadata is None else [bounded_metadata(row) for row in metadata]
        dim = embeddings.shape[1] if embeddings.shape[1] else None
        self._state = _RowsState(storage=embeddings, count=len(self._id_table), dim=dim)

    def __len__(self) -> int:
        return self._state.count

    def __contains__(self, product_id: object) -> bool:
        return self.position_of(product_id) is not None

    @property
    def dim(self) -> int | None:
        """Embedding dimension, or None for an empty index that never held a vector."""
        return self._state.dim

    @property
    def ids(self) -> tuple[ProductId, ...]:
        """Product ids in row order."""
        return tuple(self._id_table.ids_in(0, self._state.count))

    @property
    def embeddings(self) -> np.ndarray:
        """Read-only `(count, dim)` float32 view of the catalogue (memory-mapped when loaded with mmap)."""
        view = self._state.vectors.view()
        view.flags.writeable = False
        return view

    @property
    def has_metadata(self) -> bool:
        return self._metadata is not None

    def position_of(self, product_id: object) -> int | None:
        """Row of `product_id`, or None when it is not indexed."""
        position = self._id_table.position_of(product_id)
        return position if position is not None and position < self._state.count else None

    def metadata_for(self, product_id: ProductId) -> dict[str, str | None]:
        """The display metadata stored for `product_id` ({} when the index keeps none)."""
        position = self.position_of(product_id)
        if position is None:
            raise KeyError(f"product id {product_id!r} is not in the index")
        return {} if self._metadata is None else dict(self._metadata[position])

    def row_block(self, start: int, stop: int) -> RowBlock:
        """Embeddings, ids and metadata (None when the index keeps none) of rows `start:stop`, from one
        snapshot. Rows below a snapshot's count never change, so blocks read while others add stay consistent.

        Example:
            >>> embeddings, ids, metadata = ProductRows(np.eye(3, dtype=np.float32), ["a", "b", "c"]).row_block(1, 3)
            >>> ids, metadata
            (['b', 'c'], None)
        """
        state = self._state
        stop = min(stop, state.count)
        metadata = None if self._metadata is None else self._metadata[start:stop]
        return state.storage[start:stop], self._id_table.ids_in(start, stop), metadata

    def _latest_vectors(self) -> np.ndarray:
        return self._state.vectors

    def add(
        self,
        embeddings: torch.Tensor | np.ndarray,
        ids: Sequence[ProductId],
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Appends L2-normalised `(n, D)` embeddings for new product ids, safely while other threads search.

        Adds are serialised by a lock; searches never wait for them and see the catalogue either before or
        after an add. A memory-mapped index is copied into memory on its first add (`save` to persist).

        Example:
            >>> index.add(new_vectors, ["sku-new-1", "sku-new-2"], metadata=[{"title": "..."}] * 2)  # doctest: +SKIP
        """
        vectors = as_float32_matrix(embeddings, "added embeddings")
        ids = [validated_product_id(product_id) for product_id in ids]
        if len(vectors) != len(ids):
            raise ValueError(f"got {len(vectors)} embeddings for {len(ids)} product ids")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata rows for {len(ids)} product ids")
        check_unit_rows(vectors, "added embeddings")
        # Checked before the ids are appended: an add that fails after that would leave the id table ahead
        # of the rows.
        metadata_rows = None if metadata is None else [bounded_metadata(row) for row in metadata]
        with self._write_lock:
            state = self._state
            if state.dim is not None and vectors.shape[1] != state.dim:
                raise ValueError(
                    f"added embeddings have dimension {vectors.shape[1]} but the index holds dimension {state.dim}"
                )
            storage = state.with_room(len(ids), vectors.shape[1])
            # Raises on a duplicate without changing the table. The new ids' positions are state.count
            # onwards, which `position_of` and `ids` hide until the new state is published.
            self._id_table.append(ids)
            if metadata_rows is not None and self._metadata is None:
                self._metadata = [{} for _ in range(state.count)]
            if self._metadata is not None:
                self._metadata.extend(metadata_rows if metadata_rows is not None else [{} for _ in ids])
            # Rows past state.count are invisible to readers of the current state, so filling them is safe.
            storage[state.count : state.count + len(ids)] = vectors
            self._state = _RowsState(storage, state.count + len(ids), vectors.shape[1])


__all__ = ["ProductRows"]
