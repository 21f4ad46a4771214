"""Product index: the catalogue side of retrieval.

A `ProductIndex` stores one L2-normalised embedding per product together with its product id, and answers
top-k cosine-similarity queries. It knows nothing about the model: it is built from an `embed_batch`
callable that turns a list of catalogue rows into a `(batch, dim)` float tensor, so the same code indexes
with any encoder (the model glue supplies that callable).

On disk an index is a directory:

- `embeddings.f32`: the `(count, dim)` matrix, raw little-endian float32, row-major (memory-mappable);
- `ids.json`: the product ids, one per row, in row order;
- `metadata.jsonl` (optional): one small JSON object per row (e.g. the title, for display);
- `index_meta.json`: format version, `model_id`, `config_hash`, `count`, `dim`, dtype, sha256 checksums of
  the three files above, and the shard description for shards of a distributed build.

Directories are written atomically (a sibling temporary directory renamed into place) and verified on load.

Concurrency: `search` keeps no mutable scratch state, so many threads may search one index at once. `add`
is serialised by a lock and publishes new rows copy-on-grow, so searches running during an `add` see the
catalogue either before or after it, never a half-written row. Product ids live in a `ProductIdTable`
(`product_ids.py`), which publishes appended ids the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch

from .product_ids import DuplicateProductIdError, ProductId, ProductIdTable, validated_product_id
from .screening import Float16Screen, float16_kernel_sums_in_float32

INDEX_FORMAT = "mmretrieval-product-index"
INDEX_FORMAT_VERSION = 1
EMBEDDINGS_FILENAME = "embeddings.f32"
IDS_FILENAME = "ids.json"
METADATA_FILENAME = "metadata.jsonl"
META_FILENAME = "index_meta.json"

BACKENDS = ("exact", "faiss-flat", "faiss-hnsw")
SHARD_STRATEGIES = ("contiguous", "strided")

# Row norms further than this from 1 mean the caller forgot to normalise; half-precision encoders that
# normalise before casting back to float32 stay well inside it.
NORM_TOLERANCE = 1e-2
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
# its float16 copy (`screening.Float16Screen`): those searches are bound by memory bandwidth, and the
# copy is half the bytes. Larger batches are bound by arithmetic, where float16 on a CPU is slower.
SCREENING_MAX_QUERIES = 8
SCREENING_MIN_ROWS = 1 << 14
# Rows copied per step when saving, merging or hashing, so that memory-mapped catalogues stay paged out.
COPY_BLOCK_ROWS = 1 << 16
MAX_METADATA_FIELDS = 16
MAX_METADATA_CHARS = 256

EmbedBatchFn = Callable[[list[dict]], torch.Tensor]

logger = logging.getLogger(__name__)


class IndexIntegrityError(ValueError):
    """The files of a saved index are missing, truncated, corrupted or inconsistent with each other."""


class IndexModelMismatchError(ValueError):
    """An index was built with another model id or model configuration than the one expected."""


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


def _bounded_metadata(values: Mapping[str, Any] | None) -> dict[str, str | None]:
    """Small display strings only: the index is not a document store."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"product metadata must be a mapping of field name to value, got {type(values).__name__}")
    if len(values) > MAX_METADATA_FIELDS:
        raise ValueError(f"product metadata holds at most {MAX_METADATA_FIELDS} fields, got {len(values)}")
    return {str(field): None if value is None else str(value)[:MAX_METADATA_CHARS] for field, value in values.items()}


def _as_float32_matrix(embeddings: Any, what: str) -> np.ndarray:
    """A C-contiguous `(rows, dim)` float32 numpy view of a tensor or array (copied only when needed)."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    elif not isinstance(embeddings, np.ndarray):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(f"{what} must have shape (rows, dim), got shape {tuple(embeddings.shape)}")
    return np.ascontiguousarray(embeddings, dtype=np.float32)


def _check_unit_rows(matrix: np.ndarray, what: str) -> None:
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


def _prepare_queries(query_embeddings: Any, dim: int | None) -> tuple[torch.Tensor, bool]:
    """Float32 CPU `(Q, dim)` queries, and whether a single `(dim,)` vector was given."""
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
    _check_unit_rows(queries.numpy(), "query embeddings")
    return queries, single


def _validate_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _default_chunk_rows(num_queries: int) -> int:
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


def _order_candidates(scores: torch.Tensor, positions: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `k` candidates per row, by score descending and, among equal scores, catalogue position.
    Negative positions (slots a faiss search left empty, scored -inf) rank last."""
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
    bandwidth on Intel and AMD alike, where the MKL in torch's CPU wheel takes about twice as long on AMD
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


def _rescore(catalogue: np.ndarray, queries: np.ndarray, positions: np.ndarray) -> np.ndarray:
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


def _exact_top_k(
    catalogue: np.ndarray, queries: torch.Tensor, k: int, chunk_rows: int, screen: Float16Screen | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products, ties broken by catalogue order, in O(queries x chunk_rows) memory.

    Each catalogue chunk is scored with one float32 matrix product, or against `screen`, the catalogue's
    float16 copy. Every row that could still be in the top k given those scores' error bound is rescored
    exactly, then merged into the running top k, so both ways return the same results.
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
        if len(chunk) < score_block.shape[1]:
            score_block = np.empty((num_queries, len(chunk)), dtype=np.float32)
        if screen is not None:
            screen.score(query_matrix, start, start + len(chunk), score_block)
        else:
            _score_chunk(query_matrix, chunk, score_block)
        positions = _candidate_columns(score_block, k, margin, with_torch) + start
        best_scores, best_positions = _order_candidates(
            torch.cat([best_scores, torch.from_numpy(_rescore(catalogue, queries_float64, positions))], dim=1),
            torch.cat([best_positions, torch.from_numpy(positions)], dim=1),
            k,
        )
    return best_scores, best_positions


def _sha256_of_rows(matrix: np.ndarray) -> str:
    digest = hashlib.sha256()
    for start in range(0, len(matrix), COPY_BLOCK_ROWS):
        digest.update(np.ascontiguousarray(matrix[start : start + COPY_BLOCK_ROWS]).data)
    return digest.hexdigest()


def _is_map_style_dataset(rows: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(rows, datasets.Dataset)


def _known_row_count(rows: Any, num_rows: int | None) -> int | None:
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


def _select_shard(
    rows: Any, total_rows: int | None, rank: int, world_size: int, strategy: str
) -> tuple[Any, int | None]:
    """The rows of one shard (without reading the others' images where the source allows) and their count."""
    if total_rows is None:
        if strategy == "contiguous":
            raise ValueError(
                "contiguous sharding needs the number of rows: pass num_rows=... or shard_strategy='strided'"
            )
        return itertools.islice(rows, rank, None, world_size), None
    positions = shard_row_indices(total_rows, rank, world_size, strategy)
    if _is_map_style_dataset(rows):
        return rows.select(positions), len(positions)
    return itertools.islice(rows, positions.start, positions.stop, positions.step), len(positions)


def row_batches(rows: Any, batch_size: int) -> Iterator[list[dict]]:
    """Lists of up to `batch_size` row dicts from a `datasets.Dataset` or any iterable of rows."""
    if _is_map_style_dataset(rows):
        # Column-batched reads are much faster than row access, and still decode one batch of images.
        for columns in rows.iter(batch_size=batch_size):
            names = list(columns)
            yield [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]
        return
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


def _row_product_id(row: Mapping, id_column: str, row_number: int) -> ProductId:
    if not isinstance(row, Mapping):
        raise TypeError(f"row {row_number} is a {type(row).__name__}, expected a dict")
    if id_column not in row:
        raise KeyError(f"row {row_number} has no {id_column!r} column (its keys are {sorted(row)})")
    return validated_product_id(row[id_column])


def fsync_path(path: Path) -> None:
    """Flushes a file's or a directory's entry to disk (a rename is durable once its directory is synced)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _atomic_directory(target: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields an empty staging directory beside `target` and renames it onto `target` on success, so
    readers see either the previous directory or the complete new one."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; pass overwrite=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        fsync_path(staging)
        if target.is_dir() and any(target.iterdir()):
            retired = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.rename(target, retired)
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _json_array_items(values: Sequence, follow_earlier_items: bool) -> bytes:
    """UTF-8 JSON of `values` as a stretch of a JSON array written in parts: `json.dumps` of a whole list is
    "[", its items joined by ", ", then "]", so the parts add up to exactly the bytes of dumping it at once."""
    items = json.dumps(list(values), ensure_ascii=False)[1:-1]
    return (", " + items if follow_earlier_items else items).encode("utf-8")


class _HashedFile:
    """A file being written whose sha256 is computed from the bytes as they are written."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self._digest = hashlib.sha256()

    def write(self, payload: bytes | memoryview) -> None:
        self.handle.write(payload)
        self._digest.update(payload)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class _IndexWriter:
    """Streams rows of an index into open files in order, hashing the bytes as they are written, so a
    catalogue of any size is written with the memory of one block of rows (and a compact table of the ids,
    to refuse duplicates). Open one with `_index_writer`."""

    def __init__(
        self, directory: Path, embeddings_file: BinaryIO, ids_file: BinaryIO, metadata_file: BinaryIO | None
    ):
        self.directory = directory
        self.dim: int | None = None
        self._ids = ProductIdTable()
        self._embeddings_file = _HashedFile(embeddings_file)
        self._ids_file = _HashedFile(ids_file)
        self._metadata_file = None if metadata_file is None else _HashedFile(metadata_file)
        self._ids_file.write(b"[")

    @property
    def count(self) -> int:
        return len(self._ids)

    def append(
        self, embeddings: np.ndarray, ids: Sequence[ProductId], metadata: Sequence[Mapping] | None = None
    ) -> None:
        if len(embeddings) != len(ids):
            raise ValueError(f"got {len(embeddings)} embeddings for {len(ids)} product ids")
        if not len(ids):
            return
        if self.dim is None:
            self.dim = embeddings.shape[1]
        elif embeddings.shape[1] != self.dim:
            raise ValueError(f"embedding dimension changed from {self.dim} to {embeddings.shape[1]} while indexing")
        ids_json = _json_array_items(ids, follow_earlier_items=bool(self.count))
        self._ids.append(ids)
        self._embeddings_file.write(np.ascontiguousarray(embeddings, dtype="<f4").data)
        self._ids_file.write(ids_json)
        if self._metadata_file is not None:
            lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in metadata)
            self._metadata_file.write(lines.encode("utf-8"))

    def finish(self, *, model_id: str | None, config_hash: str | None, shard_info: dict | None) -> dict:
        """Closes the ids' JSON array and writes `index_meta.json` (last, so its presence marks a complete
        directory)."""
        self._ids_file.write(b"]")
        for file in (self._embeddings_file, self._ids_file, self._metadata_file):
            if file is not None:
                _flush_durably(file.handle)
        meta = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "model_id": model_id,
            "config_hash": config_hash,
            "count": self.count,
            "dim": self.dim,
            "dtype": "float32",
            "byte_order": "little",
            "embeddings_sha256": self._embeddings_file.hexdigest(),
            "ids_sha256": self._ids_file.hexdigest(),
            "metadata_sha256": None if self._metadata_file is None else self._metadata_file.hexdigest(),
            "shard": shard_info,
        }
        _write_durably(self.directory / META_FILENAME, json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
        return meta


@contextlib.contextmanager
def _index_writer(directory: Path, *, with_metadata: bool) -> Iterator[_IndexWriter]:
    with contextlib.ExitStack() as files:
        embeddings_file = files.enter_context(open(directory / EMBEDDINGS_FILENAME, "wb"))
        ids_file = files.enter_context(open(directory / IDS_FILENAME, "wb"))
        metadata_file = files.enter_context(open(directory / METADATA_FILENAME, "wb")) if with_metadata else None
        yield _IndexWriter(directory, embeddings_file, ids_file, metadata_file)


def _flush_durably(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _write_durably(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        _flush_durably(handle)


def _encode_rows(
    directory: Path,
    batches: Iterable[list[dict]],
    embed_batch: EmbedBatchFn,
    *,
    id_column: str,
    metadata_columns: Sequence[str] | None,
    expected_rows: int | None,
    progress: Any,
    meta_fields: dict,
) -> None:
    """Encodes `batches` into a complete index directory; the writer's id bookkeeping is freed on return."""
    with _index_writer(directory, with_metadata=bool(metadata_columns)) as writer:
        for batch in batches:
            ids = [_row_product_id(row, id_column, writer.count + offset) for offset, row in enumerate(batch)]
            embeddings = _as_float32_matrix(embed_batch(batch), "embed_batch output")
            if len(embeddings) != len(batch):
                raise ValueError(f"embed_batch returned {len(embeddings)} embeddings for {len(batch)} rows")
            _check_unit_rows(embeddings, "embed_batch output")
            metadata = None
            if metadata_columns:
                metadata = [_bounded_metadata({name: row.get(name) for name in metadata_columns}) for row in batch]
            writer.append(embeddings, ids, metadata)
            progress.update(len(batch))
        if expected_rows is not None and writer.count != expected_rows:
            raise ValueError(f"expected {expected_rows} rows but the rows iterable yielded {writer.count}")
        writer.finish(**meta_fields)


class _IndexFiles(NamedTuple):
    meta: dict
    embeddings: np.ndarray
    ids: ProductIdTable
    metadata: list | None


# Every key the writer emits; a meta file missing one (or carrying another) was edited or corrupted.
_META_KEYS = frozenset({
    "format", "format_version", "model_id", "config_hash", "count", "dim", "dtype", "byte_order",
    "embeddings_sha256", "ids_sha256", "metadata_sha256", "shard",
})


def _read_meta(directory: Path) -> dict:
    if not directory.is_dir():
        raise FileNotFoundError(f"no product index directory at {directory}")
    path = directory / META_FILENAME
    if not path.is_file():
        raise IndexIntegrityError(
            f"{directory} has no {META_FILENAME}: it is not a product index or was not completely written"
        )
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexIntegrityError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise IndexIntegrityError(f"{path} does not describe a {INDEX_FORMAT}")
    if set(meta) != _META_KEYS:
        missing, unknown = sorted(_META_KEYS - set(meta)), sorted(set(meta) - _META_KEYS)
        raise IndexIntegrityError(f"{path} was edited or corrupted: missing keys {missing}, unknown keys {unknown}")
    if meta.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexIntegrityError(
            f"{path} has format version {meta.get('format_version')!r}; this code reads version {INDEX_FORMAT_VERSION}"
        )
    count, dim = meta.get("count"), meta.get("dim")
    if not isinstance(count, int) or count < 0 or not (isinstance(dim, int) and dim > 0 or dim is None and count == 0):
        raise IndexIntegrityError(f"{path} has an invalid count/dim: count={count!r}, dim={dim!r}")
    if meta.get("dtype") != "float32" or meta.get("byte_order") != "little":
        raise IndexIntegrityError(
            f"{path} declares dtype {meta.get('dtype')!r}/{meta.get('byte_order')!r}; expected little-endian float32"
        )
    return meta


def _check_provenance(
    meta: dict, expected_model_id: str | None, expected_config_hash: str | None, source: Any
) -> None:
    for field, expected in (("model_id", expected_model_id), ("config_hash", expected_config_hash)):
        if expected is not None and meta.get(field) != expected:
            raise IndexModelMismatchError(
                f"{source} was built with {field}={meta.get(field)!r} but {expected!r} was expected; "
                "rebuild the index with the current model"
            )


def _check_embeddings_size(directory: Path, meta: dict) -> None:
    path = directory / EMBEDDINGS_FILENAME
    if not path.is_file():
        raise IndexIntegrityError(f"{path} is missing")
    count, dim = meta["count"], meta["dim"] or 0
    expected_bytes = count * dim * 4
    actual_bytes = path.stat().st_size
    if actual_bytes != expected_bytes:
        raise IndexIntegrityError(
            f"{path} holds {actual_bytes} bytes but count={count} x dim={dim} float32 needs {expected_bytes}: "
            "the file is truncated, has trailing data, or belongs to another index"
        )


def _read_embeddings(directory: Path, meta: dict, *, mmap: bool, verify_checksums: bool) -> np.ndarray:
    """The embedding matrix of a directory whose file size `_check_embeddings_size` has accepted."""
    path = directory / EMBEDDINGS_FILENAME
    shape = (meta["count"], meta["dim"] or 0)
    if shape[0] * shape[1] == 0:
        embeddings = np.zeros(shape, dtype=np.float32)
    elif mmap:
        # Copy-on-write mapping: pages stay shared with the file, and torch can wrap it without warnings.
        embeddings = np.memmap(path, dtype="<f4", mode="c", shape=shape)
    else:
        embeddings = np.fromfile(path, dtype="<f4").reshape(shape)
    if verify_checksums and _sha256_of_rows(embeddings) != meta.get("embeddings_sha256"):
        raise IndexIntegrityError(f"{path} does not match its sha256 checksum: the embeddings are corrupted")
    return embeddings


def _read_checked_bytes(path: Path, expected_sha256: str | None) -> bytes:
    if not path.is_file():
        raise IndexIntegrityError(f"{path} is missing")
    payload = path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != expected_sha256:
        raise IndexIntegrityError(f"{path} does not match its sha256 checksum: it was edited or corrupted")
    return payload


def _read_ids(directory: Path, meta: dict) -> ProductIdTable:
    path = directory / IDS_FILENAME
    ids = json.loads(_read_checked_bytes(path, meta.get("ids_sha256")).decode("utf-8"))
    if not isinstance(ids, list) or len(ids) != meta["count"]:
        raise IndexIntegrityError(f"{path} must list exactly count={meta['count']} product ids")
    try:
        return ProductIdTable(ids)
    except (DuplicateProductIdError, TypeError) as error:
        raise IndexIntegrityError(f"{IDS_FILENAME} holds invalid product ids: {error}") from error


def _read_metadata(directory: Path, meta: dict) -> list | None:
    path = directory / METADATA_FILENAME
    if meta["metadata_sha256"] is None:
        if path.exists():
            raise IndexIntegrityError(f"{path} exists but {META_FILENAME} declares no metadata: the meta file was edited")
        return None
    # Only "\n" ends a row: JSON text may hold U+2028/U+0085, which `str.splitlines` would also split on.
    payload = _read_checked_bytes(path, meta["metadata_sha256"]).decode("utf-8")
    lines = payload.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != meta["count"]:
        raise IndexIntegrityError(f"{path} has {len(lines)} rows but the index has count={meta['count']}")
    rows = []
    for number, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise IndexIntegrityError(f"{path} row {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise IndexIntegrityError(f"{path} row {number} is not a JSON object")
        rows.append(row)
    return rows


def _read_index_directory(
    directory: Path,
    *,
    mmap: bool,
    verify_checksums: bool,
    expected_model_id: str | None = None,
    expected_config_hash: str | None = None,
) -> _IndexFiles:
    meta = _read_meta(directory)
    _check_provenance(meta, expected_model_id, expected_config_hash, f"the index at {directory}")
    # A wrong count shows first in the embeddings' size, which is cheap to check. The ids are read before the
    # matrix: their parsed list (an object per id) is gone, kept as a compact table, before the matrix is read.
    _check_embeddings_size(directory, meta)
    ids = _read_ids(directory, meta)
    return _IndexFiles(
        meta=meta,
        embeddings=_read_embeddings(directory, meta, mmap=mmap, verify_checksums=verify_checksums),
        ids=ids,
        metadata=_read_metadata(directory, meta),
    )


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the 'faiss-flat' and 'faiss-hnsw' index backends need faiss; install it with `pip install faiss-cpu` "
            "(or use backend='exact')"
        ) from error
    return faiss


class _HNSWOptions(NamedTuple):
    neighbors: int = 32
    ef_construction: int = 200
    ef_search: int = 128


class _FaissSearcher:
    """A faiss index over one snapshot of the catalogue (faiss copies the vectors)."""

    def __init__(self, backend: str, catalogue: np.ndarray, hnsw: _HNSWOptions):
        faiss = _import_faiss()
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

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, labels = self._index.search(queries.numpy(), k)
        scores, labels = torch.from_numpy(scores), torch.from_numpy(labels)
        # Graph search can come back short; missing slots (label -1) sort last.
        scores = scores.masked_fill(labels < 0, float("-inf"))
        return _order_candidates(scores, labels, k)


class _CatalogueState(NamedTuple):
    """One immutable view of the catalogue; `add` publishes a new one instead of mutating visible rows."""

    storage: np.ndarray
    count: int
    dim: int | None

    @property
    def vectors(self) -> np.ndarray:
        return self.storage[: self.count]


class ProductIndex:
    """L2-normalised product embeddings plus product ids, with exact or faiss top-k cosine search.

    Build one with `ProductIndex.build` (streams a catalogue through an encoder), `ProductIndex.load`
    (a saved directory) or `ProductIndex.from_embeddings` (vectors already in memory).

    Example:
        >>> import torch
        >>> vectors = torch.nn.functional.normalize(torch.randn(1000, 64), dim=-1)
        >>> index = ProductIndex.from_embeddings(vectors, [f"sku-{i}" for i in range(1000)])
        >>> scores, ids = index.search(vectors[:2], k=5)
        >>> ids[0][0], ids[1][0]
        ('sku-0', 'sku-1')
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[ProductId] | ProductIdTable,
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        model_id: str | None = None,
        config_hash: str | None = None,
        shard_info: dict | None = None,
        backend: str = "exact",
    ):
        if embeddings.ndim != 2 or len(embeddings) != len(ids):
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)} do not match {len(ids)} product ids")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata rows for {len(ids)} product ids")
        self.model_id = model_id
        self.config_hash = config_hash
        self.shard_info = shard_info
        self._write_lock = threading.Lock()
        # A table given here (as `load` does) becomes the index's own: nothing else may append to it.
        self._id_table = ids if isinstance(ids, ProductIdTable) else ProductIdTable(ids)
        self._metadata = None if metadata is None else [_bounded_metadata(row) for row in metadata]
        dim = embeddings.shape[1] if embeddings.shape[1] else None
        self._state = _CatalogueState(storage=embeddings, count=len(self._id_table), dim=dim)
        self._faiss_searchers: dict[str, _FaissSearcher] = {}
        self._hnsw = _HNSWOptions()
        self._screen: Float16Screen | None = None
        self._screening_failure: str | None = None
        self.screening: bool | None = None
        self.set_backend(backend)

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor | np.ndarray,
        ids: Sequence[ProductId],
        *,
        metadata: Sequence[Mapping[str, Any]] | None = None,
        model_id: str | None = None,
        config_hash: str | None = None,
        backend: str = "exact",
    ) -> ProductIndex:
        """An in-memory index over `(N, D)` L2-normalised `embeddings` (copied) with one id per row.

        Example:
            >>> index = ProductIndex.from_embeddings(torch.eye(3), ["a", "b", "c"], metadata=[{"title": "A"}] * 3)
            >>> index.metadata_for("b")
            {'title': 'A'}
        """
        vectors = _as_float32_matrix(embeddings, "embeddings").copy()
        _check_unit_rows(vectors, "embeddings")
        return cls(vectors, list(ids), metadata=metadata, model_id=model_id, config_hash=config_hash, backend=backend)

    @classmethod
    def build(
        cls,
        rows: Iterable[Mapping[str, Any]],
        embed_batch: EmbedBatchFn,
        *,
        output_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        id_column: str = "product_id",
        model_id: str | None = None,
        config_hash: str | None = None,
        show_progress: bool = True,
        num_rows: int | None = None,
        shard: tuple[int, int] | None = None,
        shard_strategy: str = "contiguous",
        metadata_columns: Sequence[str] | None = None,
        overwrite: bool = False,
        mmap: bool = True,
    ) -> ProductIndex:
        """Encodes a catalogue batch by batch and indexes it.

        `rows` is a `datasets.Dataset` or any iterable of dict rows (a generator, a streaming dataset); it is
        read one batch at a time and `embed_batch(list_of_rows)` must return a `(len(rows), dim)` tensor of
        L2-normalised embeddings. Embeddings are streamed to a file as they are produced, so memory holds one
        batch of rows plus the ids (and, for an in-memory index, the final matrix).

        Args:
            output_dir: where to save the index (written atomically, then memory-mapped when `mmap`); when
                None the index is kept in memory.
            id_column: the row key holding the product id (str or int, unique).
            model_id, config_hash: provenance recorded in the index and checked by `load`.
            num_rows: the row count of an iterable without `len()`, for the progress bar and contiguous
                sharding; the build fails if `rows` yields a different number of rows.
            shard: `(rank, world_size)` to encode only this process's share of the rows (see
                `shard_row_indices` and `shard_strategy`); combine the shard directories with `merge`.
            metadata_columns: row keys to keep as small display strings (e.g. `("title",)`).

        Example:
            >>> rows = ({"product_id": f"sku-{i}", "title": f"product {i}"} for i in range(100))
            >>> def embed_batch(batch):
            ...     return torch.nn.functional.normalize(torch.randn(len(batch), 32), dim=-1)
            >>> index = ProductIndex.build(rows, embed_batch, batch_size=16, show_progress=False)
            >>> len(index), index.dim
            (100, 32)
        """
        from tqdm.auto import tqdm

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shard_strategy not in SHARD_STRATEGIES:
            raise ValueError(f"shard_strategy must be one of {SHARD_STRATEGIES}, got {shard_strategy!r}")
        total_rows = _known_row_count(rows, num_rows)
        expected_rows, shard_info = total_rows, None
        if shard is not None:
            rank, world_size = _validate_shard(shard)
            rows, expected_rows = _select_shard(rows, total_rows, rank, world_size, shard_strategy)
            shard_info = {"rank": rank, "world_size": world_size, "strategy": shard_strategy, "total_rows": total_rows}
        if output_dir is None:
            staging_context = tempfile.TemporaryDirectory(prefix="mmretrieval-index-")
        else:
            staging_context = _atomic_directory(output_dir, overwrite)
        progress = tqdm(total=expected_rows, unit="product", desc="Indexing products", disable=not show_progress)
        with progress, staging_context as staging:
            staging = Path(staging)
            _encode_rows(
                staging,
                row_batches(rows, batch_size),
                embed_batch,
                id_column=id_column,
                metadata_columns=metadata_columns,
                expected_rows=expected_rows,
                progress=progress,
                meta_fields={"model_id": model_id, "config_hash": config_hash, "shard_info": shard_info},
            )
            if output_dir is None:
                return cls._from_files(_read_index_directory(staging, mmap=False, verify_checksums=False))
        return cls._from_files(_read_index_directory(Path(output_dir), mmap=mmap, verify_checksums=False))

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expected_model_id: str | None = None,
        expected_config_hash: str | None = None,
        mmap: bool = True,
        verify_checksums: bool = True,
        backend: str = "exact",
    ) -> ProductIndex:
        """Opens a saved index, verifying its files.

        Raises `IndexModelMismatchError` when `expected_model_id` / `expected_config_hash` differ from those
        recorded at build time, and `IndexIntegrityError` when a file is missing, truncated, edited or fails
        its checksum. `verify_checksums=False` skips hashing the embeddings (a full read) for very large
        indexes; sizes and the ids' checksum are still checked. With `mmap` the matrix is paged in on demand.

        Example:
            >>> index = ProductIndex.load("catalogue_index", expected_model_id="my-org/mmretrieval")  # doctest: +SKIP
        """
        files = _read_index_directory(
            Path(directory),
            mmap=mmap,
            verify_checksums=verify_checksums,
            expected_model_id=expected_model_id,
            expected_config_hash=expected_config_hash,
        )
        return cls._from_files(files, backend=backend)

    @classmethod
    def _from_files(cls, files: _IndexFiles, backend: str = "exact") -> ProductIndex:
        return cls(
            files.embeddings,
            files.ids,
            metadata=files.metadata,
            model_id=files.meta["model_id"],
            config_hash=files.meta["config_hash"],
            shard_info=files.meta.get("shard"),
            backend=backend,
        )

    @classmethod
    def merge(
        cls,
        shard_dirs: Sequence[str | os.PathLike],
        output_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        mmap: bool = True,
    ) -> ProductIndex:
        """Combines the shard directories of a sharded `build` into one saved index.

        Shards must come from one model (same model id, config hash and dim), cover every rank exactly once
        with consistent row counts, and hold disjoint product ids. Rows are put back in the catalogue order a
        single-process build would give, whatever order `shard_dirs` is in. Indexes without shard information
        are concatenated in the given order instead.

        Example:
            >>> merged = ProductIndex.merge(["index-rank0", "index-rank1"], "index")  # doctest: +SKIP
        """
        if not shard_dirs:
            raise ValueError("merge needs at least one shard directory")
        shards = [cls.load(directory) for directory in shard_dirs]
        ordered, strided = _merge_order(shards)
        with_metadata = _shards_have_metadata(shards)
        with (
            _atomic_directory(output_dir, overwrite) as staging,
            _index_writer(staging, with_metadata=with_metadata) as writer,
        ):
            blocks = _interleaved_blocks(ordered) if strided else _concatenated_blocks(ordered)
            for embeddings, ids, metadata in blocks:
                writer.append(embeddings, ids, metadata)
            writer.finish(model_id=shards[0].model_id, config_hash=shards[0].config_hash, shard_info=None)
        return cls._from_files(_read_index_directory(Path(output_dir), mmap=mmap, verify_checksums=False))

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes the index to `directory` atomically (refusing a non-empty one unless `overwrite`).

        Example:
            >>> index.save(tmp_path / "catalogue_index")  # doctest: +SKIP
        """
        state = self._state
        with (
            _atomic_directory(directory, overwrite) as staging,
            _index_writer(staging, with_metadata=self._metadata is not None) as writer,
        ):
            for start in range(0, state.count, COPY_BLOCK_ROWS):
                writer.append(*self._rows(start, min(start + COPY_BLOCK_ROWS, state.count), state))
            writer.finish(model_id=self.model_id, config_hash=self.config_hash, shard_info=self.shard_info)
        return Path(directory)

    def set_backend(
        self,
        backend: str,
        *,
        hnsw_neighbors: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        screening: bool | None = None,
    ) -> ProductIndex:
        """Chooses how `search` ranks: `"exact"` (default), `"faiss-flat"` (exact, faiss kernels) or
        `"faiss-hnsw"` (approximate graph search). faiss indexes are built on first use, hold their own copy
        of the vectors, and are rebuilt after `add`. faiss parallelises each call with OpenMP; where many
        threads search at once, `faiss.omp_set_num_threads(1)` avoids oversubscribing the cores. Returns the
        index.

        `screening` applies to `"exact"` searches of up to `SCREENING_MAX_QUERIES` queries: they score a
        float16 copy of the catalogue (half the bytes to stream, so about twice as fast) and rescore the rows
        that can still make the top k, so their results are identical to full-precision ones. The copy is made
        on the first such search and costs half the catalogue's memory again. `None` (default) screens
        in-memory catalogues of at least `SCREENING_MIN_ROWS` rows and leaves memory-mapped ones alone;
        `True` screens any catalogue; `False` never does.

        Example:
            >>> index.set_backend("faiss-hnsw", hnsw_ef_search=256)  # doctest: +SKIP
            >>> index.set_backend("exact", screening=False)  # doctest: +SKIP
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if screening not in (None, True, False):
            raise ValueError(f"screening must be None, True or False, got {screening!r}")
        if backend != "exact":
            _import_faiss()
        with self._write_lock:
            self._hnsw = _HNSWOptions(hnsw_neighbors, hnsw_ef_construction, hnsw_ef_search)
            self.backend = backend
            self.screening = screening
            if screening is False:
                self._screen = None  # frees the copy
        return self

    def __len__(self) -> int:
        return self._state.count

    def __contains__(self, product_id: object) -> bool:
        return self.position_of(product_id) is not None

    def __repr__(self) -> str:
        return f"ProductIndex(count={len(self)}, dim={self.dim}, model_id={self.model_id!r}, backend={self.backend!r})"

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

    def search(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 100,
        *,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, list]:
        """Top-k products by cosine similarity for L2-normalised query embeddings.

        Returns `(scores, ids)`: for `(Q, D)` queries a `(Q, k)` float tensor and Q lists of k product ids;
        for one `(D,)` vector a `(k,)` tensor and one list. `k` is capped at the catalogue size. Ties are
        broken by catalogue order. `chunk_size` (catalogue rows scored per step of the exact search) defaults
        to a block of about 64 MiB of scores. Slots a faiss-hnsw search could not fill have score -inf and id
        None. See `search_positions` for row positions instead of ids.

        Example:
            >>> scores, ids = index.search(query_embeddings, k=10)  # doctest: +SKIP
        """
        scores, positions = self.search_positions(query_embeddings, k, chunk_size=chunk_size, backend=backend)
        ids = self._id_table
        if positions.dim() == 1:
            return scores, [ids[position] if position >= 0 else None for position in positions.tolist()]
        return scores, [[ids[position] if position >= 0 else None for position in row] for row in positions.tolist()]

    def search_positions(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 100,
        *,
        chunk_size: int | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `search`, but returns catalogue row positions (a long tensor, -1 for unfilled slots)."""
        state = self._state
        queries, single = _prepare_queries(query_embeddings, state.dim)
        k = min(_validate_k(k), state.count)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if k == 0 or len(queries) == 0:
            scores, positions = queries.new_empty((len(queries), k)), torch.empty((len(queries), k), dtype=torch.long)
        elif backend == "exact":
            screen = self._screen_for(state) if len(queries) <= SCREENING_MAX_QUERIES else None
            scores, positions = _exact_top_k(
                state.vectors, queries, k, chunk_size or _default_chunk_rows(len(queries)), screen
            )
        else:
            scores, positions = self._faiss_searcher(backend).search(queries, k)
        return (scores[0], positions[0]) if single else (scores, positions)

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
        vectors = _as_float32_matrix(embeddings, "added embeddings")
        ids = [validated_product_id(product_id) for product_id in ids]
        if len(vectors) != len(ids):
            raise ValueError(f"got {len(vectors)} embeddings for {len(ids)} product ids")
        if metadata is not None and len(metadata) != len(ids):
            raise ValueError(f"got {len(metadata)} metadata rows for {len(ids)} product ids")
        _check_unit_rows(vectors, "added embeddings")
        # Checked before the ids are appended: an add that fails after that would leave the id table ahead
        # of the rows.
        metadata_rows = None if metadata is None else [_bounded_metadata(row) for row in metadata]
        with self._write_lock:
            state = self._state
            if state.dim is not None and vectors.shape[1] != state.dim:
                raise ValueError(
                    f"added embeddings have dimension {vectors.shape[1]} but the index holds dimension {state.dim}"
                )
            storage = self._storage_with_room(state, len(ids), vectors.shape[1])
            # Raises on a duplicate without changing the table. The new ids' positions are state.count
            # onwards, which `position_of` and `ids` hide until the new state is published.
            self._id_table.append(ids)
            if metadata_rows is not None and self._metadata is None:
                self._metadata = [{} for _ in range(state.count)]
            if self._metadata is not None:
                self._metadata.extend(metadata_rows if metadata_rows is not None else [{} for _ in ids])
            # Rows past state.count are invisible to readers of the current state, so filling them is safe.
            storage[state.count : state.count + len(ids)] = vectors
            self._state = _CatalogueState(storage, state.count + len(ids), vectors.shape[1])

    def _storage_with_room(self, state: _CatalogueState, extra_rows: int, dim: int) -> np.ndarray:
        needed = state.count + extra_rows
        storage = state.storage
        if (
            not isinstance(storage, np.memmap)
            and storage.flags.writeable
            and len(storage) >= needed
            and storage.shape[1] == dim
        ):
            return storage
        grown = np.empty((max(needed, 2 * state.count), dim), dtype=np.float32)
        if state.count:
            grown[: state.count] = state.vectors
        return grown

    def _screens(self, state: _CatalogueState) -> bool:
        if state.dim is None or self._screening_failure is not None or self.screening is False:
            return False
        if self.screening is None and (state.count < SCREENING_MIN_ROWS or isinstance(state.storage, np.memmap)):
            return False
        return float16_kernel_sums_in_float32(state.dim)

    def _screen_for(self, state: _CatalogueState) -> Float16Screen | None:
        """The float16 copy covering at least `state`'s rows, made or extended on first need (None when
        this search does not screen)."""
        if not self._screens(state):
            return None
        screen = self._screen
        if screen is not None and screen.count >= state.count:
            return screen
        with self._write_lock:
            # Rows below a state's count never change, so the copy extends by converting only new rows.
            latest, screen = self._state, self._screen
            try:
                screen = (screen or Float16Screen.empty(latest.dim)).extended(latest.vectors)
            except ValueError as error:
                self._screening_failure = str(error)
                logger.warning("exact search continues without float16 screening: %s", error)
                return None
            if self.screening is False:  # switched off after `_screens` said yes, before this thread got the lock
                return None
            self._screen = screen
        return screen

    def _faiss_searcher(self, backend: str) -> _FaissSearcher:
        searcher = self._faiss_searchers.get(backend)
        if searcher is not None and searcher.count == self._state.count and searcher.hnsw == self._hnsw:
            return searcher
        with self._write_lock:
            state, searcher = self._state, self._faiss_searchers.get(backend)
            if searcher is None or searcher.count != state.count or searcher.hnsw != self._hnsw:
                searcher = _FaissSearcher(backend, state.vectors, self._hnsw)
                self._faiss_searchers[backend] = searcher
        return searcher

    def _rows(
        self, start: int, stop: int, state: _CatalogueState | None = None
    ) -> tuple[np.ndarray, list, list | None]:
        """Embeddings, ids and metadata (or None) of rows `start:stop` of one state."""
        state = state or self._state
        stop = min(stop, state.count)
        metadata = None if self._metadata is None else self._metadata[start:stop]
        return state.storage[start:stop], self._id_table.ids_in(start, stop), metadata


def _merge_order(shards: Sequence[ProductIndex]) -> tuple[list[ProductIndex], bool]:
    """Shards in catalogue order, and whether their rows interleave (strided) rather than concatenate."""
    reference = shards[0]
    for shard in shards[1:]:
        if (shard.model_id, shard.config_hash) != (reference.model_id, reference.config_hash):
            raise IndexModelMismatchError(
                "cannot merge shards built with different models: "
                f"model_id/config_hash {reference.model_id!r}/{reference.config_hash!r} vs {shard.model_id!r}/{shard.config_hash!r}"
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


def _shards_have_metadata(shards: Sequence[ProductIndex]) -> bool:
    flags = {shard.has_metadata for shard in shards if len(shard)}
    if len(flags) > 1:
        raise ValueError(
            "some shards keep product metadata and others do not; build them with the same metadata_columns"
        )
    return flags == {True}


def _concatenated_blocks(ordered: Sequence[ProductIndex]) -> Iterator[tuple[np.ndarray, list, list | None]]:
    for shard in ordered:
        for start in range(0, len(shard), COPY_BLOCK_ROWS):
            yield shard._rows(start, start + COPY_BLOCK_ROWS)


def _interleaved_blocks(ordered: Sequence[ProductIndex]) -> Iterator[tuple[np.ndarray, list, list | None]]:
    """Global-order blocks of a strided build: global row i is row i // world of shard i % world."""
    world_size = len(ordered)
    dim = next((shard.dim for shard in ordered if shard.dim is not None), 0)
    with_metadata = _shards_have_metadata(ordered)
    for start in range(0, len(ordered[0]), COPY_BLOCK_ROWS):
        parts = [shard._rows(start, start + COPY_BLOCK_ROWS) for shard in ordered]
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
