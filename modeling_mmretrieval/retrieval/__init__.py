"""Retrieval: the product index, search with a trained model, and retrieval metrics.

- `index`: `ProductIndex`, the API (build, load, add, search, save, merge); its parts are
  `product_rows` (the rows, appendable while others search), `index_files` (the on-disk format and its
  checksums), `exact_search` (exact top-k and float16 screening), `faiss_backends`, `sharding` (sharded
  builds and merging) and `embedding_checks`;
- `product_ids`: the compact, thread-safe id table behind the index;
- `search`: the glue between a model and an index (`build_product_index`, `embed_queries`, `search_text`);
- `metrics`: recall, nDCG, MRR, MAP over runs and qrels; `exclusive_matches` compares two systems' hits;
- `evaluator`: `RetrievalEvaluator`, metrics of a model on evaluation queries (used during training);
- `lexical` (BM25 over product texts, bm25s), `hybrid` (dense, lexical or fused rankings: reciprocal rank or
  normalised score fusion) and `filters` (metadata filters applied inside the search, facet counts);
- `demo`: a small web page to try a model's search (`serve_demo`).

Example:
```python
>>> from modeling_mmretrieval.retrieval import ProductIndex, build_product_index, embed_queries
>>> index = build_product_index(model, processor, catalogue, output_dir="catalogue_index")
>>> index = ProductIndex.load("catalogue_index", expected_model_id=model.config.name_or_path)
>>> scores, ids = index.search(embed_queries(model, processor, ["white sneakers"]), k=10)
```
"""

from .evaluator import RetrievalEvaluator
from .exclusive_matches import ExclusiveMatchReport, ExclusiveMatches, exclusive_matches
from .filters import ProductFilter, ProductTable, facet_counts
from .hybrid import Fusion, ProductRanker
from .index import BACKENDS, ProductIndex
from .index_files import IndexIntegrityError, IndexModelMismatchError
from .metrics import RetrievalEvaluation, compute_retrieval_metrics, evaluate_run
from .product_ids import DuplicateProductIdError
from .search import (
    build_product_index,
    config_fingerprint,
    embed_images,
    embed_queries,
    model_identity,
    product_embedder,
    search_images,
    search_text,
)
from .sharding import SHARD_STRATEGIES, shard_row_indices

__all__ = [
    "BACKENDS",
    "SHARD_STRATEGIES",
    "DuplicateProductIdError",
    "ExclusiveMatchReport",
    "ExclusiveMatches",
    "Fusion",
    "IndexIntegrityError",
    "IndexModelMismatchError",
    "ProductFilter",
    "ProductIndex",
    "ProductRanker",
    "ProductTable",
    "RetrievalEvaluation",
    "RetrievalEvaluator",
    "build_product_index",
    "compute_retrieval_metrics",
    "config_fingerprint",
    "embed_images",
    "embed_queries",
    "evaluate_run",
    "exclusive_matches",
    "facet_counts",
    "model_identity",
    "product_embedder",
    "search_images",
    "search_text",
    "shard_row_indices",
]
