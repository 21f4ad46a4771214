"""Exact top-k search of a catalogue matrix: chunked scoring, candidate selection, float64 rescoring.

`exact_top_k` scores the catalogue chunk by chunk (float32 BLAS, or a float16 copy for a few queries),
keeps every row whose approximate score could still be in the top k given the scores' proven error bound,
rescores those few rows in float64, and merges them into the running top k. The result is deterministic:
the same products and scores for a query alone or in a batch, with ties broken by catalogue position.

`ScreeningCache` decides when a search screens with the float16 copy (`speedups.float16_screening`) and
keeps that copy: `ProductIndex` applies the speedup by default.

Example:
    >>> import torch
    >>> catalogue = torch.nn.functional.normalize(torch.randn(1000, 16), dim=-1).numpy()
    >>> scores, positions = exact_top_k(catalogue, torch.from_numpy(catalogue[:2]), 3, default_chunk_rows(2))
    >>> positions[:, 0].tolist()
    [0, 1]
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np
import torch

from ..speedups.float16_screening import Float16Screen, float16_kernel_sums_in_float32
from .embedding_checks import NORM_TOLERANCE

# Upper bound on the (queries x catalogue rows) score block materialised per step of the exact search.
SCORE_BLOCK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 256
# Upper bound on the float64 (queries x candidates x dim) block materialised when rescoring candidates.
RESCORE_BLOCK_ELEMENTS = 1 << 22
# Candidates taken per query beyond the k best approximate scores, so that rows whose score is within
# BLAS rounding of the k-th are rescored without a second pass in all but near-duplicate catalogues.
CANDIDATE_SLACK = 32
# Up to this many queries, a search scores and selects with numpy (OpenBLAS), beyond it with torch.
NUMPY_MAX_QUERIES = 8
# Up to this many queries, an in-memory catalogue of at least SCREENING_MIN_ROWS rows is scored against
# its float16 copy (`Float16Screen`): those searches are bound by memory bandwidth, and the copy is half
# the bytes. Larger batches are bound by arithmetic, where float16 on a CPU is slower.
SCREENING_MAX_QUERIES = 8
SCREENING_MIN_ROWS = 1 << 14

logger = logging.getLogger(__name__)


def default_chunk_rows(num_queries: int) -> int:
    """Catalogue rows scored per step so that one step's score block stays within `SCORE_BLOCK_ELEMENTS`.

    Example:
        >>> default_chunk_rows(1) == SCORE_BLOCK_ELEMENTS
        True
    """
    return max(MIN_CHUNK_ROWS, SCORE_BLOCK_ELEMENTS // max(num_queries, 1))


def _ranking_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is score descending, then catalogue position ascending.

    The high half is the float32 score's bit pattern made order-preserving as a signed integer (IEEE
    floats order like sign-magnitude integers, so negative ones get their magnitude bits flipped; adding
    0.0 folds -0.0 into +0.0). The low half is the position, inverted so lower positions rank first.
    One top-k over these keys replaces two stable sorts and is deterministic because keys are unique.
    """
    bits = (scores + 0.0).view(torch.int32).long()
    ordered_bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered_bits << 32) | (0xFFFFFFFF - positions)


def order_candidates(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `k` candidates per row, by score descending and, among equal scores, catalogue position.
    Negative positions (slots a faiss search left empty, scored -inf) rank last.

    Example:
        >>> order_candidates(torch.tensor([[0.5, 0.9, 0.5]]), torch.tensor([[7, 3, 2]]), 2)
        (tensor([[0.9000, 0.5000]]), tensor([[3, 2]]))
    """
    order = _ranking_keys(scores, positions.clamp(min=0)).topk(min(k, positions.shape[1]), dim=1).indices
    return scores.gather(1, order), positions.gather(1, order)


def _blas_error_bound(dim: int) -> float:
    """Largest difference between a float32 BLAS inner product of two rows of norm at most
    1 + NORM_TOLERANCE and its true value, whatever order the kernel sums in (|error| <= dim * u * |x||y|,
    with u = 2**-24), with slack for the final rounding."""
    return 1.1 * dim * 2.0**-24 * (1 + NORM_TOLERANCE) ** 2 + 2.0**-23


def _score_chunk(query_matrix: np.ndarray, chunk: np.ndarray, out: np.ndarray) -> None:
    """`out = query_matrix @ chunk.T` in float32, with the BLAS that is faster for the batch size.

    A few queries stream the whole chunk from memory, and numpy's bundled OpenBLAS does that at memory
    bandwidth on Intel and AMD alike, where the MKL in torch's CPU wheel is slower on AMD
    (`benchmarks/run.py --cases search` times both kernels alone; docs/performance.md). Larger batches are
    compute-bound and stay with torch, whose thread pool the following top-k shares.
    """
    if len(query_matrix) == 1:  # as a matrix-vector product, the one streaming pass OpenBLAS does best
        np.matmul(chunk, query_matrix[0], out=out[0])
    elif len(query_matrix) <= NUMPY_MAX_QUERIES:
        np.matmul(query_matrix, chunk.T, out=out)
    else:
        torch.mm(torch.from_numpy(query_matrix), torch.from_numpy(chunk).t(), out=torch.from_numpy(out))


def _largest_columns(scores: np.ndarray, count: int, with_torch: bool) -> np.ndarray:
    """Column indices of the `count` largest scores of each row, in no particular order.

    `with_torch=False` stays in numpy, which keeps torch's thread pool, and its spinning workers, out of
    the way of the OpenBLAS threads that scored a few queries; torch's top-k is faster where torch scored.
    """
    if not with_torch:
        return np.argpartition(scores, len(scores[0]) - count, axis=1)[:, -count:]
    return torch.from_numpy(scores).topk(count, dim=1, sorted=False).indices.numpy()


def rescore_exactly(catalogue: np.ndarray, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Each float64 query's inner products with its candidate rows, summed in float64, as float32.

    BLAS kernels round a row's product differently depending on where the row falls in their tiles, so
    two identical products could score an ulp apart. Rescoring the few candidates the same way for every
    row makes equal vectors tie exactly (then catalogue order decides), and makes a query's scores the
    same whether it is searched alone or in a batch.
    """
    scores = np.empty(positions.shape, dtype=np.float32)
    dim = queries.shape[1]
    queries_per_block = max(1, RESCORE_BLOCK_ELEMENTS // max(dim * positions.shape[1], 1))
    for start in range(0, len(queries), queries_per_block):
        stop = start + queries_per_block
        candidates = catalogue[positions[start:stop].ravel()].reshape(*positions[start:stop].shape, dim)
        if len(queries) <= NUMPY_MAX_QUERIES:
            sums = (candidates.astype(np.float64) * queries[start:stop, None, :]).sum(axis=-1)
        else:  # the same sums, on torch's threads
            products = torch.from_numpy(candidates).double() * torch.from_numpy(queries[start:stop, None, :])
            sums = products.sum(dim=-1).numpy()
        scores[start:stop] = sums
    return scores


def _candidate_columns(scores: np.ndarray, k: int, margin: float, with_torch: bool) -> np.ndarray:
    """Columns of every score within `2 * margin` of its row's k-th largest (and usually a few more):
    the rows that can still be in the exact top k when each score may be off by up to `margin`."""
    num_columns = scores.shape[1]
    if k + CANDIDATE_SLACK >= num_columns:
        return np.broadcast_to(np.arange(num_columns), scores.shape)
    columns = _largest_columns(scores, k + CANDIDATE_SLACK, with_torch)
    values = np.take_along_axis(scores, columns, axis=1)
    threshold = np.partition(values, CANDIDATE_SLACK, axis=1)[:, CANDIDATE_SLACK] - 2 * margin
    if (values.min(axis=1) < threshold).all():
        return columns
    # More than CANDIDATE_SLACK rows sit within the margin of the k-th score (near duplicates): take them all.
    return _largest_columns(scores, int((scores >= threshold[:, None]).sum(axis=1).max()), with_torch)


def exact_top_k(
    catalogue: np.ndarray,
    queries: torch.Tensor,
    k: int,
    chunk_rows: int,
    screen: Float16Screen | None = None,
    allowed: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products, ties broken by catalogue order, in O(queries x chunk_rows) memory.

    Each catalogue chunk is scored with one float32 matrix product, or against `screen`, the catalogue's
    float16 copy. Every row that could still be in the top k given those scores' error bound is rescored
    exactly, then merged into the running top k, so both ways return the same results.

    `allowed` (a boolean mask, one entry per catalogue row) restricts the search to the rows it marks: the
    others score -inf before candidates are chosen and after they are rescored, so the results are those of
    a catalogue holding only the allowed rows (the caller caps `k` at their count).

    Example:
        >>> catalogue = np.eye(4, dtype=np.float32)
        >>> exact_top_k(catalogue, torch.from_numpy(catalogue[2:3]), 2, chunk_rows=256)[1]
        tensor([[2, 0]])
        >>> exact_top_k(catalogue, torch.from_numpy(catalogue[2:3]), 2, 256, allowed=np.array([0, 1, 0, 1], bool))[1]
        tensor([[1, 3]])
    """
    num_queries, dim = queries.shape
    query_matrix = queries.numpy()
    margin = screen.margin(query_matrix) if screen is not None else _blas_error_bound(dim)
    with_torch = screen is not None or num_queries > NUMPY_MAX_QUERIES
    queries_float64 = query_matrix.astype(np.float64)
    best_scores = queries.new_empty((num_queries, 0))
    best_positions = torch.empty((num_queries, 0), dtype=torch.long)
    # Reusing one score block per call spares the page faults of a fresh large allocation per chunk;
    # it is local to this call, so concurrent searches share nothing.
    score_block = np.empty((num_queries, min(chunk_rows, len(catalogue))), dtype=np.float32)
    for start in range(0, len(catalogue), chunk_rows):
        chunk = catalogue[start : start + chunk_rows]
        chunk_allowed = None if allowed is None else allowed[start : start + len(chunk)]
        allowed_rows = len(chunk) if chunk_allowed is None else int(np.count_nonzero(chunk_allowed))
        if allowed_rows == 0:
            continue
        if len(chunk) < score_block.shape[1]:
            score_block = np.empty((num_queries, len(chunk)), dtype=np.float32)
        if screen is not None:
            screen.score(query_matrix, start, start + len(chunk), score_block)
        else:
            _score_chunk(query_matrix, chunk, score_block)
        if allowed_rows < len(chunk):
            score_block[:, ~chunk_allowed] = -np.inf
        # At most `allowed_rows` candidates are real: asking for more would make the k-th score -inf and
        # turn the whole chunk into candidates.
        positions = _candidate_columns(score_block, min(k, allowed_rows), margin, with_torch) + start
        rescored = rescore_exactly(catalogue, queries_float64, positions)
        if allowed_rows < len(chunk):
            rescored[~allowed[positions]] = -np.inf  # candidates beyond the allowed rows fill the slack: drop them
        best_scores, best_positions = order_candidates(
            torch.cat([best_scores, torch.from_numpy(rescored)], dim=1),
            torch.cat([best_positions, torch.from_numpy(positions)], dim=1),
            k,
        )
    return best_scores, best_positions


class ScreeningCache:
    """When one index's exact searches screen with a float16 copy of its catalogue, and that copy.

    `setting` is `ProductIndex.set_backend(screening=...)`: None screens searches of up to
    `SCREENING_MAX_QUERIES` queries on in-memory catalogues of at least `SCREENING_MIN_ROWS` rows, True
    such searches on any catalogue, False none. The copy is made on the first search that screens and
    extended, converting only new rows, when rows were added since. A catalogue whose values float16 cannot
    hold turns screening off for good (with a warning); so does a CPU whose float16 kernel fails the
    `float16_kernel_sums_in_float32` probe. `lock` is the index's write lock: the copy grows under it.

    Example:
        >>> catalogue = np.eye(4, dtype=np.float32)
        >>> cache = ScreeningCache(threading.Lock())
        >>> cache.switch(True)
        >>> cache.screen_for(catalogue, 4, 1, latest=lambda: catalogue).count
        4
    """

    def __init__(self, lock: threading.Lock):
        self.setting: bool | None = None
        self.copy: Float16Screen | None = None
        self.failure: str | None = None
        self._lock = lock

    def switch(self, setting: bool | None) -> None:
        """Applies a new setting (None, True or False; the caller holds the lock); False frees the copy."""
        self.setting = setting
        if setting is False:
            self.copy = None

    def _screens(self, catalogue: np.ndarray, dim: int | None, num_queries: int) -> bool:
        if num_queries > SCREENING_MAX_QUERIES:
            return False
        if dim is None or self.failure is not None or self.setting is False:
            return False
        if self.setting is None and (len(catalogue) < SCREENING_MIN_ROWS or isinstance(catalogue, np.memmap)):
            return False
        return float16_kernel_sums_in_float32(dim)

    def screen_for(
        self, catalogue: np.ndarray, dim: int | None, num_queries: int, latest: Callable[[], np.ndarray]
    ) -> Float16Screen | None:
        """The float16 copy covering at least the rows of `catalogue`, made or extended on first need, or
        None when this search does not screen. `latest` returns the newest catalogue (called under the lock)."""
        if not self._screens(catalogue, dim, num_queries):
            return None
        screen = self.copy
        if screen is not None and screen.count >= len(catalogue):
            return screen
        with self._lock:
            # Rows below a catalogue snapshot's count never change, so the copy extends by converting only new rows.
            newest, screen = latest(), self.copy
            try:
                screen = (screen or Float16Screen.empty(newest.shape[1])).extended(newest)
            except ValueError as error:
                self.failure = str(error)
                logger.warning("exact search continues without float16 screening: %s", error)
                return None
            if self.setting is False:  # switched off after `_screens` said yes, before this thread got the lock
                return None
            self.copy = screen
        return screen


__all__ = [
    "SCREENING_MAX_QUERIES",
    "SCREENING_MIN_ROWS",
    "ScreeningCache",
    "default_chunk_rows",
    "exact_top_k",
    "order_candidates",
]
