"""Float16 screening for exact search: half the memory traffic, the same results.

A search with a few queries is a matrix-vector product bound by memory bandwidth: it streams every
catalogue row once. Streaming a float16 copy of the catalogue instead halves the bytes read. Each score
computed from the copy is within a proven `margin` of the exact inner product, so every row that can
still be in the exact top k has a screened score within `2 * margin` of the k-th best screened score;
`ProductIndex` rescores those few rows in float64 from the float32 catalogue. The result is the one a
full-precision search returns: the same products, the same scores, the same tie order.

The bound, for a float32 query q and catalogue row x with float16 copies q', x', and a kernel that
multiplies and sums in float32 and rounds the sum to float16:

    |screened - q.x| <= |q| |x - x'| + |q - q'| |x'|                 the copies
                        + 1.01 * dim * 2^-24 * |q'| |x'|              float32 summation, in any order
                        + 2^-11 * 1.01 * |q'| |x'| + 2^-25            rounding the sum to float16

`|x - x'|` and `|x'|` are measured over the copied rows (their maxima), not assumed. The summation term
holds only for a kernel that sums in float32: `float16_kernel_sums_in_float32` checks torch's kernel with
an input whose exact result only float32 summation reproduces, and screening stays off where it fails.

Example:
    >>> import numpy as np
    >>> catalogue = np.eye(4, dtype=np.float32)
    >>> screen = Float16Screen.empty(4).extended(catalogue)
    >>> screen.count, screen.row_error
    (4, 0.0)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch

# Catalogue values converted per step: the step's temporaries stay in the CPU caches (several times faster
# than large blocks), and a memory-mapped catalogue is paged through a small window.
CONVERT_BLOCK_ELEMENTS = 1 << 19
# Positions of the probe that carry its pattern: beyond ~1000 terms of about 1 its float32 partial sums
# would outgrow the 2^-14 resolution the pattern needs to be exact.
PROBE_PATTERN_LENGTH = 1024
PROBE_ROWS = 64


def _float32_summation_bound(dim: int) -> float:
    """gamma_dim = dim * u / (1 - dim * u) for float32 (u = 2^-24), rounded up."""
    return 1.01 * dim * 2.0**-24


class Float16Screen(NamedTuple):
    """A float16 copy of catalogue rows `[0, count)` and the measured size of its rounding.

    Snapshots are immutable to their readers: `extended` appends rows into spare capacity past `count`
    (invisible to earlier snapshots) or into a grown copy, never rewriting rows a reader can see.
    """

    storage: torch.Tensor  # (capacity, dim) float16
    count: int
    row_error: float  # max over rows of |x - x'|
    row_norm: float  # max over rows of |x'|

    @classmethod
    def empty(cls, dim: int) -> Float16Screen:
        return cls(torch.empty((0, dim), dtype=torch.float16), 0, 0.0, 0.0)

    @property
    def rows(self) -> torch.Tensor:
        return self.storage[: self.count]

    def extended(self, catalogue: np.ndarray) -> Float16Screen:
        """The screen of `catalogue`, whose first `self.count` rows must be the rows already copied."""
        count = len(catalogue)
        if count <= self.count:
            return self
        storage = self.storage
        if len(storage) < count:
            # The first copy is exact-sized; later growth doubles, as the catalogue's own storage does.
            capacity = count if self.count == 0 else max(count, 2 * self.count)
            storage = torch.empty((capacity, catalogue.shape[1]), dtype=torch.float16)
            storage[: self.count] = self.rows
        row_error, row_norm = self.row_error, self.row_norm
        # float32 norms of `dim` squares are within (dim + 2) * 2^-24 of exact: widen them past that.
        widen = 1 + catalogue.shape[1] * 2.0**-22
        block_rows = max(1, CONVERT_BLOCK_ELEMENTS // max(catalogue.shape[1], 1))
        for start in range(self.count, count, block_rows):
            block = torch.from_numpy(np.asarray(catalogue[start : start + block_rows], dtype=np.float32))
            copied = storage[start : start + len(block)]
            copied.copy_(block)
            widened = copied.float()
            # x - x' is exact in float32: x' is x rounded, so the two are within a factor of two. A value
            # float16 cannot hold (infinite, NaN, or too large) makes the error infinite or NaN.
            block_error = float(torch.linalg.vector_norm(block - widened, dim=1).max())
            if not math.isfinite(block_error):
                raise ValueError(f"rows {start} to {start + len(block) - 1} hold values float16 cannot represent")
            row_error = max(row_error, widen * block_error)
            row_norm = max(row_norm, widen * float(torch.linalg.vector_norm(widened, dim=1).max()))
        return Float16Screen(storage, count, row_error, row_norm)

    def margin(self, queries: np.ndarray) -> float:
        """The largest difference between a screened score of any of `queries` (float32 rows) and its exact
        inner product with any copied row (see the module docstring)."""
        exact = queries.astype(np.float64)
        rounded = torch.from_numpy(np.ascontiguousarray(queries)).to(torch.float16).double().numpy()
        query_norm = float(np.linalg.norm(exact, axis=1).max())
        query_error = float(np.linalg.norm(exact - rounded, axis=1).max())
        rounded_norm = float(np.linalg.norm(rounded, axis=1).max())
        product_bound = rounded_norm * self.row_norm
        return (
            query_norm * self.row_error
            + query_error * self.row_norm
            + _float32_summation_bound(queries.shape[1]) * product_bound
            + 2.0**-11 * 1.01 * product_bound
            + 2.0**-25
        )

    def score(self, queries: np.ndarray, start: int, stop: int, out: np.ndarray) -> None:
        """`out = screened (queries @ rows[start:stop].T)`, as float32."""
        half_queries = torch.from_numpy(np.ascontiguousarray(queries)).to(torch.float16)
        scores = torch.mm(half_queries, self.storage[start:stop].t())
        torch.from_numpy(out).copy_(scores)


@functools.cache
def _probe_result(dim: int, reduced_precision_allowed: bool) -> bool:
    del reduced_precision_allowed  # part of the cache key: the setting can change the kernel torch picks
    generator = torch.Generator().manual_seed(dim)
    pattern = min(dim, PROBE_PATTERN_LENGTH) // 2 * 2
    query = torch.zeros(dim, dtype=torch.float64)
    rows = torch.randn(PROBE_ROWS, dim, generator=generator, dtype=torch.float64) / dim**0.5
    # Even slots multiply to 1 + 2^-6 + 2^-14, odd slots to -(1 + 2^-6): float32 sums every partial sum
    # of these exactly, in any order, while float16 holds no 2^-14 next to a 1. The exact result,
    # (pattern / 2) * 2^-14, is a float16 number, so only the summation can change it.
    query[0:pattern:2], query[1:pattern:2] = 1 + 2.0**-7, 1 + 2.0**-6
    pattern_rows = torch.arange(0, PROBE_ROWS, 7)
    rows[pattern_rows] = 0.0
    rows[pattern_rows, 0:pattern:2], rows[pattern_rows, 1:pattern:2] = 1 + 2.0**-7, -1.0
    order = torch.randperm(dim, generator=generator)  # spreads the pattern over the kernel's lanes
    query, rows = query[order], rows[:, order]
    screened = torch.mm(query.half()[None], rows.half().t())[0]
    return bool((screened[pattern_rows].double() == pattern / 2 * 2.0**-14).all())


def float16_kernel_sums_in_float32(dim: int) -> bool:
    """Whether torch's float16 matrix product on this CPU sums in float32 for `dim`-wide rows, as the
    screening bound requires (checked once per width and setting with an input whose exact result only
    float32 summation reproduces)."""
    getter = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    return _probe_result(dim, bool(getter()) if getter is not None else False)


__all__ = ["Float16Screen", "float16_kernel_sums_in_float32"]
