"""Checks on the embeddings handed to a `ProductIndex`: float32 `(rows, dim)` matrices of unit rows.

The index scores by inner product, which is cosine similarity only for L2-normalised rows, so every
embedding that enters it (built, added, or searched with) is checked here first.

Example:
    >>> import torch
    >>> matrix = as_float32_matrix(torch.eye(3), "embeddings")
    >>> check_unit_rows(matrix, "embeddings")  # passes silently
    >>> matrix.dtype, matrix.shape
    (dtype('float32'), (3, 3))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Row norms further than this from 1 mean the caller forgot to normalise; half-precision encoders that
# normalise before casting back to float32 stay well inside it.
NORM_TOLERANCE = 1e-2


def as_float32_matrix(embeddings: Any, what: str) -> np.ndarray:
    """A C-contiguous `(rows, dim)` float32 numpy view of a tensor or array (copied only when needed).

    Example:
        >>> as_float32_matrix(np.ones((2, 4), dtype=np.float64), "embeddings").dtype
        dtype('float32')
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    elif not isinstance(embeddings, np.ndarray):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{what} must have shape (rows, dim), got shape {tuple(embeddings.shape)}")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def check_unit_rows(matrix: np.ndarray, what: str) -> None:
    """Raises `ValueError` unless every row of `matrix` is finite with an L2 norm within `NORM_TOLERANCE` of 1.

    Example:
        >>> check_unit_rows(np.full((1, 4), 0.5, dtype=np.float32), "query embeddings")
    """
    if matrix.size == 0:
        return
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=1)
    if np.abs(norms - 1.0).max() > NORM_TOLERANCE:
        raise ValueError(
            f"{what} must be L2-normalised (row norms range from {norms.min():.4g} to {norms.max():.4g}); "
            "normalise them, e.g. with torch.nn.functional.normalize(x, dim=-1)"
        )


def prepare_queries(query_embeddings: Any, dim: int | None) -> tuple[torch.Tensor, bool]:
    """Float32 CPU `(Q, dim)` queries, and whether a single `(dim,)` vector was given.

    Example:
        >>> queries, single = prepare_queries(torch.tensor([0.6, 0.8]), dim=2)
        >>> tuple(queries.shape), single
        ((1, 2), True)
    """
    if isinstance(query_embeddings, torch.Tensor):
        queries = query_embeddings.detach().to(device="cpu", dtype=torch.float32)
    elif isinstance(query_embeddings, np.ndarray):
        queries = torch.tensor(query_embeddings, dtype=torch.float32)
    else:
        raise TypeError(
            f"query embeddings must be a torch.Tensor or numpy array, got {type(query_embeddings).__name__}"
        )
    single = queries.dim() == 1
    if single:
        queries = queries.unsqueeze(0)
    if queries.dim() != 2:
        raise ValueError(f"query embeddings must have shape (dim,) or (queries, dim), got {tuple(queries.shape)}")
    if dim is not None and queries.shape[1] != dim:
        raise ValueError(
            f"query embeddings have dimension {queries.shape[1]} but this index holds dimension-{dim} vectors; "
            "encode queries with the model that built the index"
        )
    queries = queries.contiguous()
    check_unit_rows(queries.numpy(), "query embeddings")
    return queries, single


__all__ = ["NORM_TOLERANCE", "as_float32_matrix", "check_unit_rows", "prepare_queries"]
