"""Hand-off to a vector database: Parquet embeddings (`retrieval.parquet_embeddings`) loaded into LanceDB, and searched
there with the model's query embeddings.

LanceDB runs embedded (a folder, no server: `lancedb.connect("catalogue.lancedb")`) with the same client API as
LanceDB Cloud and Enterprise (`lancedb.connect("db://...", api_key=...)`), so what is tested here scales out by
changing the URI. The table keeps the shards' columns (`product_id`, `embedding`, `row`, metadata) and the embeddings
folder's manifest (the model fingerprint) in its schema metadata, so a search with another model's queries is
refused. Without a vector index LanceDB scans every row: the search is exact and ranks as `ProductIndex.search` does
(cosine distance `1 - cos`, turned back into cosine scores here). For large tables, `create_vector_index` builds an
IVF-PQ index with the cosine metric; searches are then approximate (tune `nprobes` and `refine_factor`).

Example:
```python
>>> table = load_parquet_into_lancedb("embeddings/", "catalogue.lancedb")
>>> scores, ids = search_lancedb(table, embed_queries(model, processor, ["white sneakers"]), k=10,
...                              expected_model_fingerprint=model_fingerprint(model))
```
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import torch

from .index_files import IndexModelMismatchError
from .parquet_embeddings import EMBEDDING_COLUMN, ID_COLUMN, embedding_batches, embedding_schema, read_manifest

DEFAULT_TABLE_NAME = "products"
MANIFEST_SCHEMA_KEY = b"mmretrieval_manifest"


def _import_lancedb():
    try:
        import lancedb
    except ImportError as error:
        raise ImportError("the vector-database hand-off needs LanceDB: pip install 'modeling_mmretrieval[scale]'") from error
    return lancedb


def load_parquet_into_lancedb(
    parquet_dir: str | os.PathLike,
    uri: str | os.PathLike,
    table_name: str = DEFAULT_TABLE_NAME,
    *,
    overwrite: bool = False,
    expected_model_fingerprint: str | None = None,
    batch_rows: int = 1 << 16,
):
    """Creates the LanceDB table `table_name` at `uri` from a Parquet embeddings folder, streamed a batch at a time,
    and returns it. The manifest (model fingerprint, metric) goes into the table's schema metadata. An existing table
    is an error unless `overwrite`.

    Example: `table = load_parquet_into_lancedb("embeddings/", "catalogue.lancedb", overwrite=True)`.
    """
    lancedb = _import_lancedb()
    manifest = read_manifest(parquet_dir, expected_model_fingerprint)
    schema = embedding_schema(parquet_dir)
    schema = schema.with_metadata({**(schema.metadata or {}), MANIFEST_SCHEMA_KEY: json.dumps(manifest).encode()})
    batches = (batch.replace_schema_metadata(schema.metadata) for batch in embedding_batches(parquet_dir, batch_rows=batch_rows))
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    database = lancedb.connect(str(uri))
    return database.create_table(table_name, data=reader, schema=schema, mode="overwrite" if overwrite else "create")


def lancedb_manifest(table) -> dict:
    """The embeddings manifest a table was loaded with (`load_parquet_into_lancedb`), or `{}`.

    Example: `lancedb_manifest(table)["model_fingerprint"]`.
    """
    raw = (table.schema.metadata or {}).get(MANIFEST_SCHEMA_KEY)
    return json.loads(raw) if raw else {}


def create_vector_index(table, *, num_partitions: int | None = None, num_sub_vectors: int | None = None) -> None:
    """Builds LanceDB's IVF-PQ index on the embedding column with the cosine metric (approximate search from then on;
    worth it beyond about a million rows). Untested here: the tests search without it (exact).

    Example: `create_vector_index(table, num_partitions=1024, num_sub_vectors=48)`.
    """
    options = {key: value for key, value in (("num_partitions", num_partitions), ("num_sub_vectors", num_sub_vectors))
               if value is not None}
    table.create_index(metric="cosine", vector_column_name=EMBEDDING_COLUMN, **options)


def search_lancedb(
    table,
    query_embeddings: torch.Tensor | np.ndarray,
    k: int = 10,
    *,
    where: str | None = None,
    expected_model_fingerprint: str | None = None,
) -> tuple[torch.Tensor, list[list]]:
    """Top-k `(scores, product_ids)` of L2-normalised query embeddings in a LanceDB table, as `ProductIndex.search`
    returns them: `(Q, k)` cosine scores and Q lists of ids, best first. `where` is a LanceDB (SQL) filter on the
    metadata columns, applied before the top-k (e.g. `"gender = 'Women'"`).

    Example: `scores, ids = search_lancedb(table, embed_queries(model, processor, ["white sneakers"]), k=10)`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if expected_model_fingerprint is not None:
        recorded = lancedb_manifest(table).get("model_fingerprint")
        if recorded != expected_model_fingerprint:
            raise IndexModelMismatchError(
                f"the LanceDB table {table.name!r} holds embeddings of model fingerprint {recorded!r}, not of this "
                f"model ({expected_model_fingerprint!r}): reload it from this model's embeddings"
            )
    queries = torch.as_tensor(query_embeddings).detach().float().cpu().numpy()
    if queries.ndim == 1:
        queries = queries[None]
    all_scores, all_ids = [], []
    for query in queries:
        search = table.search(query, vector_column_name=EMBEDDING_COLUMN).distance_type("cosine").limit(k)
        if where is not None:
            search = search.where(where, prefilter=True)
        found = search.select([ID_COLUMN]).to_arrow()
        all_scores.append(1.0 - np.asarray(found["_distance"].to_numpy(), dtype=np.float32))
        all_ids.append(found[ID_COLUMN].to_pylist())
    width = min((len(ids) for ids in all_ids), default=0)
    scores = torch.tensor(np.stack([row[:width] for row in all_scores]) if all_scores else np.empty((0, 0)))
    return scores, [ids[:width] for ids in all_ids]


__all__ = [
    "DEFAULT_TABLE_NAME",
    "create_vector_index",
    "lancedb_manifest",
    "load_parquet_into_lancedb",
    "search_lancedb",
]
