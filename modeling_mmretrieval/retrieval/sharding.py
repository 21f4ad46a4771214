"""Sharded index builds: which rows each process encodes, and how the shards merge back in catalogue order.

Under `accelerate launch` (or any launcher) process `rank` of `world_size` passes `shard=(rank, world_size)`
to `ProductIndex.build`, which encodes only `shard_row_indices(...)` of the catalogue and records the split in
its directory. `ProductIndex.merge` then checks that the shards fit together (`merge_order`) and streams their
rows, in the order a single-process build gives, into one index (`merged_row_blocks`).

Example:
    >>> [list(shard_row_indices(5, rank, 2)) for rank in range(2)]
    [[0, 1, 2], [3, 4]]
    >>> [list(shard_row_indices(5, rank, 2, "strided")) for rank in range(2)]
    [[0, 2, 4], [1, 3]]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.rows import is_map_style_dataset, known_row_count
from .index_files import COPY_BLOCK_ROWS, IndexIntegrityError, IndexModelMismatchError, RowBlock

if TYPE_CHECKING:
    from .index import ProductIndex

SHARD_STRATEGIES = ("contiguous", "strided")


def shard_row_indices(total_rows: int, rank: int, world_size: int, strategy: str = "contiguous") -> range:
    """Row positions that process `rank` of `world_size` encodes in a sharded build.

    `"contiguous"` gives each rank one block (the first `total_rows % world_size` ranks get one extra row);
    `"strided"` gives rank `r` the rows `r, r + world_size, ...`. Either way the shards partition the rows.

    Example:
        >>> shard_row_indices(10, 1, 3)
        range(4, 7)
        >>> shard_row_indices(10, 1, 3, "strided")
        range(1, 10, 3)
    """
    if strategy == "contiguous":
        base, extra = divmod(total_rows, world_size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (rank < extra))
    if strategy == "strided":
        return range(rank, total_rows, world_size)
    raise ValueError(f"shard_strategy must be one of {SHARD_STRATEGIES}, got {strategy!r}")


def _validate_shard(shard: Sequence[int]) -> tuple[int, int]:
    try:
        rank, world_size = (int(value) for value in shard)
    except (TypeError, ValueError) as error:
        raise ValueError(f"shard must be a (rank, world_size) pair of integers, got {shard!r}") from error
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard rank must satisfy 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def select_shard(
    rows: Any, num_rows: int | None, shard: Sequence[int] | None, strategy: str
) -> tuple[Any, int | None, dict | None]:
    """The rows one process of a sharded build encodes, how many there are (None when unknown), and the
    shard description its index records; for `shard=None`, all of `rows`.

    `num_rows` is the catalogue's row count where `rows` has no `len()` (see `data.rows.known_row_count`).
    The other shards' rows are skipped without being read where the source allows (`Dataset.select`).

    Example:
        >>> rows, count, info = select_shard(iter(range(10)), 10, (1, 3), "contiguous")
        >>> list(rows), count, info["rank"]
        ([4, 5, 6], 3, 1)
    """
    if strategy not in SHARD_STRATEGIES:
        raise ValueError(f"shard_strategy must be one of {SHARD_STRATEGIES}, got {strategy!r}")
    total_rows = known_row_count(rows, num_rows)
    if shard is None:
        return rows, total_rows, None
    rank, world_size = _validate_shard(shard)
    info = {"rank": rank, "world_size": world_size, "strategy": strategy, "total_rows": total_rows}
    if total_rows is None:
        if strategy == "contiguous":
            raise ValueError(
                "contiguous sharding needs the number of rows: pass num_rows=... or shard_strategy='strided'"
            )
        return itertools.islice(rows, rank, None, world_size), None, info
    positions = shard_row_indices(total_rows, rank, world_size, strategy)
    if is_map_style_dataset(rows):
        return rows.select(positions), len(positions), info
    return itertools.islice(rows, positions.start, positions.stop, positions.step), len(positions), info


def merge_order(
    shards: Sequence[ProductIndex], sources: Sequence[str] | None = None
) -> tuple[list[ProductIndex], bool]:
    """Shards in catalogue order, and whether their rows interleave (strided) rather than concatenate.

    Raises unless the shards come from one model (the same `model_fingerprint` and `config_hash`; the model id,
    where each process loaded it from, may differ) and dimension and, for the shards of a sharded build, cover
    every rank once with the row counts the recorded split gives. Indexes without shard information keep the
    given order and concatenate. `sources` names the shards (their directories) in error messages.

    Example:
        >>> shards = [ProductIndex.load(directory) for directory in shard_dirs]  # doctest: +SKIP
        >>> ordered, strided = merge_order(shards, sources=shard_dirs)  # doctest: +SKIP
    """
    sources = list(sources) if sources is not None else [f"shard {number}" for number in range(len(shards))]
    reference = shards[0]
    for shard, source in zip(shards[1:], sources[1:]):
        if (shard.model_fingerprint, shard.config_hash) != (reference.model_fingerprint, reference.config_hash):
            raise IndexModelMismatchError(
                f"cannot merge shards built by different models: {sources[0]} has model_fingerprint="
                f"{reference.model_fingerprint!r} (config_hash={reference.config_hash!r}, from {reference.model_id!r}) "
                f"but {source} has {shard.model_fingerprint!r} (config_hash={shard.config_hash!r}, from "
                f"{shard.model_id!r}); rebuild every shard with the same model"
            )
    dims = {shard.dim for shard in shards if shard.dim is not None}
    if len(dims) > 1:
        raise ValueError(f"cannot merge shards of different embedding dimensions {sorted(dims)}")
    infos = [shard.shard_info for shard in shards]
    if all(info is None for info in infos):
        return list(shards), False
    if any(info is None for info in infos):
        raise ValueError("cannot merge shards of a sharded build with indexes that are not shards")
    layout = {(info["world_size"], info["strategy"], info["total_rows"]) for info in infos}
    if len(layout) > 1:
        raise ValueError(f"shards disagree on (world_size, strategy, total_rows): {sorted(layout, key=str)}")
    world_size, strategy, recorded_total = layout.pop()
    ranks = sorted(info["rank"] for info in infos)
    if ranks != list(range(world_size)):
        raise ValueError(
            f"a build over world_size={world_size} needs each rank 0..{world_size - 1} exactly once, got ranks {ranks}"
        )
    ordered = sorted(shards, key=lambda shard: shard.shard_info["rank"])
    total_rows = sum(len(shard) for shard in ordered)
    if recorded_total is not None and total_rows != recorded_total:
        raise IndexIntegrityError(f"shards hold {total_rows} rows in all but the build covered {recorded_total}")
    for rank, shard in enumerate(ordered):
        expected = len(shard_row_indices(total_rows, rank, world_size, strategy))
        if len(shard) != expected:
            raise IndexIntegrityError(
                f"shard {rank} holds {len(shard)} rows but a {strategy} split of {total_rows} rows gives it {expected}"
            )
    return ordered, strategy == "strided"


def shards_have_metadata(shards: Sequence[ProductIndex]) -> bool:
    """Whether the (non-empty) shards keep product metadata; raises when only some of them do."""
    flags = {shard.has_metadata for shard in shards if len(shard)}
    if len(flags) > 1:
        raise ValueError(
            "some shards keep product metadata and others do not; build them with the same metadata_columns"
        )
    return flags == {True}


def _concatenated_blocks(ordered: Sequence[ProductIndex]) -> Iterator[RowBlock]:
    for shard in ordered:
        for start in range(0, len(shard), COPY_BLOCK_ROWS):
            yield shard.row_block(start, start + COPY_BLOCK_ROWS)


def _interleaved_blocks(ordered: Sequence[ProductIndex]) -> Iterator[RowBlock]:
    """Global-order blocks of a strided build: global row i is row i // world of shard i % world."""
    world_size = len(ordered)
    dim = next((shard.dim for shard in ordered if shard.dim is not None), 0)
    with_metadata = shards_have_metadata(ordered)
    for start in range(0, len(ordered[0]), COPY_BLOCK_ROWS):
        parts = [shard.row_block(start, start + COPY_BLOCK_ROWS) for shard in ordered]
        # Earlier ranks hold at most one more row, so the filled slots always form a prefix.
        total = sum(len(ids) for _, ids, _ in parts)
        embeddings = np.empty((total, dim), dtype=np.float32)
        ids: list = [None] * total
        metadata: list | None = [None] * total if with_metadata else None
        for rank, (part_embeddings, part_ids, part_metadata) in enumerate(parts):
            if not part_ids:
                continue
            embeddings[rank::world_size] = part_embeddings
            ids[rank::world_size] = part_ids
            if metadata is not None:
                metadata[rank::world_size] = part_metadata
        yield embeddings, ids, metadata


def merged_row_blocks(ordered: Sequence[ProductIndex], strided: bool) -> Iterator[RowBlock]:
    """`(embeddings, ids, metadata)` blocks of the shards `merge_order` returned, in catalogue order."""
    return _interleaved_blocks(ordered) if strided else _concatenated_blocks(ordered)


__all__ = [
    "SHARD_STRATEGIES",
    "merge_order",
    "merged_row_blocks",
    "select_shard",
    "shard_row_indices",
    "shards_have_metadata",
]
