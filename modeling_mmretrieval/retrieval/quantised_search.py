"""The quantised backends of `ProductIndex`: candidates found on compressed codes, then rescored in float.

Each backend keeps a compressed copy of the catalogue, finds the `rescore_candidates * k` best rows of every
query on it, and rescores those rows exactly against the float32 vectors (float64 sums, as `exact_top_k`
rescores), so the scores returned are true cosines and ties are ordered as `exact_top_k` orders them. Only the
candidates' float rows are read: the vectors may stay memory-mapped (`ProductIndex.load` maps them), so what
a search keeps resident is the codes plus the rows it touched.

- `"int8"`: per-dimension affine scalar quantisation (faiss `ScalarQuantizer.QT_8bit`): each dimension's range
  is the min and max of a sample of rows, cut into 256 levels. Affine rather than symmetric because embedding
  dimensions are not centred on zero (a catalogue's embeddings share a common direction), so a symmetric scale
  would leave part of the 256 levels unused; the offset adds the same amount to every row's score of a query
  and so never changes the ranking. Scored with faiss's SIMD kernel; one byte per dimension. (faiss's
  `QT_8bit_direct` codes, which take codes encoded outside faiss, score inner products wrongly from 32
  dimensions up in faiss-cpu 1.15.1, so faiss encodes with the ranges it fits.)
- `"binary"`: one bit per dimension, set where the row exceeds that dimension's mean (the mean of a sample of
  rows); centring first makes the bits split each dimension's values instead of all agreeing on the common
  direction. The query's bits are taken the same way, candidates are the rows nearest in Hamming distance
  (`np.bitwise_count` over packed 64-bit words). One bit per dimension.
- `"faiss-ivfpq"`: faiss `IndexIVFPQ`: `ivf_nlist` coarse clusters (k-means on `ivf_training_rows` sampled
  rows), product-quantised residuals (`ivf_m` sub-vectors of `ivf_nbits` bits); a search visits `ivf_nprobe`
  clusters. `ivf_m` bytes per row (with 8 bits).

Codes are built on the first search that uses a backend, block by block (the pages of a memory-mapped matrix
are dropped from the process as each block is encoded), and extended with only the new rows after `add`.
A searcher is never changed once published: extending builds a new one, so searches in flight keep theirs.

Example:
    >>> import threading, torch
    >>> catalogue = torch.nn.functional.normalize(torch.randn(2000, 32), dim=-1).numpy()
    >>> searchers = QuantisedSearchers(threading.Lock())
    >>> searcher = searchers.for_backend("int8", latest=lambda: catalogue)  # doctest: +SKIP
    >>> scores, positions = searcher.search(torch.from_numpy(catalogue[:1]), 10, None, searchers.options)  # doctest: +SKIP
    >>> positions[0, 0].item()  # doctest: +SKIP
    0
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from .exact_search import order_candidates, rescore_exactly
from .faiss_backends import faiss_threads_at_most, import_faiss
from .index_files import COPY_BLOCK_ROWS

QUANTISED_BACKENDS = ("int8", "binary", "faiss-ivfpq")
# Candidates rescored per query, as a multiple of k, when `rescore_candidates` is None: a byte per dimension
# keeps the order almost intact, a bit per dimension or a product code much less so.
DEFAULT_RESCORE_CANDIDATES = {"int8": 4, "binary": 16, "faiss-ivfpq": 8}
# Rows sampled (evenly spaced) to fit the int8 ranges and the binary thresholds.
QUANTISER_SAMPLE_ROWS = 1 << 17
# Upper bound on the (queries x rows x words) block of XORed codes held at once by a binary search.
HAMMING_BLOCK_ELEMENTS = 1 << 20
# Upper bound on the (queries x rows) Hamming distances held at once by a binary search.
HAMMING_DISTANCE_ELEMENTS = 1 << 26
MAX_IVF_NBITS = 16
# An int8 shard holds at least this many rows: below it, scanning side by side costs more than it saves.
MIN_SHARD_ROWS = 1 << 16


class QuantisedOptions(NamedTuple):
    """Settings of the quantised backends (see `ProductIndex.set_backend`).

    `rescore_candidates`: candidates rescored per query, as a multiple of k (None: the backend's default,
    `DEFAULT_RESCORE_CANDIDATES`). `ivf_*`: the `"faiss-ivfpq"` structure (`ivf_m=None`: `default_ivf_m(dim)`)
    and its search breadth (`ivf_nprobe`).
    """

    rescore_candidates: int | None = None
    ivf_nlist: int = 1024
    ivf_m: int | None = None
    ivf_nbits: int = 8
    ivf_nprobe: int = 32
    ivf_training_rows: int = 1 << 16

    def candidates_per_query(self, backend: str, k: int) -> int:
        """How many rows a search for the top `k` rescores (before capping at the rows it may rank)."""
        multiple = self.rescore_candidates or DEFAULT_RESCORE_CANDIDATES[backend]
        return multiple * k

    def structure(self, backend: str) -> tuple:
        """The settings a backend's codes depend on: a change rebuilds them (the others apply per search)."""
        if backend == "faiss-ivfpq":
            return self.ivf_nlist, self.ivf_m, self.ivf_nbits, self.ivf_training_rows
        return ()


def _positive(value: Any, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def default_ivf_m(dim: int) -> int:
    """The `"faiss-ivfpq"` sub-vector count when `ivf_m` is None: the largest divisor of `dim` that gives
    sub-vectors of at least 8 dimensions (so 48 for 384 dimensions: 48 bytes per row with 8-bit codes).

    Example:
        >>> default_ivf_m(384), default_ivf_m(30)
        (48, 3)
    """
    return max((m for m in range(1, max(dim // 8, 1) + 1) if dim % m == 0), default=1)


def checked_quantised_options(options: QuantisedOptions, dim: int | None) -> QuantisedOptions:
    """`options`, or a one-line `ValueError` naming the first bad parameter; `dim` (None for an empty index)
    checks that `ivf_m` divides it.

    Example:
        >>> checked_quantised_options(QuantisedOptions(rescore_candidates=8), dim=384).rescore_candidates
        8
        >>> checked_quantised_options(QuantisedOptions(ivf_m=7), dim=384)
        Traceback (most recent call last):
        ...
        ValueError: ivf_m must divide the embedding dimension 384, got 7
    """
    _positive(options.rescore_candidates, "rescore_candidates", allow_none=True)
    for name in ("ivf_nlist", "ivf_nbits", "ivf_nprobe", "ivf_training_rows"):
        _positive(getattr(options, name), name)
    _positive(options.ivf_m, "ivf_m", allow_none=True)
    if options.ivf_nbits > MAX_IVF_NBITS:
        raise ValueError(f"ivf_nbits must be at most {MAX_IVF_NBITS}, got {options.ivf_nbits}")
    if options.ivf_m is not None and dim is not None and dim % options.ivf_m:
        raise ValueError(f"ivf_m must divide the embedding dimension {dim}, got {options.ivf_m}")
    return options


def release_mapped_rows(rows: np.ndarray, start: int, stop: int) -> None:
    """Drops rows `start:stop` of a memory-mapped matrix from this process's resident memory.

    A pass over a mapped file (the load's row check, encoding codes) would otherwise leave every page it read
    mapped into the process, so its resident memory would grow to the whole file. The pages stay in the
    kernel's page cache, and a later read maps them back. Index files are mapped read-only or copy-on-write
    and never written through (`ProductRows` copies before it grows), so no data is lost. Arrays that are not
    memory-mapped are left alone.

    Example:
        >>> release_mapped_rows(np.eye(3, dtype=np.float32), 0, 3)  # in memory: nothing to do
    """
    mapping = getattr(rows, "_mmap", None)
    if not isinstance(mapping, mmap.mmap) or getattr(rows, "mode", None) not in ("r", "c") or stop <= start:
        return
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        mapping_start = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        first = rows.ctypes.data + start * rows.strides[0] - mapping_start
        last = rows.ctypes.data + stop * rows.strides[0] - mapping_start
        # Only whole pages inside the rows are dropped; the partial pages at the ends are kept.
        first = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
        last = last // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
    except (ValueError, OSError):  # a closed mapping, or a kernel that refuses: memory stays as it was
        return


def _sample_rows(vectors: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` evenly spaced rows of `vectors`, as a float32 copy; read block by block, releasing each
    block's mapped pages (a strided read of a mapped file touches most of its pages)."""
    step = max(1, -(-len(vectors) // count))
    positions = np.arange(0, len(vectors), step)[:count]
    sample = np.empty((len(positions), vectors.shape[1]), dtype=np.float32)
    per_block = max(1, COPY_BLOCK_ROWS // step)
    for first in range(0, len(positions), per_block):
        chunk = positions[first : first + per_block]
        sample[first : first + len(chunk)] = vectors[chunk]
        release_mapped_rows(vectors, int(chunk[0]), int(chunk[-1]) + 1)
    return sample


def _row_blocks(vectors: np.ndarray, start: int):
    """Contiguous blocks of rows `start:` of `vectors`, releasing each block's mapped pages once encoded."""
    for block_start in range(start, len(vectors), COPY_BLOCK_ROWS):
        block_stop = min(block_start + COPY_BLOCK_ROWS, len(vectors))
        yield np.ascontiguousarray(vectors[block_start:block_stop], dtype=np.float32)
        release_mapped_rows(vectors, block_start, block_stop)


def rescored_top_k(
    vectors: np.ndarray, queries: torch.Tensor, candidates: np.ndarray, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `k` of each query's `candidates` (row positions, -1 for none) by exact float rescoring against
    `vectors`, ordered as `exact_top_k` orders (score descending, then catalogue position); slots without a
    candidate have score -inf and position -1.

    Example:
        >>> vectors = np.eye(4, dtype=np.float32)
        >>> rescored_top_k(vectors, torch.from_numpy(vectors[2:3]), np.array([[0, 2, -1]]), 2)
        (tensor([[1., 0.]]), tensor([[2, 0]]))
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    missing = candidates < 0
    scores = rescore_exactly(vectors, queries.numpy().astype(np.float64), np.where(missing, 0, candidates))
    scores[missing] = -np.inf
    return order_candidates(torch.from_numpy(scores), torch.from_numpy(np.where(missing, -1, candidates)), k)


def _shard_pool() -> ThreadPoolExecutor:
    """The threads that search an int8 index's shards side by side (faiss releases the GIL while it scans)."""
    global _SHARD_POOL
    with _SHARD_POOL_LOCK:
        if _SHARD_POOL is None:
            _SHARD_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="int8-shard")
        return _SHARD_POOL


_SHARD_POOL: ThreadPoolExecutor | None = None
_SHARD_POOL_LOCK = threading.Lock()


class _FaissCodesSearcher:
    """Candidates from faiss indexes over codes (int8 scalar quantiser or IVF-PQ), rescored in float.

    faiss scans one query's codes on one thread (it parallelises over queries), so the int8 codes are cut into
    contiguous shards, one per faiss thread at build time: a search of fewer queries than shards scans the shards
    side by side and takes each shard's best candidates, which can only add candidates (never lose one) to an
    unsharded scan's. IVF-PQ visits a few clusters per query and stays one index.
    """

    def __init__(self, backend: str, shards: list[tuple[int, Any]], vectors: np.ndarray, structure: tuple):
        self.backend = backend
        self.count = len(vectors)
        self.structure = structure
        self._shards = shards  # (first row, faiss index); never changed once the searcher is published
        self._vectors = vectors

    @classmethod
    def build(cls, backend: str, vectors: np.ndarray, options: QuantisedOptions) -> _FaissCodesSearcher:
        """Trains the codes on a sample of `vectors` and encodes every row."""
        faiss = import_faiss()
        dim = vectors.shape[1]
        if backend == "int8":
            index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            sample = _sample_rows(vectors, QUANTISER_SAMPLE_ROWS)
        else:
            m = options.ivf_m or default_ivf_m(dim)
            checked_quantised_options(options, dim)
            sample = _sample_rows(vectors, options.ivf_training_rows)
            needed = max(options.ivf_nlist, 1 << options.ivf_nbits)
            if len(sample) < needed:
                raise ValueError(
                    f"faiss-ivfpq trains on {len(sample)} rows (the index holds {len(vectors)}, ivf_training_rows="
                    f"{options.ivf_training_rows}) but needs at least {needed} (ivf_nlist={options.ivf_nlist}, "
                    f"2**ivf_nbits={1 << options.ivf_nbits}); lower ivf_nlist or ivf_nbits"
                )
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFPQ(quantizer, dim, options.ivf_nlist, m, options.ivf_nbits, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        del sample
        shards = 1
        if backend == "int8":
            shards = max(1, min(faiss.omp_get_max_threads(), len(vectors) // MIN_SHARD_ROWS))
        bounds = np.linspace(0, len(vectors), shards + 1).astype(int)
        encoded = []
        for first, stop in zip(bounds[:-1], bounds[1:]):
            shard = faiss.clone_index(index)
            for block in _row_blocks(vectors[:stop], first):
                shard.add(block)
            encoded.append((int(first), shard))
        return cls(backend, encoded, vectors, options.structure(backend))

    def extended(self, vectors: np.ndarray) -> _FaissCodesSearcher:
        """A searcher over `vectors` (this one's rows plus rows added since) that encodes only the new rows, into a
        copy of the last shard; this one is left unchanged for the searches still using it."""
        faiss = import_faiss()
        first, last = self._shards[-1]
        last = faiss.clone_index(last)
        for block in _row_blocks(vectors, self.count):
            last.add(block)
        return type(self)(self.backend, [*self._shards[:-1], (first, last)], vectors, self.structure)

    def resident_bytes(self) -> int:
        """Bytes of the codes and their trained tables (what faiss holds; the float rows are not counted)."""
        dim = self._vectors.shape[1]
        if self.backend == "int8":
            codes = sum(index.ntotal * index.code_size for _, index in self._shards)
            return codes + 2 * dim * 4 * len(self._shards)  # codes, then each dimension's min and range per shard
        index = self._shards[0][1]
        product_quantiser = index.pq
        centroids = (index.nlist * dim + product_quantiser.M * product_quantiser.ksub * product_quantiser.dsub) * 4
        return index.ntotal * (index.code_size + 8) + centroids  # codes and their 64-bit row ids

    def _shard_candidates(self, first: int, index, queries: np.ndarray, count: int, allowed: np.ndarray | None,
                          options: QuantisedOptions) -> np.ndarray:
        """One shard's best `count` rows per query, as catalogue positions (-1: none)."""
        faiss = import_faiss()
        keep_alive = None
        arguments = {}
        if allowed is not None:
            keep_alive = np.packbits(allowed[first : first + index.ntotal], bitorder="little")
            arguments["sel"] = faiss.IDSelectorBitmap(len(keep_alive), faiss.swig_ptr(keep_alive))
        if self.backend == "faiss-ivfpq":
            parameters = faiss.SearchParametersIVF(nprobe=options.ivf_nprobe, **arguments)
        else:
            parameters = faiss.SearchParameters(**arguments) if arguments else None
        _, labels = index.search(queries, min(count, index.ntotal), params=parameters)
        del keep_alive  # faiss read the bitmap during the search only
        return np.where(labels >= 0, labels + first, -1)

    def candidate_positions(
        self, queries: torch.Tensor, k: int, allowed: np.ndarray | None, options: QuantisedOptions
    ) -> np.ndarray:
        """The rows the codes propose for each query's top `k` (catalogue positions, -1: none), before rescoring:
        `options.candidates_per_query` of them from each shard."""
        available = self.count if allowed is None else int(np.count_nonzero(allowed))
        candidates = max(k, min(options.candidates_per_query(self.backend, k), available))
        matrix = np.ascontiguousarray(queries.numpy())
        jobs = [(first, index, matrix, candidates, allowed, options) for first, index in self._shards]
        if len(self._shards) > 1 and len(queries) < len(self._shards):
            with faiss_threads_at_most(1):
                labels = list(_shard_pool().map(lambda job: self._shard_candidates(*job), jobs))
        else:
            with faiss_threads_at_most(len(queries)):
                labels = [self._shard_candidates(*job) for job in jobs]
        return np.concatenate(labels, axis=1)

    def search(
        self, queries: torch.Tensor, k: int, allowed: np.ndarray | None, options: QuantisedOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores, positions)` of the top `k` rows, scored in float among the code search's candidates."""
        return rescored_top_k(self._vectors, queries, self.candidate_positions(queries, k, allowed, options), k)


class _BinarySearcher:
    """Candidates by Hamming distance between packed sign bits (around per-dimension means), rescored in float."""

    backend = "binary"
    structure = ()

    def __init__(self, thresholds: np.ndarray, codes: np.ndarray, vectors: np.ndarray):
        self._thresholds = thresholds
        self._codes = codes
        self._vectors = vectors
        self.count = len(vectors)

    @classmethod
    def build(cls, vectors: np.ndarray, options: QuantisedOptions) -> _BinarySearcher:
        """Sets the thresholds from a sample of `vectors` and encodes every row."""
        thresholds = _sample_rows(vectors, QUANTISER_SAMPLE_ROWS).mean(axis=0, dtype=np.float64).astype(np.float32)
        words = -(-vectors.shape[1] // 64)
        return cls(thresholds, np.zeros((0, words), dtype=np.uint64), vectors[:0]).extended(vectors)

    def _encode(self, rows: np.ndarray) -> np.ndarray:
        """`(n, words)` uint64: one bit per dimension, set where the row exceeds the threshold, zero-padded."""
        words = self._codes.shape[1]
        packed = np.zeros((len(rows), 8 * words), dtype=np.uint8)
        bits = np.packbits(rows > self._thresholds, axis=1)
        packed[:, : bits.shape[1]] = bits
        return packed.view(np.uint64)

    def extended(self, vectors: np.ndarray) -> _BinarySearcher:
        """A searcher over `vectors` that encodes only the rows added since this one (left unchanged)."""
        new_codes = [self._encode(block) for block in _row_blocks(vectors, self.count)]
        return type(self)(self._thresholds, np.concatenate([self._codes, *new_codes]), vectors)

    def resident_bytes(self) -> int:
        """Bytes of the packed codes and the thresholds (the float rows are not counted)."""
        return self._codes.nbytes + self._thresholds.nbytes

    def _distances(self, query_codes: np.ndarray) -> np.ndarray:
        """`(queries, rows)` uint16 Hamming distances, block by block of rows."""
        codes = self._codes
        distances = np.empty((len(query_codes), len(codes)), dtype=np.uint16)
        block_rows = max(1, HAMMING_BLOCK_ELEMENTS // (len(query_codes) * codes.shape[1]))
        for start in range(0, len(codes), block_rows):
            block = codes[start : start + block_rows]
            differing = np.bitwise_count(block[None, :, :] ^ query_codes[:, None, :])
            differing.sum(axis=2, dtype=np.uint16, out=distances[:, start : start + len(block)])
        return distances

    @staticmethod
    def _nearest(distances: np.ndarray, count: int, dim: int) -> np.ndarray:
        """Positions of the `count` smallest distances (ties by position), from a histogram of the distances:
        no sort of the whole row. Distances above `dim` mark rows that may not be ranked."""
        histogram = np.cumsum(np.bincount(distances, minlength=dim + 2)[: dim + 1])
        threshold = int(np.searchsorted(histogram, count))
        closer = np.flatnonzero(distances < threshold)
        tied = np.flatnonzero(distances == threshold)[: count - len(closer)]
        return np.concatenate([closer, tied])

    def search(
        self, queries: torch.Tensor, k: int, allowed: np.ndarray | None, options: QuantisedOptions
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(scores, positions)` of the top `k` rows, scored in float among the nearest rows in Hamming distance."""
        dim = queries.shape[1]
        available = self.count if allowed is None else int(np.count_nonzero(allowed))
        count = max(k, min(options.candidates_per_query(self.backend, k), available))
        query_codes = self._encode(queries.numpy())
        candidates = np.empty((len(queries), count), dtype=np.int64)
        group = max(1, HAMMING_DISTANCE_ELEMENTS // max(self.count, 1))
        for start in range(0, len(queries), group):
            distances = self._distances(query_codes[start : start + group])
            if allowed is not None:
                distances[:, ~allowed] = dim + 1
            for row, query_distances in enumerate(distances):
                candidates[start + row] = self._nearest(query_distances, count, dim)
        return rescored_top_k(self._vectors, queries, candidates, k)


QuantisedSearcher = _FaissCodesSearcher | _BinarySearcher


class QuantisedSearchers:
    """One index's quantised searchers, one per backend, each current with the catalogue and `options`.

    `lock` is the index's write lock: a searcher is built or extended under it, from the newest catalogue.

    Example:
        >>> searchers = QuantisedSearchers(threading.Lock())
        >>> searchers.options.rescore_candidates is None
        True
    """

    def __init__(self, lock: threading.Lock):
        self.options = QuantisedOptions()
        self._lock = lock
        self._searchers: dict[str, QuantisedSearcher] = {}

    def _is_current(self, backend: str, searcher: QuantisedSearcher | None, count: int) -> bool:
        return searcher is not None and searcher.count == count and searcher.structure == self.options.structure(backend)

    def for_backend(self, backend: str, latest: Callable[[], np.ndarray]) -> QuantisedSearcher:
        """The searcher of `backend` over `latest()`, the newest catalogue: built when missing or when its
        structure settings changed, extended with the new rows when rows were added."""
        searcher = self._searchers.get(backend)
        if self._is_current(backend, searcher, len(latest())):
            return searcher
        with self._lock:
            vectors, searcher = latest(), self._searchers.get(backend)
            if self._is_current(backend, searcher, len(vectors)):
                return searcher
            if searcher is not None and searcher.structure == self.options.structure(backend):
                searcher = searcher.extended(vectors)
            elif backend == "binary":
                searcher = _BinarySearcher.build(vectors, self.options)
            else:
                searcher = _FaissCodesSearcher.build(backend, vectors, self.options)
            self._searchers[backend] = searcher
        return searcher

    def resident_bytes(self, backend: str) -> int:
        """Bytes of the codes `backend`'s searcher holds (0 before its first search); the float rows it rescores
        are not counted (they may be memory-mapped).

        Example:
            >>> QuantisedSearchers(threading.Lock()).resident_bytes("int8")
            0
        """
        searcher = self._searchers.get(backend)
        if searcher is None:
            return 0
        return searcher.resident_bytes()


__all__ = [
    "DEFAULT_RESCORE_CANDIDATES",
    "QUANTISED_BACKENDS",
    "QuantisedOptions",
    "QuantisedSearchers",
    "checked_quantised_options",
    "default_ivf_m",
    "release_mapped_rows",
    "rescored_top_k",
]
