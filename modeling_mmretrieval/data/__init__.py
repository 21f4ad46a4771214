"""Data: the product catalogue, queries derived from its attributes, relevance, image decoding and the collator.

- `catalogue`: `CatalogueColumns`, `load_catalogue` (split discovery, images kept encoded), `default_data_dir`;
- `queries`: attribute-derived queries (`derive_query`), training pairs and evaluation queries;
- `relevance`: the relevance rule (`product_matches`), whole-catalogue relevance sets and hard negatives;
- `images`: robust decoding of one product image (`load_product_image`), and the run's `ImageReport`;
- `product_checks`: up-front checks of ids and texts (`find_bad_products`), no image decoded;
- `collator`: dataset rows -> model inputs, one batch of images decoded at a time;
- `stats`: catalogue statistics and the `data-stats` command;
- `query_column`: catalogues that carry their own queries (distinct products, evaluation queries);
- `rows`: catalogue rows one batch at a time, from a `datasets.Dataset` or any iterable;
- `visual_words`: colour and pattern words in product texts (find, strip, text-silent slice);
- `sample/`: the small committed sample catalogue (`SAMPLE_DATA_DIR`).

Example:
```python
>>> from modeling_mmretrieval.data import load_catalogue, make_evaluation_queries
>>> queries = make_evaluation_queries(load_catalogue(split="test"), seed=0, num_queries=100)
```
"""

from .catalogue import (
    DATA_DIR_ENV,
    SAMPLE_DATA_DIR,
    CatalogueColumnError,
    CatalogueColumns,
    default_data_dir,
    load_catalogue,
    normalise_value,
    resolve_image_paths,
    with_lazy_images,
)
from .collator import RetrievalCollator
from .images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageDecodeError,
    ImageFailureError,
    ImageLoadResult,
    ImageProblem,
    ImageReport,
    ImageStatus,
    is_image_url,
    load_product_image,
)
from .product_checks import BadProduct, find_bad_products
from .queries import (
    QUERY_ATTRIBUTES_COLUMN,
    DerivedQuery,
    EvaluationQuery,
    article_type_phrases,
    derive_query,
    make_evaluation_queries,
    make_training_pairs,
    singular_noun,
)
from .relevance import colour_absent_from_titles, find_hard_negatives, product_facets, product_matches
from .stats import SplitStats, catalogue_stats, count_image_problems, format_stats_table, run_data_stats

__all__ = [
    "BadProduct",
    "DATA_DIR_ENV",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "QUERY_ATTRIBUTES_COLUMN",
    "SAMPLE_DATA_DIR",
    "CatalogueColumnError",
    "CatalogueColumns",
    "DerivedQuery",
    "EvaluationQuery",
    "ImageDecodeError",
    "ImageFailureError",
    "ImageLoadResult",
    "ImageProblem",
    "ImageReport",
    "ImageStatus",
    "RetrievalCollator",
    "SplitStats",
    "article_type_phrases",
    "catalogue_stats",
    "colour_absent_from_titles",
    "count_image_problems",
    "default_data_dir",
    "derive_query",
    "find_bad_products",
    "find_hard_negatives",
    "format_stats_table",
    "is_image_url",
    "load_catalogue",
    "load_product_image",
    "make_evaluation_queries",
    "make_training_pairs",
    "normalise_value",
    "product_facets",
    "product_matches",
    "resolve_image_paths",
    "run_data_stats",
    "singular_noun",
    "with_lazy_images",
]
