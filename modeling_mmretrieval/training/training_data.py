"""What a training run reads: the (query, product) pairs it trains on, the held-out queries it is evaluated on,
and the collator and evaluator over them (with the frozen image features cached once when they can be).

Queries come from the catalogue's query column when it has one, else they are attribute-derived
(`modeling_mmretrieval.data`). `args` is the namespace of the train command
(`modeling_mmretrieval.commands.train.parse_args`).

Example:
```python
>>> data = load_training_data(args, columns)
>>> collator = build_collator(args, accelerator, model, processor, data, columns)
>>> evaluator = build_evaluator(args, accelerator, model, processor, data, columns,
...                             cache_image_features=collator.image_features is not None)
```
"""

import random
import time
from dataclasses import dataclass

import datasets
from accelerate.logging import get_logger

from ..data import (
    CatalogueColumns,
    RetrievalCollator,
    find_hard_negatives,
    load_catalogue,
    make_training_pairs,
)
from ..data.query_column import evaluation_queries_from_column, unique_products
from ..data.visual_words import StrippedTextView, VisualWordDropout, VisualWords
from ..retrieval.evaluator import RetrievalEvaluator
from ..retrieval.held_out_evaluation import HeldOutEvaluator
from ..retrieval.image_feature_store import image_feature_store_from_args
from .image_feature_cache import check_cached_image_features, precompute_image_features

logger = get_logger(__name__)

# Products whose cached image features are recomputed at start-up to check the cache.
CACHE_CHECK_PRODUCTS = 8


@dataclass
class TrainingData:
    products: datasets.Dataset  # one row per training product (image cache, hard negatives)
    pairs: datasets.Dataset  # (query, product) rows the model trains on
    queries_are_derived: bool
    eval_products: datasets.Dataset | None = None
    eval_queries: list | None = None  # from the eval split's query column; None: attribute-derived, held-out phrasing


def seeded_subset(dataset: datasets.Dataset, size: int | None, seed: int) -> datasets.Dataset:
    """`size` rows of `dataset` drawn with `seed`, in their original order (all of them when `size` is None).

    Example:
    ```python
    >>> len(seeded_subset(catalogue, 100, seed=42))
    100
    ```
    """
    if size is None or size >= len(dataset):
        return dataset
    return dataset.select(sorted(random.Random(seed).sample(range(len(dataset)), size)))


def load_training_data(args, columns: CatalogueColumns) -> TrainingData:
    """The training pairs and the evaluation split's products and queries of `--dataset`.

    Example:
    ```python
    >>> data = load_training_data(args, CatalogueColumns())
    >>> data.queries_are_derived, len(data.pairs)
    (True, 2800)
    ```
    """
    splits = dict(load_catalogue(args.dataset, columns=columns))
    # Rows the train command's up-front check found bad, left out with --skip_bad_rows (listed in bad_rows.jsonl).
    for name, rows in (getattr(args, "bad_rows", None) or {}).items():
        skipped = set(rows)
        splits[name] = splits[name].select([row for row in range(len(splits[name])) if row not in skipped])
    share = getattr(args, "validation_share", 0)
    if args.eval_split is not None and args.eval_split not in splits and args.train_split in splits and share:
        # No held-out split (a single data file, say): hold out a seeded share of the training products, whole
        # products, so that no (query, product) row of a held-out product is trained on.
        train = splits[args.train_split]
        product_ids = list(dict.fromkeys(train[columns.product_id]))
        held = set(random.Random(f"{args.seed}:validation-holdout").sample(
            product_ids, max(1, min(len(product_ids) - 1, round(share * len(product_ids))))
        ))
        is_held = [product_id in held for product_id in train[columns.product_id]]
        splits[args.eval_split] = train.select([row for row, flag in enumerate(is_held) if flag])
        splits[args.train_split] = train.select([row for row, flag in enumerate(is_held) if not flag])
        logger.info(
            f"--dataset has no {args.eval_split!r} split: holding out {len(held)} of {len(product_ids)} products of "
            f"{args.train_split!r} for evaluation (seed {args.seed}, --validation_share {share})", main_process_only=True
        )
    for split in (args.train_split, args.eval_split):
        if split is not None and split not in splits:
            raise KeyError(f"--dataset {args.dataset!r} has no split {split!r}; it has {sorted(splits)}.")
    train = seeded_subset(splits[args.train_split], args.max_train_products, args.seed)
    has_queries = columns.query in train.column_names
    if has_queries:
        data = TrainingData(products=unique_products(train, columns), pairs=train, queries_are_derived=False)
    else:
        pairs = make_training_pairs(
            train, seed=args.seed, queries_per_product=args.queries_per_product, columns=columns
        )
        data = TrainingData(products=train, pairs=pairs, queries_are_derived=True)
    if args.eval_split is not None:
        held_out = splits[args.eval_split]
        if columns.query in held_out.column_names:
            data.eval_queries = evaluation_queries_from_column(
                held_out, columns=columns, num_queries=args.max_eval_queries, seed=args.seed
            )
        data.eval_products = unique_products(held_out, columns)
    return data


def hard_negative_lookup(data: TrainingData, columns: CatalogueColumns, num_negatives: int, seed: int):
    """`row -> hard-negative product rows`; also drops the pairs whose product has no hard negative.

    Example:
    ```python
    >>> lookup = hard_negative_lookup(data, columns, num_negatives=1, seed=42)
    >>> [row["product_id"] for row in lookup(data.pairs[0])]
    ['15970']
    ```
    """
    negatives = find_hard_negatives(data.products, seed=seed, negatives_per_product=num_negatives, columns=columns)
    position = {str(product_id): index for index, product_id in enumerate(data.products[columns.product_id])}
    keep = [i for i, product_id in enumerate(data.pairs[columns.product_id]) if negatives.get(str(product_id))]
    dropped = len(data.pairs) - len(keep)
    if dropped:
        logger.warning(f"Dropping {dropped} of {len(data.pairs)} pairs whose product has no hard negative.")
        data.pairs = data.pairs.select(keep)

    def lookup(row):
        return [data.products[position[product_id]] for product_id in negatives[str(row[columns.product_id])]]

    return lookup


def image_feature_cache(args, accelerator, model, processor, products, columns: CatalogueColumns) -> dict:
    """The frozen image tower's features of `products`, computed once (see `precompute_image_features`), read
    from and added to the persistent image-feature store unless `--no_image_feature_store`."""
    started = time.perf_counter()
    store = image_feature_store_from_args(args)
    image_features = precompute_image_features(
        model, processor, products, columns=columns, batch_size=args.per_device_eval_batch_size,
        show_progress=accelerator.is_local_main_process, fetch_images=getattr(args, "fetch_images", False),
        store=store,
    )
    stored = f" ({store.summary()})" if store is not None else ""
    logger.info(f"Cached image features of {len(image_features)} products in {time.perf_counter() - started:.0f} s{stored}")
    return image_features


def build_collator(args, accelerator, model, processor, data: TrainingData, columns: CatalogueColumns):
    """The training collator, with the frozen image tower's features cached when asked (default: when frozen).

    Example:
    ```python
    >>> collator = build_collator(args, accelerator, model, processor, data, columns)
    >>> sorted(collator(data.pairs.select(range(4)).to_list()))[:2]
    ['false_negative_mask', 'image_features']
    ```
    """
    hard_negatives = None
    if args.num_hard_negatives:
        hard_negatives = hard_negative_lookup(data, columns, args.num_hard_negatives, args.seed)
    cache_features = args.cache_image_features
    if cache_features is None:
        cache_features = model.config.uses_images and model.image_features_are_frozen
    if cache_features and not model.image_features_are_frozen:
        raise ValueError(
            "--cache_image_features needs image features that stay fixed in training: the image tower must be frozen "
            "(--freeze_image_towers) and, for 4tower, its projection too (no --train_dual_text_tower)."
        )
    image_features = None
    if cache_features:
        image_features = image_feature_cache(args, accelerator, model, processor, data.products, columns)
        sample = data.products.select(range(min(CACHE_CHECK_PRODUCTS, len(data.products)))).to_list()
        check_cached_image_features(model, processor, sample, image_features, columns=columns)
    return RetrievalCollator(
        processor, columns, uses_images=model.config.uses_images, hard_negatives=hard_negatives,
        num_hard_negatives=args.num_hard_negatives, image_features=image_features,
        mask_false_negatives=args.mask_false_negatives, augment_product=visual_word_dropout(args, data, columns),
        stripped_view=StrippedTextView(catalogue_visual_words(data, columns)) if args.visual_word_restoration else None,
        fetch_images=getattr(args, "fetch_images", False), on_image_error=getattr(args, "on_image_error", "mask"),
    )


def catalogue_visual_words(data: TrainingData, columns: CatalogueColumns) -> VisualWords:
    """The default colour and pattern words plus the catalogue's own colour values.

    Example:
    ```python
    >>> "sea green" in catalogue_visual_words(data, columns).phrases
    True
    ```
    """
    colours = []
    if columns.base_colour and columns.base_colour in data.products.column_names:
        colours = [value for value in data.products.unique(columns.base_colour) if isinstance(value, str)]
    return VisualWords.from_values(colours)


def visual_word_dropout(args, data: TrainingData, columns: CatalogueColumns) -> VisualWordDropout | None:
    """The `--visual_word_dropout` augmentation of training product texts (colour and pattern words, including
    the catalogue's own colour values), or None when it is off.

    Example:
    ```python
    >>> visual_word_dropout(parse_args(["--visual_word_dropout", "0.5"]), data, columns)
    VisualWordDropout(probability=0.5, seed=42)
    ```
    """
    if not args.visual_word_dropout:
        return None
    return VisualWordDropout(args.visual_word_dropout, seed=args.seed, words=catalogue_visual_words(data, columns))


def build_evaluator(args, accelerator, model, processor, data: TrainingData, columns: CatalogueColumns,
                    cache_image_features: bool) -> RetrievalEvaluator | HeldOutEvaluator | None:
    """The evaluation-split evaluator (main process only evaluates). When training caches the frozen image
    features, the evaluation products' features are cached once too, instead of at every evaluation.

    Example:
    ```python
    >>> evaluator = build_evaluator(args, accelerator, model, processor, data, columns, cache_image_features=True)
    >>> evaluator(model)["eval/recall@10"]
    0.0229
    ```
    """
    if data.eval_products is None or (data.eval_queries is not None and not data.eval_queries):
        return None
    if data.eval_queries is None:
        # Attribute-derived queries, phrased by the family training never uses, with the text-silent slice and
        # the degraded-text variant: the evaluation that shows whether the image pays.
        evaluator = HeldOutEvaluator(
            data.eval_products, num_queries=args.max_eval_queries, seed=args.seed, columns=columns,
            processor=processor, name="eval", batch_size=args.per_device_eval_batch_size,
            fetch_images=getattr(args, "fetch_images", False),
        )
        if not evaluator.queries:  # nothing to derive a query from: said, and training goes on
            logger.warning(f"No evaluation: the {len(data.eval_products)} products of --eval_split {args.eval_split} "
                           "give no attribute-derived evaluation query (`mmretrieval data-stats` shows which "
                           "queries a catalogue gives); training goes on without evaluation", main_process_only=True)
            return None
    else:
        evaluator = RetrievalEvaluator.with_colour_slice(
            data.eval_products, data.eval_queries, processor, columns=columns, name="eval",
            batch_size=args.per_device_eval_batch_size, fetch_images=getattr(args, "fetch_images", False),
        )
    if cache_image_features and accelerator.is_main_process:  # once, not at every evaluation; after the queries
        evaluator.image_features = image_feature_cache(args, accelerator, model, processor, data.eval_products, columns)
    return evaluator


__all__ = [
    "TrainingData",
    "build_collator",
    "build_evaluator",
    "catalogue_visual_words",
    "hard_negative_lookup",
    "load_training_data",
    "seeded_subset",
]
