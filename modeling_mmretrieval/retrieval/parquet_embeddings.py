"""Product embeddings as Parquet shards: the hand-off of an index build to other engines (vector databases, Spark,
DuckDB, pandas).

A Parquet embeddings folder holds:

- `part-<n>.parquet` shards, each with the columns
  - `product_id`: the catalogue's product id (string or integer, as in the catalogue);
  - `embedding`: the L2-normalised product embedding, `fixed_size_list<float32>[dim]` (cosine = inner product);
  - `row`: the product's position in the catalogue (int64), so the shards read back in catalogue order whatever
    their file names;
  - the metadata columns (title, facets), with the catalogue's values;
- `manifest.json`: the format, the model that built the rows (`model_fingerprint`, as a `ProductIndex` records it,
  with `model_id` and `config_hash` for people), `count`, `dim`, the metric (`cosine`), the column names and the
  shard files. It is written last, so its presence marks a complete folder.

`product_index_from_parquet` reads the shards back into a `ProductIndex` (the rows of a single-process build, in
catalogue order), refusing another model's embeddings; `embedding_batches` streams them (e.g. into LanceDB,
`retrieval.vector_database`).

Example:
```python
>>> table = embedding_table(["sku-1", "sku-2"], np.eye(2, dtype=np.float32), rows=[0, 1], metadata={"title": ["A", "B"]})
>>> pq.write_table(table, folder / "part-00000.parquet")
>>> write_manifest(folder, model_fingerprint="0a1b", model_id="outputs/run/final", metadata_columns=["title"])
>>> product_index_from_parquet(folder, expected_model_fingerprint="0a1b").ids
('sku-1', 'sku-2')
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq

from ..atomic_files import write_json_atomically
from .index import ProductIndex
from .index_files import IndexModelMismatchError, bounded_metadata

PARQUET_EMBEDDINGS_FORMAT = "mmretrieval-parquet-embeddings"
PARQUET_EMBEDDINGS_FORMAT_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
SHARD_GLOB = "part-*.parquet"
ID_COLUMN = "product_id"
EMBEDDING_COLUMN = "embedding"
ROW_COLUMN = "row"
RESERVED_COLUMNS = (ID_COLUMN, EMBEDDING_COLUMN, ROW_COLUMN)


def embedding_array(embeddings: np.ndarray) -> pa.FixedSizeListArray:
    """A `(rows, dim)` float matrix as an Arrow `fixed_size_list<float32>[dim]` column (no copy of float32 rows).

    Example: `embedding_array(np.eye(3, dtype=np.float32)).type` is `fixed_size_list<item: float>[3]`.
    """
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"embeddings must be a (rows, dim) matrix, got shape {matrix.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), matrix.shape[1])


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The `(rows, dim)` float32 matrix of an `embedding` column (`fixed_size_list<float32>[dim]`).

    Example: `embedding_matrix(embedding_array(np.eye(3, dtype=np.float32))).shape` is `(3, 3)`.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if not pa.types.is_fixed_size_list(column.type):
        raise ValueError(f"the {EMBEDDING_COLUMN!r} column must be a fixed-size list of float32, got {column.type}")
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), dim)


def embedding_table(
    ids: Sequence | pa.Array,
    embeddings: np.ndarray,
    *,
    rows: Sequence[int] | pa.Array,
    metadata: Mapping[str, Sequence | pa.Array] | None = None,
) -> pa.Table:
    """One shard's table: `product_id`, `embedding` (fixed-size list of float32), `row` (catalogue position) and the
    `metadata` columns, in that order.

    Example:
    ```python
    >>> embedding_table(["a", "b"], np.eye(2, dtype=np.float32), rows=[0, 1], metadata={"title": ["A", "B"]}).column_names
    ['product_id', 'embedding', 'row', 'title']
    ```
    """
    columns = {ID_COLUMN: ids, EMBEDDING_COLUMN: embedding_array(embeddings), ROW_COLUMN: pa.array(rows, pa.int64())}
    for name, values in (metadata or {}).items():
        if name in RESERVED_COLUMNS:
            raise ValueError(f"metadata column {name!r} clashes with a column of the Parquet layout {RESERVED_COLUMNS}")
        columns[name] = values
    return pa.table(columns)


def shard_files(directory: str | os.PathLike) -> list[Path]:
    """The Parquet shards of an embeddings folder, by name.

    Example: `[path.name for path in shard_files("embeddings/")]` gives `['part-00000.parquet', ...]`.
    """
    return sorted(Path(directory).glob(SHARD_GLOB))


def write_manifest(
    directory: str | os.PathLike,
    *,
    model_fingerprint: str | None,
    model_id: str | None = None,
    config_hash: str | None = None,
    metadata_columns: Sequence[str] = (),
) -> dict:
    """Writes `manifest.json` beside the shards already in `directory` (counting their rows and reading the embedding
    width from their footers) and returns it; call it last: the manifest marks a complete folder.

    Example: `write_manifest("embeddings/", **index_provenance(model), metadata_columns=["title"])["count"]`.
    """
    directory = Path(directory)
    files = shard_files(directory)
    count, dim = 0, None
    for path in files:
        schema = pq.read_schema(path)
        if EMBEDDING_COLUMN in schema.names and pa.types.is_fixed_size_list(schema.field(EMBEDDING_COLUMN).type):
            dim = schema.field(EMBEDDING_COLUMN).type.list_size
        count += pq.ParquetFile(path).metadata.num_rows
    manifest = {
        "format": PARQUET_EMBEDDINGS_FORMAT, "format_version": PARQUET_EMBEDDINGS_FORMAT_VERSION,
        "model_id": model_id, "config_hash": config_hash, "model_fingerprint": model_fingerprint,
        "count": count, "dim": dim, "dtype": "float32", "metric": "cosine", "normalized": True,
        "id_column": ID_COLUMN, "embedding_column": EMBEDDING_COLUMN, "row_column": ROW_COLUMN,
        "metadata_columns": list(metadata_columns), "files": [path.name for path in files],
    }
    write_json_atomically(directory / MANIFEST_FILENAME, manifest)
    return manifest


def read_manifest(directory: str | os.PathLike, expected_model_fingerprint: str | None = None) -> dict:
    """The manifest of a complete embeddings folder; `ValueError` for a folder without one (not written, or its
    writer stopped), or with shards missing, and `IndexModelMismatchError` when `expected_model_fingerprint` is given
    and another model built the embeddings.

    Example: `read_manifest("embeddings/", expected_model_fingerprint=model_fingerprint(model))["dim"]` gives 384.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILENAME
    if not path.is_file():
        raise ValueError(f"{directory} holds no {MANIFEST_FILENAME}: it is not a complete Parquet embeddings folder")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != PARQUET_EMBEDDINGS_FORMAT:
        raise ValueError(f"{path} is not a {PARQUET_EMBEDDINGS_FORMAT} manifest (format {manifest.get('format')!r})")
    missing = [name for name in manifest["files"] if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory} lacks the shard {missing[0]} its manifest lists")
    if expected_model_fingerprint is not None and manifest["model_fingerprint"] != expected_model_fingerprint:
        raise IndexModelMismatchError(
            f"the embeddings in {directory} were built by model fingerprint {manifest['model_fingerprint']!r} "
            f"({manifest['model_id']}), not by this model ({expected_model_fingerprint!r}): rebuild them with it"
        )
    return manifest


def embedding_batches(
    directory: str | os.PathLike, columns: Sequence[str] | None = None, batch_rows: int = 1 << 16
) -> Iterator[pa.RecordBatch]:
    """Streams the record batches of an embeddings folder's shards (all columns, or `columns`), in file order, with
    the memory of one batch; the manifest is checked first.

    Example: `sum(batch.num_rows for batch in embedding_batches("embeddings/"))` is the manifest's `count`.
    """
    manifest = read_manifest(directory)
    files = [str(Path(directory) / name) for name in manifest["files"]]
    yield from pa_dataset.dataset(files, format="parquet").to_batches(columns=columns, batch_size=batch_rows)


def embedding_schema(directory: str | os.PathLike) -> pa.Schema:
    """The Arrow schema of an embeddings folder's shards.

    Example: `embedding_schema("embeddings/").field("embedding").type.list_size` gives the embedding width.
    """
    manifest = read_manifest(directory)
    return pq.read_schema(Path(directory) / manifest["files"][0]) if manifest["files"] else pa.schema([])


def read_embeddings_table(directory: str | os.PathLike, expected_model_fingerprint: str | None = None) -> pa.Table:
    """Every row of an embeddings folder as one Arrow table, in catalogue order (`row`).

    Example: `read_embeddings_table("embeddings/")["product_id"].to_pylist()[:2]` gives the catalogue's first ids.
    """
    manifest = read_manifest(directory, expected_model_fingerprint)
    files = [str(Path(directory) / name) for name in manifest["files"]]
    if not files:
        return pa.table({})
    table = pa_dataset.dataset(files, format="parquet").to_table()
    return table.take(pc.sort_indices(table[ROW_COLUMN]))


def product_index_from_parquet(
    directory: str | os.PathLike, *, expected_model_fingerprint: str | None = None, metadata_columns: Sequence[str] | None = None
) -> ProductIndex:
    """The `ProductIndex` of an embeddings folder: the same ids, row order, vectors and model provenance as the index
    the same build writes in the index format; metadata from `metadata_columns` (default: the manifest's).

    Example:
    ```python
    >>> index = product_index_from_parquet("embeddings/", expected_model_fingerprint=model_fingerprint(model))
    >>> scores, ids = index.search(embed_queries(model, processor, ["white sneakers"]), k=10)
    ```
    """
    manifest = read_manifest(directory, expected_model_fingerprint)
    table = read_embeddings_table(directory)
    names = manifest["metadata_columns"] if metadata_columns is None else list(metadata_columns)
    metadata = None
    if names:
        values = {name: table[name].to_pylist() for name in names}
        metadata = [bounded_metadata({name: values[name][row] for name in names}) for row in range(table.num_rows)]
    embeddings = embedding_matrix(table[EMBEDDING_COLUMN]) if table.num_rows else np.empty((0, manifest["dim"] or 0))
    return ProductIndex.from_embeddings(
        embeddings, table[ID_COLUMN].to_pylist() if table.num_rows else [], metadata=metadata,
        model_id=manifest["model_id"], config_hash=manifest["config_hash"],
        model_fingerprint=manifest["model_fingerprint"],
    )


__all__ = [
    "EMBEDDING_COLUMN",
    "ID_COLUMN",
    "MANIFEST_FILENAME",
    "ROW_COLUMN",
    "embedding_array",
    "embedding_batches",
    "embedding_matrix",
    "embedding_schema",
    "embedding_table",
    "product_index_from_parquet",
    "read_embeddings_table",
    "read_manifest",
    "shard_files",
    "write_manifest",
]
