"""The faiss backends of `ProductIndex`: `"faiss-flat"` (exact, faiss kernels) and `"faiss-hnsw"` (a graph).
The quantised backends, faiss IVF-PQ among them, are in `quantised_search.py`.

faiss is optional (`pip install faiss-cpu`). Each backend's faiss index holds its own copy of the vectors,
is built on the first search that uses it, and is rebuilt once rows were added or the HNSW options changed.

Example:
    >>> import threading, numpy as np, torch
    >>> catalogue = np.eye(8, dtype=np.float32)
    >>> searchers = FaissSearchers(threading.Lock())  # doctest: +SKIP
    >>> searchers.for_backend("faiss-flat", latest=lambda: catalogue).search(torch.eye(8)[:1], 2)  # doctest: +SKIP
    (tensor([[1., 0.]]), tensor([[0, 1]]))
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .exact_search import order_candidates
from .index_files import COPY_BLOCK_ROWS

FAISS_BACKENDS = ("faiss-flat", "faiss-hnsw")


def import_faiss():
    """The `faiss` module, or an `ImportError` that says how to install it.

    Example:
        >>> faiss = import_faiss()  # doctest: +SKIP
    """
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the 'faiss-flat', 'faiss-hnsw', 'faiss-ivfpq', 'int8' and 'binary' index backends need faiss; install "
            "it with `pip install faiss-cpu` (or use backend='exact')"
        ) from error
    return faiss


@contextlib.contextmanager
def faiss_threads_at_most(count: int):
    """Runs the block with faiss using at most `count` OpenMP threads in this thread.

    faiss searches these indexes in parallel over queries: with fewer queries than threads the extra threads
    have nothing to do, yet waking them costs more than a small search, above all where torch's own OpenMP
    threads spin on the same cores. The thread count is an OpenMP setting of the calling thread only, restored
    after the block, so other threads and later searches keep theirs.

    Example:
        >>> with faiss_threads_at_most(1):  # doctest: +SKIP
        ...     scores, labels = faiss_index.search(one_query, 10)
    """
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    if count >= threads:
        yield
        return
    faiss.omp_set_num_threads(max(count, 1))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


class HNSWOptions(NamedTuple):
    """Graph settings of the `"faiss-hnsw"` backend (see `ProductIndex.set_backend`)."""

    neighbors: int = 32
    ef_construction: int = 200
    ef_search: int = 128


class FaissSearcher:
    """A faiss index over one snapshot of the catalogue (faiss copies the vectors)."""

    def __init__(self, backend: str, catalogue: np.ndarray, hnsw: HNSWOptions):
        faiss = import_faiss()
        dim = catalogue.shape[1]
        if backend == "faiss-flat":
            self._index = faiss.IndexFlatIP(dim)
        else:
            self._index = faiss.IndexHNSWFlat(dim, hnsw.neighbors, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = hnsw.ef_construction
            self._index.hnsw.efSearch = hnsw.ef_search
        for start in range(0, len(catalogue), COPY_BLOCK_ROWS):
            self._index.add(np.ascontiguousarray(catalogue[start : start + COPY_BLOCK_ROWS]))
        self.count = len(catalogue)
        self.hnsw = hnsw

    def _filtered_parameters(self, allowed: np.ndarray):
        """faiss search parameters that visit only the `allowed` rows (faiss's own id selector), and the
        selector, which the caller keeps alive while faiss uses it."""
        faiss = import_faiss()
        selector = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
        if isinstance(self._index, faiss.IndexHNSWFlat):
            # Parameters given per search replace the index's own, so the graph's efSearch is passed on.
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self.hnsw.ef_search), selector
        return faiss.SearchParameters(sel=selector), selector

    def search(
        self, queries: torch.Tensor, k: int, allowed: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores, positions)` of the top `k` rows for float32 `(Q, dim)` queries, ordered as `exact_top_k`
        orders them; slots a graph search could not fill have score -inf and position -1. `allowed` (a
        boolean mask over the rows) restricts the search to the rows it marks; a graph search with a selective
        mask may then fill fewer slots, as the graph is walked through rows the mask leaves out."""
        with faiss_threads_at_most(len(queries)):
            if allowed is None:
                scores, labels = self._index.search(queries.numpy(), k)
            else:
                parameters, _selector = self._filtered_parameters(allowed)
                scores, labels = self._index.search(queries.numpy(), k, params=parameters)
        scores, labels = torch.from_numpy(scores), torch.from_numpy(labels)
        # Graph search can come back short; missing slots (label -1) sort last.
        scores = scores.masked_fill(labels < 0, float("-inf"))
        return order_candidates(scores, labels, k)


class FaissSearchers:
    """One index's faiss searchers, one per backend, each current with the catalogue and `hnsw` options.

    `lock` is the index's write lock: a searcher is (re)built under it, from the newest catalogue.
    """

    def __init__(self, lock: threading.Lock):
        self.hnsw = HNSWOptions()
        self._lock = lock
        self._searchers: dict[str, FaissSearcher] = {}

    def _is_current(self, searcher: FaissSearcher | None, count: int) -> bool:
        return searcher is not None and searcher.count == count and searcher.hnsw == self.hnsw

    def for_backend(self, backend: str, latest: Callable[[], np.ndarray]) -> FaissSearcher:
        """The searcher of `backend` over `latest()`, the newest catalogue, built when it is missing or stale."""
        searcher = self._searchers.get(backend)
        if self._is_current(searcher, len(latest())):
            return searcher
        with self._lock:
            catalogue, searcher = latest(), self._searchers.get(backend)
            if not self._is_current(searcher, len(catalogue)):
                searcher = FaissSearcher(backend, catalogue, self.hnsw)
                self._searchers[backend] = searcher
        return searcher


__all__ = ["FAISS_BACKENDS", "FaissSearcher", "FaissSearchers", "HNSWOptions", "faiss_threads_at_most", "import_faiss"]
