"""Retrieval: the product index, search with a trained model, and retrieval metrics.

- `index`: `ProductIndex`, the API (build, load, add, search, save, merge); its parts are
  `product_rows` (the rows, appendable while others search), `index_files` (the on-disk format and its
  checksums), `exact_search` (exact top-k and float16 screening), `faiss_backends`, `sharding` (sharded
  builds and merging) and `embedding_checks`;
- `product_ids`: the compact, thread-safe id table behind the index;
- `search`: the glue between a model and an index (`build_product_index`, `embed_queries`, `search_text`, image
  queries `search_images` and text + image queries `search_text_and_image`);
- `visual_index`: the visual-similarity index beside the product index (the image tower's features of the product
  photos: `build_visual_index`, `load_visual_index`), which answers image queries for every model with an image tower;
- `image_feature_store`: `ImageFeatureStore`, frozen image-tower features kept on disk (keyed by image bytes, tower
  and preprocessing), shared by training, indexing and evaluation;
- `metrics`: recall, nDCG, MRR, MAP over runs and qrels; `exclusive_matches` compares two systems' hits;
- `evaluator`: `RetrievalEvaluator`, metrics of a model on evaluation queries (used during training);
- `lexical` (BM25 over product texts, bm25s), `hybrid` (dense, lexical or fused rankings: reciprocal rank or
  normalised score fusion) and `filters` (metadata filters applied inside the search, facet counts);
- the search page: `demo` (its server, `serve_demo`), `search_app` (the application behind it), `search_page` (its
  HTML) and `judgements` (the relevance marks it saves, which `mmretrieval evaluate --judgements` scores).

Example:
```python
>>> from modeling_mmretrieval.retrieval import ProductIndex, build_product_index, embed_queries
>>> index = build_product_index(model, processor, catalogue, output_dir="catalogue_index")
>>> index = ProductIndex.load("catalogue_index", expected_model_fingerprint=model_fingerprint(model))
>>> scores, ids = index.search(embed_queries(model, processor, ["white sneakers"]), k=10)
```
"""

from .evaluator import RetrievalEvaluator
from .image_feature_store import ImageFeatureStore
from .exclusive_matches import ExclusiveMatchReport, ExclusiveMatches, exclusive_matches
from .filters import ProductFilter, ProductTable, facet_counts
from .hybrid import Fusion, ProductRanker
from .index import BACKENDS, ProductIndex
from .index_files import IndexIntegrityError, IndexModelMismatchError
from .metrics import RetrievalEvaluation, compute_retrieval_metrics, evaluate_run
from .product_ids import DuplicateProductIdError
from .search import (
    DEFAULT_IMAGE_WEIGHT,
    build_product_index,
    config_fingerprint,
    embed_image_features,
    embed_images,
    embed_queries,
    fused_image_queries_supported,
    model_fingerprint,
    model_identity,
    weights_fingerprint,
    product_embedder,
    search_images,
    search_text,
    search_text_and_image,
)
from .sharding import SHARD_STRATEGIES, shard_row_indices
from .visual_index import build_visual_index, load_visual_index, visual_index_dir

__all__ = [
    "ImageFeatureStore",
    "BACKENDS",
    "DEFAULT_IMAGE_WEIGHT",
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
    "build_visual_index",
    "compute_retrieval_metrics",
    "config_fingerprint",
    "embed_image_features",
    "embed_images",
    "embed_queries",
    "evaluate_run",
    "exclusive_matches",
    "facet_counts",
    "fused_image_queries_supported",
    "load_visual_index",
    "model_fingerprint",
    "model_identity",
    "weights_fingerprint",
    "product_embedder",
    "search_images",
    "search_text",
    "search_text_and_image",
    "shard_row_indices",
    "visual_index_dir",
]
