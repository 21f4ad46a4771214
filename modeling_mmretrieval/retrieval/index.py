"""Product index: the catalogue side of retrieval.

A `ProductIndex` stores one L2-normalised embedding per product together with its product id, and answers
top-k cosine-similarity queries. It knows nothing about the model: it is built from an `embed_batch`
callable that turns a list of catalogue rows into a `(batch, dim)` float tensor, so the same code indexes
with any encoder (the model glue, `search.py`, supplies that callable).

The index is the API over its parts, one module each:

- `index_files.py`: the on-disk format (file names, checksums, integrity checks). Directories are written
  atomically (`atomic_files.atomic_directory`) and verified on load;
- `exact_search.py`: the exact top-k kernels, and the float16 screening (`speedups.float16_screening`)
  the index applies by default to searches of a few queries;
- `faiss_backends.py`: the optional faiss backends;
- `quantised_search.py`: the quantised backends (int8, binary, faiss IVF-PQ), rescored in float;
- `sharding.py`: which rows each process of a sharded build encodes, and merging the shards;
- `product_rows.py`: the rows themselves (embeddings, ids, metadata), which `ProductIndex` extends;
- `embedding_checks.py`: the checks every embedding passes on its way in.

Concurrency: `search` keeps no mutable scratch state, so many threads may search one index at once. `add`
is serialised by a lock and publishes new rows copy-on-grow (`product_rows.py`), so searches running during
an `add` see the catalogue either before or after it, never a half-written row.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_files import atomic_directory
from ..data.rows import row_batches
from .embedding_checks import NORM_TOLERANCE, as_float32_matrix, check_unit_rows, prepare_queries
from .exact_search import ScreeningCache, default_chunk_rows, exact_top_k
from .faiss_backends import FAISS_BACKENDS, FaissSearchers, HNSWOptions, import_faiss
from .index_files import (
    COPY_BLOCK_ROWS,
    IndexFiles,
    IndexIntegrityError,
    RowBlock,
    bounded_metadata,
    read_index_directory,
    write_index_files,
)
from .product_ids import ProductId, ProductIdTable, validated_product_id
from .product_rows import ProductRows
from .quantised_search import (
    QUANTISED_BACKENDS,
    QuantisedOptions,
    QuantisedSearchers,
    checked_quantised_options,
    release_mapped_rows,
)
from .sharding import merge_order, merged_row_blocks, select_shard, shards_have_metadata

BACKENDS = ("exact", *FAISS_BACKENDS, *QUANTISED_BACKENDS)

EmbedBatchFn = Callable[[list[dict]], torch.Tensor]


def _positive_int(value: Any, name: str, *, integer_types: tuple[type, ...] = (int,)) -> int:
    if isinstance(value, bool) or not isinstance(value, integer_types) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _allowed_mask(allowed: Any, count: int) -> np.ndarray | None:
    """`allowed` as a boolean numpy mask of `count` rows (None when every row is allowed)."""
    if allowed is None:
        return None
    if isinstance(allowed, torch.Tensor):
        allowed = allowed.detach().cpu().numpy()
    allowed = np.asarray(allowed)
    # An integer array would be read as row positions by some callers and as a mask by others: refuse it.
    if allowed.dtype != np.bool_ or allowed.ndim != 1:
        raise TypeError(
            f"allowed must be a 1-D boolean mask with one entry per indexed product, got dtype {allowed.dtype} "
            f"and shape {allowed.shape}"
        )
    if len(allowed) != count:
        raise ValueError(f"allowed has {len(allowed)} entries but the index holds {count} products")
    return None if allowed.all() else allowed


def _check_loaded_rows(files: IndexFiles, directory: Path) -> None:
    """Raises `IndexIntegrityError` naming the first row of a loaded index that is not finite and unit-norm.

    Checked block by block, so a memory-mapped matrix is read once without being held in memory (each block's
    pages are dropped from the process once checked)."""
    embeddings = files.embeddings
    for start in range(0, len(embeddings), COPY_BLOCK_ROWS):
        block = np.asarray(embeddings[start : start + COPY_BLOCK_ROWS], dtype=np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(block, axis=1)
        bad = ~np.isfinite(block).all(axis=1) | ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)
        release_mapped_rows(embeddings, start, start + len(block))
        if bad.any():
            position = start + int(np.flatnonzero(bad)[0])
            what = "holds NaN or infinite values" if not np.isfinite(block[position - start]).all() else (
                f"has L2 norm {norms[position - start]:.4g}, not 1"
            )
            raise IndexIntegrityError(
                f"the index at {directory}: the embedding of product id {files.ids[position]!r} (row {position}) "
                f"{what}; the embeddings file is corrupted: rebuild the index"
            )


def _row_product_id(row: Mapping, id_column: str, row_number: int) -> ProductId:
    if not isinstance(row, Mapping):
        raise TypeError(f"row {row_number} is a {type(row).__name__}, expected a dict")
    if id_column not in row:
        raise KeyError(f"row {row_number} has no {id_column!r} column (its keys are {sorted(row)})")
    return validated_product_id(row[id_column])


def _encoded_blocks(
    batches: Iterable[list[dict]],
    embed_batch: EmbedBatchFn,
    *,
    id_column: str,
    metadata_columns: Sequence[str] | None,
    expected_rows: int | None,
    progress: Any,
) -> Iterator[RowBlock]:
    """`(embeddings, ids, metadata)` blocks of `batches` of catalogue rows, each embedding checked."""
    count = 0
    for batch in batches:
        ids = [_row_product_id(row, id_column, count + offset) for offset, row in enumerate(batch)]
        embeddings = as_float32_matrix(embed_batch(batch), "embed_batch output")
        if len(embeddings) != len(batch):
            raise ValueError(f"embed_batch returned {len(embeddings)} embeddings for {len(batch)} rows")
        check_unit_rows(embeddings, "embed_batch output")
        metadata = None
        if metadata_columns:
            metadata = [bounded_metadata({name: row.get(name) for name in metadata_columns}) for row in batch]
        yield embeddings, ids, metadata
        count += len(batch)
        progress.update(len(batch))
    if expected_rows is not None and count != expected_rows:
        raise ValueError(f"expected {expected_rows} rows but the rows iterable yielded {count}")


class ProductIndex(ProductRows):
    """L2-normalised product embeddings plus product ids, with exact or faiss top-k cosine search.

    Build one with `ProductIndex.build` (streams a catalogue through an encoder), `ProductIndex.load`
    (a saved directory) or `ProductIndex.from_embeddings` (vectors already in memory). Rows are read and
    appended with the `ProductRows` methods (`add`, `ids`, `position_of`, `metadata_for`, ...).

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
        model_fingerprint: str | None = None,
        shard_info: dict | None = None,
        backend: str = "exact",
    ):
        super().__init__(embeddings, ids, metadata=metadata)
        self.model_id = model_id
        self.config_hash = config_hash
        self.model_fingerprint = model_fingerprint
        self.shard_info = shard_info
        self._faiss = FaissSearchers(self._write_lock)
        self._quantised = QuantisedSearchers(self._write_lock)
        self._screening = ScreeningCache(self._write_lock)
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
        model_fingerprint: str | None = None,
        backend: str = "exact",
    ) -> ProductIndex:
        """An in-memory index over `(N, D)` L2-normalised `embeddings` (copied) with one id per row; the
        provenance arguments are those of `build`.

        Example:
            >>> index = ProductIndex.from_embeddings(torch.eye(3), ["a", "b", "c"], metadata=[{"title": "A"}] * 3)
            >>> index.metadata_for("b")
            {'title': 'A'}
        """
        vectors = as_float32_matrix(embeddings, "embeddings").copy()
        check_unit_rows(vectors, "embeddings")
        provenance = {"model_id": model_id, "config_hash": config_hash, "model_fingerprint": model_fingerprint}
        return cls(vectors, list(ids), metadata=metadata, backend=backend, **provenance)

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
        model_fingerprint: str | None = None,
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
            model_fingerprint: the identity of the encoder (`retrieval.search.model_fingerprint`: its config and
                weights), recorded in the index and checked by `load(expected_model_fingerprint=...)`.
            model_id, config_hash: where the encoder was loaded from and its config fingerprint, recorded for
                people to read (they decide nothing).
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

        batch_size = _positive_int(batch_size, "batch_size")
        rows, expected_rows, shard_info = select_shard(rows, num_rows, shard, shard_strategy)
        if output_dir is None:
            staging_context = tempfile.TemporaryDirectory(prefix="mmretrieval-index-")
        else:
            staging_context = atomic_directory(output_dir, overwrite=overwrite)
        progress = tqdm(total=expected_rows, unit="product", desc="Indexing products", disable=not show_progress)
        with progress, staging_context as staging:
            staging = Path(staging)
            blocks = _encoded_blocks(
                row_batches(rows, batch_size),
                embed_batch,
                id_column=id_column,
                metadata_columns=metadata_columns,
                expected_rows=expected_rows,
                progress=progress,
            )
            provenance = {
                "model_id": model_id, "config_hash": config_hash, "model_fingerprint": model_fingerprint,
                "shard_info": shard_info,
            }
            write_index_files(staging, blocks, with_metadata=bool(metadata_columns), **provenance)
            if output_dir is None:
                return cls._from_files(read_index_directory(staging, mmap=False, verify_checksums=False))
        return cls._from_files(read_index_directory(Path(output_dir), mmap=mmap, verify_checksums=False))

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        expected_model_fingerprint: str | None = None,
        mmap: bool = True,
        verify_checksums: bool = True,
        backend: str = "exact",
    ) -> ProductIndex:
        """Opens a saved index, verifying its files.

        Raises `IndexModelMismatchError` when `expected_model_fingerprint` (`retrieval.search.model_fingerprint` of
        the model about to search) differs from the one recorded at build time, or when the index records none
        (format 1, or built without one): a copy of the checkpoint in another folder is accepted, new weights saved
        into the same folder are not. Raises `IndexIntegrityError` when a file is missing, truncated, edited or fails
        its checksum, or when a row is not finite or not L2-normalised (the checks `build` and `add` make; a
        NaN row would otherwise rank first for every query). `verify_checksums=False` skips hashing the
        embeddings for very large indexes; sizes, the ids' checksum and the rows' norms are still checked.
        With `mmap` the matrix is paged in on demand (the norm check reads it once, block by block, and drops
        each block's pages from the process: a loaded index does not hold the file in its resident memory).

        Example:
            >>> from modeling_mmretrieval.retrieval.search import model_fingerprint
            >>> fingerprint = model_fingerprint(model)  # doctest: +SKIP
            >>> index = ProductIndex.load("catalogue_index", expected_model_fingerprint=fingerprint)  # doctest: +SKIP
        """
        files = read_index_directory(
            Path(directory), mmap=mmap, verify_checksums=verify_checksums,
            expected_model_fingerprint=expected_model_fingerprint,
        )
        _check_loaded_rows(files, Path(directory))
        return cls._from_files(files, backend=backend)

    @classmethod
    def _from_files(cls, files: IndexFiles, backend: str = "exact") -> ProductIndex:
        meta = files.meta
        provenance = {
            "model_id": meta["model_id"], "config_hash": meta["config_hash"],
            "model_fingerprint": meta["model_fingerprint"], "shard_info": meta["shard"],
        }
        return cls(files.embeddings, files.ids, metadata=files.metadata, backend=backend, **provenance)

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

        Shards must come from one model (same model fingerprint, config hash and dim; the model id, where each
        process loaded the model from, may differ: the first shard's is kept), cover every rank exactly once with
        consistent row counts, and hold disjoint product ids. Rows are put back in the catalogue order a
        single-process build would give, whatever order `shard_dirs` is in. Indexes without shard information
        are concatenated in the given order instead.

        Example:
            >>> merged = ProductIndex.merge(["index-rank0", "index-rank1"], "index")  # doctest: +SKIP
        """
        if not shard_dirs:
            raise ValueError("merge needs at least one shard directory")
        shards = [cls.load(directory) for directory in shard_dirs]
        ordered, strided = merge_order(shards, sources=[str(directory) for directory in shard_dirs])
        with_metadata = shards_have_metadata(shards)
        provenance = {
            "model_id": shards[0].model_id, "config_hash": shards[0].config_hash,
            "model_fingerprint": shards[0].model_fingerprint,
        }
        with atomic_directory(output_dir, overwrite=overwrite) as staging:
            write_index_files(staging, merged_row_blocks(ordered, strided), with_metadata=with_metadata, **provenance)
        return cls._from_files(read_index_directory(Path(output_dir), mmap=mmap, verify_checksums=False))

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes the index to `directory` atomically (refusing a non-empty one unless `overwrite`).

        Example:
            >>> index.save(tmp_path / "catalogue_index")  # doctest: +SKIP
        """
        # Rows below this count never change, so blocks read while other threads add are still these rows.
        count = len(self)
        starts = range(0, count, COPY_BLOCK_ROWS)
        blocks = (self.row_block(start, min(start + COPY_BLOCK_ROWS, count)) for start in starts)
        provenance = {
            "model_id": self.model_id, "config_hash": self.config_hash, "model_fingerprint": self.model_fingerprint,
            "shard_info": self.shard_info,
        }
        with atomic_directory(directory, overwrite=overwrite) as staging:
            write_index_files(staging, blocks, with_metadata=self._metadata is not None, **provenance)
        return Path(directory)

    def set_backend(
        self,
        backend: str,
        *,
        hnsw_neighbors: int = 32,
        hnsw_ef_construction: int = 200,
        hnsw_ef_search: int = 128,
        screening: bool | None = None,
        rescore_candidates: int | None = None,
        ivf_nlist: int = 1024,
        ivf_m: int | None = None,
        ivf_nbits: int = 8,
        ivf_nprobe: int = 32,
        ivf_training_rows: int = 1 << 16,
    ) -> ProductIndex:
        """Chooses how `search` ranks: `"exact"` (default), `"faiss-flat"` (exact, faiss kernels),
        `"faiss-hnsw"` (approximate graph search), or one of the quantised backends `"int8"`, `"binary"` and
        `"faiss-ivfpq"` (`retrieval/quantised_search.py`). faiss indexes are built on first use, hold their own
        copy of the vectors, and are rebuilt after `add`. faiss parallelises each call with OpenMP; where many
        threads search at once, `faiss.omp_set_num_threads(1)` avoids oversubscribing the cores. Returns the
        index.

        The quantised backends find `rescore_candidates * k` candidates per query on compressed codes (None:
        4 for int8, 16 for binary, 8 for faiss-ivfpq) and rescore them exactly against the float vectors, so
        their scores are true cosines. Their codes are built on first use and extended with the new rows after
        `add`; the float vectors are only read for the candidates, so a memory-mapped index (`load`) keeps the
        codes resident plus the rows searches touched. `"int8"`: one byte per dimension (per-dimension ranges);
        `"binary"`: one bit per dimension (Hamming distance); `"faiss-ivfpq"`: `ivf_nlist` clusters trained on
        `ivf_training_rows` sampled rows, of which a search visits `ivf_nprobe`, and product codes of `ivf_m`
        sub-vectors (None: sub-vectors of about 8 dimensions) of `ivf_nbits` bits. Changing a faiss-ivfpq
        structure setting (all but `ivf_nprobe`) retrains it on the next search.

        `screening` applies to `"exact"` searches of up to `SCREENING_MAX_QUERIES` queries: they score a
        float16 copy of the catalogue (half the bytes to stream) and rescore the rows that can still make the
        top k, so their results are identical to full-precision ones. The copy is made on the first such
        search and costs half the catalogue's memory again. `None` (default) screens in-memory catalogues of
        at least `SCREENING_MIN_ROWS` rows and leaves memory-mapped ones alone; `True` screens any catalogue;
        `False` never does. See `exact_search.ScreeningCache`.

        Example:
            >>> index.set_backend("faiss-hnsw", hnsw_ef_search=256)  # doctest: +SKIP
            >>> index.set_backend("exact", screening=False)  # doctest: +SKIP
            >>> index.set_backend("int8", rescore_candidates=8)  # doctest: +SKIP
            >>> index.set_backend("faiss-ivfpq", ivf_nlist=4096, ivf_nprobe=64)  # doctest: +SKIP
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if screening not in (None, True, False):
            raise ValueError(f"screening must be None, True or False, got {screening!r}")
        for name, value in (("hnsw_neighbors", hnsw_neighbors), ("hnsw_ef_construction", hnsw_ef_construction),
                            ("hnsw_ef_search", hnsw_ef_search)):
            _positive_int(value, name, integer_types=(int, np.integer))
        quantised = checked_quantised_options(
            QuantisedOptions(rescore_candidates, ivf_nlist, ivf_m, ivf_nbits, ivf_nprobe, ivf_training_rows),
            self.dim,
        )
        if backend != "exact":
            import_faiss()
        with self._write_lock:
            self._faiss.hnsw = HNSWOptions(hnsw_neighbors, hnsw_ef_construction, hnsw_ef_search)
            self._quantised.options = quantised
            self.backend = backend
            self._screening.switch(screening)
        return self

    def prepare_backend(self) -> ProductIndex:
        """Builds the current backend's search structure now (a faiss index, or the quantised codes) instead of on
        the first search, so a server's first query is not slow and a setting that cannot be built (too few rows
        to train faiss-ivfpq) fails here. Returns the index.

        Example:
            >>> index.set_backend("int8").prepare_backend()  # doctest: +SKIP
        """
        if self.backend == "exact" or not len(self):
            return self
        searchers = self._quantised if self.backend in QUANTISED_BACKENDS else self._faiss
        searchers.for_backend(self.backend, self._latest_vectors)
        return self

    @property
    def screening(self) -> bool | None:
        """The `screening` setting of the last `set_backend` call."""
        return self._screening.setting

    def __repr__(self) -> str:
        return (
            f"ProductIndex(count={len(self)}, dim={self.dim}, model_id={self.model_id!r}, "
            f"model_fingerprint={self.model_fingerprint!r}, backend={self.backend!r})"
        )

    def search(
        self,
        query_embeddings: torch.Tensor | np.ndarray,
        k: int = 100,
        *,
        chunk_size: int | None = None,
        backend: str | None = None,
        allowed: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list]:
        """Top-k products by cosine similarity for L2-normalised query embeddings.

        Returns `(scores, ids)`: for `(Q, D)` queries a `(Q, k)` float tensor and Q lists of k product ids;
        for one `(D,)` vector a `(k,)` tensor and one list. `k` is capped at the catalogue size. Ties are
        broken by catalogue order. `chunk_size` (catalogue rows scored per step of the exact search) defaults
        to a block of about 64 MiB of scores. Slots a faiss-hnsw or faiss-ivfpq search could not fill have score
        -inf and id None. The quantised backends return the exact scores of the rows they found, ordered (ties
        included) as the exact search orders them. See `search_positions` for row positions instead of ids.

        `allowed` filters inside the search: a boolean mask with one entry per indexed product, in row order
        (`retrieval.filters.ProductTable.allowed` makes one from catalogue metadata). Only the products it
        marks are ranked, so k of them come back (fewer only when fewer are allowed), with the same scores and
        order as a search of an index holding just those products.

        Example:
            >>> scores, ids = index.search(query_embeddings, k=10)  # doctest: +SKIP
            >>> in_stock = np.array([product["stock"] > 0 for product in catalogue])  # doctest: +SKIP
            >>> scores, ids = index.search(query_embeddings, k=10, allowed=in_stock)  # doctest: +SKIP
        """
        scores, positions = self.search_positions(
            query_embeddings, k, chunk_size=chunk_size, backend=backend, allowed=allowed
        )
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
        allowed: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `search`, but returns catalogue row positions (a long tensor, -1 for unfilled slots)."""
        state = self._state
        queries, single = prepare_queries(query_embeddings, state.dim)
        k = min(_positive_int(k, "k", integer_types=(int, np.integer)), state.count)
        allowed = _allowed_mask(allowed, state.count)
        if allowed is not None:
            k = min(k, int(np.count_nonzero(allowed)))
        if chunk_size is not None:
            _positive_int(chunk_size, "chunk_size")
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if k == 0 or len(queries) == 0:
            scores, positions = queries.new_empty((len(queries), k)), torch.empty((len(queries), k), dtype=torch.long)
        elif backend == "exact":
            screen = self._screening.screen_for(state.vectors, state.dim, len(queries), self._latest_vectors)
            chunk_rows = chunk_size or default_chunk_rows(len(queries))
            scores, positions = exact_top_k(state.vectors, queries, k, chunk_rows, screen, allowed)
        else:
            quantised = backend in QUANTISED_BACKENDS
            searchers = self._quantised if quantised else self._faiss
            searcher = searchers.for_backend(backend, self._latest_vectors)
            if allowed is not None and searcher.count > len(allowed):
                # Rows added since this search's snapshot sit past the mask: they are not allowed.
                allowed = np.concatenate([allowed, np.zeros(searcher.count - len(allowed), dtype=bool)])
            if quantised:
                scores, positions = searcher.search(queries, k, allowed, self._quantised.options)
            else:
                scores, positions = searcher.search(queries, k, allowed)
        return (scores[0], positions[0]) if single else (scores, positions)



__all__ = ["BACKENDS", "EmbedBatchFn", "ProductIndex"]
