"""Data collator: dataset rows -> `MultimodalRetrievalModel` inputs, decoding images one batch at a time.

Rows keep their images encoded (`datasets.Image(decode=False)`); the collator decodes only the batch in
hand through `data.images.load_product_image`, so a catalogue never sits decoded in memory. A broken or
missing image makes that product image-less (`image_mask` False) under the default `on_image_error="mask"`,
or raises `ImageDecodeError` naming the product under `"raise"`; either way it is counted in the collator's
`image_report` (`data.images.ImageReport`), which a run prints. Other bad rows raise a typed error naming
the product and column in one line: `TypeError` for a row that is not a mapping or a wrong-typed value (an
image that is a number, a query that is not a string), `ValueError` for a product without text, text that is
not valid Unicode or an empty query, `KeyError` for a missing query column.

A batch in which no product has an image works on every path: the image tower is skipped, and cached image
features get zero placeholders of the cache's feature size.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .catalogue import CatalogueColumns
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, ImageReport, ImageStatus, load_product_image
from .product_checks import BadProduct, has_text, text_problem
from .queries import QUERY_ATTRIBUTES_COLUMN
from .relevance import product_matches

# The reason counted for an image-less product of a cache that carries no report of how its images loaded.
_NOT_CACHED_REASON = "image-less in the image-feature cache"

# Batch keys of the stripped view of the positive products (`stripped_view`): the training loss's, not the model's.
STRIPPED_VIEW_PREFIX = "stripped_product_"


def product_fields(row: Mapping, columns: CatalogueColumns) -> dict:
    """The row as a product mapping, with the catalogue's own column names also under the canonical names
    (`title`, `description`, ...) that processors' `product_text_fields` use."""
    product = dict(row)
    for canonical in ("product_id", "title", "description", "brand", "gender", "base_colour", "article_type", "usage"):
        source = getattr(columns, canonical, None)
        if source is not None and source in row:
            product[canonical] = row[source]
    return product


def _check_rows_are_mappings(rows: Sequence, what: str) -> None:
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(
                f"{what} row {position} is a {type(row).__name__}; the collator takes mappings of column -> value "
                "(dataset rows)."
            )


def _column_of(field_name: str, columns: CatalogueColumns) -> str:
    """The catalogue's own column behind a canonical product field (`title` -> the `CatalogueColumns.title`)."""
    column = getattr(columns, field_name, None)
    return column if isinstance(column, str) else field_name


def _first_bad_item(products: Sequence[Mapping], queries: Sequence | None, product_ids: Sequence,
                    text_fields: Sequence[str], columns: CatalogueColumns) -> BadProduct | None:
    """The first query or product the processor refuses, named by product id and catalogue column.

    Searched in the processor's order (every query, then every product), so it is the item behind its error.
    """
    names = [None if product_id is None else str(product_id) for product_id in product_ids]
    for query, name in zip(queries or (), names):
        if not isinstance(query, str):
            return BadProduct(name, columns.query, f"query is a {type(query).__name__}, expected text")
        if not query.strip():
            return BadProduct(name, columns.query, "blank query")
        if text_problem(query):
            return BadProduct(name, columns.query, text_problem(query))
    for product, name in zip(products, names):
        for field_name in text_fields:
            problem = text_problem(product.get(field_name))
            if problem is not None:
                return BadProduct(name, _column_of(field_name, columns), problem)
        if not any(has_text(product.get(field_name)) for field_name in text_fields):
            listed = " and ".join(repr(_column_of(field_name, columns)) for field_name in text_fields)
            return BadProduct(name, _column_of(text_fields[0], columns), f"blank text (no text in {listed})")
    return None


@contextlib.contextmanager
def _naming_batch_products(products: Sequence[Mapping], queries: Sequence | None, product_ids: Sequence,
                           text_fields: Sequence[str], columns: CatalogueColumns) -> Iterator[None]:
    """The processor reports a bad query or product by its position in the batch; this names the product and
    column instead (one line), so the offending catalogue row can be found."""
    try:
        yield
    except (TypeError, ValueError) as error:
        if type(error) not in (TypeError, ValueError):  # subclasses may take other constructor arguments
            raise
        bad = _first_bad_item(products, queries, product_ids, text_fields, columns)
        if bad is not None:
            raise type(error)(bad.line()) from error
        hint = f"Batch positions 0..{len(product_ids) - 1} hold products {list(product_ids)}."
        raise type(error)(f"{error} {hint}") from error


class RetrievalCollator:
    r"""
    Collates `(query, product)` rows into a training or scoring batch for [`MultimodalRetrievalModel`].

    Args:
        processor ([`MultimodalRetrievalProcessor`]): tokenizes and preprocesses.
        columns ([`CatalogueColumns`]): names of the query, product and image columns.
        with_queries (`bool`): read the query column (training); `False` collates products only (indexing).
        uses_images (`bool`): decode images (4tower/3tower); text-only models skip image decoding entirely.
        on_image_error (`str`): `"mask"` marks undecodable images as missing; `"raise"` raises.
        max_image_pixels (`int`): decompression-bomb limit passed to `load_product_image`.
        hard_negatives (`Callable[[Mapping], Sequence[Mapping]]`, *optional*): returns a row's hard-negative
            product rows; each query then gets `num_hard_negatives` extra products appended after the positives.
        num_hard_negatives (`int`): hard negatives per query (rows with fewer are padded by repeating theirs).
        image_features (`Mapping[str, torch.Tensor]`, *optional*): precomputed image-tower features keyed by
            `str(product_id)` (frozen towers; `training.image_feature_cache.precompute_image_features` builds them); the batch
            then carries `image_features` instead of `pixel_values`. A cache built there also carries its
            `feature_size` and the `image_report` of its images, which this collator's report copies.
        image_feature_size (`int`, *optional*): width of the zero placeholders of image-less products with cached
            features (default: the cache's `feature_size`, else the width of any cached feature in the batch).
            When it is unknown and no product of a batch has features, the batch carries only `image_mask`.
        fetch_images (`bool`): download `http(s)://` images (`load_product_image(fetch_urls=True)`); by default
            an image URL is refused and the product is image-less (counted as `refused`).
        image_report ([`~data.images.ImageReport`], *optional*): the report to count images in (default: a new
            one, `collator.image_report`); pass one to share it between collators.
        mask_false_negatives (`bool`): for attribute-derived queries (rows with a `query_attributes` column),
            emit `false_negative_mask`: in-batch products that satisfy another query's attributes are
            relevant to it too, so the loss leaves them out instead of pushing them away.
        augment_product (`Callable[[Mapping, str, str], Mapping]`, *optional*): a training augmentation of each
            product mapping (called with the product, the id column and the query column) before its text is
            tokenised; `set_epoch` reaches it when it has one. E.g.
            [`~data.visual_words.VisualWordDropout`]. Only for training collators: evaluation and indexing
            must see products as they are.
        stripped_view (`Callable[[Mapping], Mapping]`, *optional*): a second view of each positive product
            (e.g. [`~data.visual_words.StrippedTextView`], its text without visual words), tokenised into
            `stripped_product_*` tensors for [`~training.visual_word_restoration.VisualWordRestorationLoss`],
            which removes them from the batch before the model sees it. Training collators only.

    Example:
    ```python
    >>> collator = RetrievalCollator(processor, uses_images=model.config.uses_images)
    >>> loader = torch.utils.data.DataLoader(pairs, batch_size=32, collate_fn=collator)
    >>> loss = model(**next(iter(loader))).loss
    ```
    """

    def __init__(
        self,
        processor,
        columns: CatalogueColumns | None = None,
        *,
        with_queries: bool = True,
        uses_images: bool = True,
        on_image_error: str = "mask",
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        hard_negatives: Callable[[Mapping], Sequence[Mapping]] | None = None,
        num_hard_negatives: int = 0,
        image_features: Mapping[str, torch.Tensor] | None = None,
        mask_false_negatives: bool = True,
        augment_product: Callable[[Mapping, str, str], Mapping] | None = None,
        stripped_view: Callable[[Mapping], Mapping] | None = None,
        fetch_images: bool = False,
        image_feature_size: int | None = None,
        image_report: ImageReport | None = None,
    ):
        if on_image_error not in ("mask", "raise"):
            raise ValueError(f"on_image_error must be 'mask' or 'raise', got {on_image_error!r}")
        if num_hard_negatives and hard_negatives is None:
            raise ValueError("num_hard_negatives > 0 needs a `hard_negatives` lookup.")
        self.processor, self.columns = processor, columns or CatalogueColumns()
        self.with_queries, self.uses_images, self.mask_false_negatives = with_queries, uses_images, mask_false_negatives
        self.on_image_error, self.max_image_pixels = on_image_error, max_image_pixels
        self.hard_negatives, self.num_hard_negatives = hard_negatives, num_hard_negatives
        self.image_features, self.augment_product = image_features, augment_product
        if stripped_view is not None and not with_queries:
            raise ValueError("stripped_view is a training view: it needs with_queries=True.")
        self.stripped_view = stripped_view
        self.fetch_images = fetch_images
        self.image_feature_size = image_feature_size or getattr(image_features, "feature_size", None)
        # How every product's image loaded (once per product): a run prints and records it, never silent.
        self.image_report = image_report if image_report is not None else ImageReport()

    @property
    def image_problems(self) -> int:
        """Products made image-less so far (missing, undecodable or refused images); see `image_report`."""
        return self.image_report.failures

    def set_epoch(self, epoch: int) -> None:
        """Passes the epoch to an augmentation whose draws depend on it (as samplers take theirs)."""
        if hasattr(self.augment_product, "set_epoch"):
            self.augment_product.set_epoch(epoch)

    def _negatives_for(self, row: Mapping) -> list[Mapping]:
        negatives = list(self.hard_negatives(row))
        if not negatives:
            raise ValueError(
                f"Product {row.get(self.columns.product_id)!r} has no hard negatives; drop it or set num_hard_negatives=0."
            )
        return [negatives[i % len(negatives)] for i in range(self.num_hard_negatives)]

    def _load_images(self, rows: Sequence[Mapping]) -> list:
        images = []
        for row in rows:
            product_id = row.get(self.columns.product_id)
            try:
                result = load_product_image(
                    row.get(self.columns.image), max_pixels=self.max_image_pixels, fetch_urls=self.fetch_images
                )
            except TypeError as error:  # a wrong-typed image value, e.g. a number
                raise TypeError(f"product {product_id!r}, column {self.columns.image!r}: {error}") from error
            self.image_report.add(product_id, result)
            if not result.has_image and self.on_image_error == "raise":
                where = f"product {product_id!r}, column {self.columns.image!r}: {result.error}"
                raise ImageDecodeError(result.reason, where)
            images.append(result.image)
        return images

    def _cached_features(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        features, mask = [], []
        cache_report = getattr(self.image_features, "image_report", None)
        for row in rows:
            product_id = row.get(self.columns.product_id)
            key = str(product_id)  # the cache's keys, as precompute_image_features writes them
            if key not in self.image_features:
                raise KeyError(f"No cached image features for product {product_id!r}; rebuild the cache.")
            feature = self.image_features[key]
            if cache_report is None or not self.image_report.copy_outcome(cache_report, key):
                if feature is not None:
                    self.image_report.record(product_id, ImageStatus.OK)
                else:
                    self.image_report.record(product_id, ImageStatus.MISSING, _NOT_CACHED_REASON)
            mask.append(feature is not None)
            features.append(feature)
        image_mask = torch.tensor(mask, dtype=torch.bool)
        size = next((feature.shape[-1] for feature in features if feature is not None), self.image_feature_size)
        if size is None:
            # No product of the batch has an image and the cache does not say its width: the model makes the
            # image-less products' zero features itself.
            return {"image_mask": image_mask}
        dtype = next((feature.dtype for feature in features if feature is not None), torch.float32)
        stacked = torch.stack([feature if feature is not None else torch.zeros(size, dtype=dtype) for feature in features])
        return {"image_features": stacked, "image_mask": image_mask}

    def _queries(self, rows: Sequence[Mapping]) -> list:
        queries = []
        for row in rows:
            if self.columns.query not in row:
                raise KeyError(
                    f"Query column {self.columns.query!r} is missing from the row of product "
                    f"{row.get(self.columns.product_id)!r}; the row has columns {sorted(row)}."
                )
            queries.append(row[self.columns.query])
        return queries

    def _false_negative_mask(self, rows: Sequence[Mapping], product_rows: Sequence[Mapping]) -> torch.Tensor:
        mask = torch.zeros((len(rows), len(product_rows)), dtype=torch.bool)
        for i, row in enumerate(rows):
            attributes = json.loads(row[QUERY_ATTRIBUTES_COLUMN])
            for j, product in enumerate(product_rows):
                if j != i and product_matches(product, attributes, self.columns):
                    mask[i, j] = True
        return mask

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        rows = list(rows)
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        _check_rows_are_mappings(rows, "batch")
        negatives = [n for row in rows for n in self._negatives_for(row)] if self.num_hard_negatives else []
        _check_rows_are_mappings(negatives, "hard-negative")
        product_rows = rows + negatives
        products = [product_fields(row, self.columns) for row in product_rows]
        stripped = [self.stripped_view(product) for product in products[: len(rows)]] if self.stripped_view else None
        if self.augment_product is not None:
            products = [self.augment_product(product, "product_id", self.columns.query) for product in products]
        queries = self._queries(rows) if self.with_queries else None
        product_ids = [row.get(self.columns.product_id) for row in product_rows]
        text_fields = self.processor.product_text_fields
        with _naming_batch_products(products, queries, product_ids, text_fields, self.columns):
            batch = dict(self.processor(queries=queries, products=products))
            if stripped is not None:
                batch.update({f"{STRIPPED_VIEW_PREFIX}{key}": value
                              for key, value in self.processor.encode_products(stripped).items()})
        if self.with_queries and self.mask_false_negatives and QUERY_ATTRIBUTES_COLUMN in rows[0]:
            batch["false_negative_mask"] = self._false_negative_mask(rows, product_rows)
        if self.uses_images:
            if self.image_features is not None:
                batch.update(self._cached_features(product_rows))
            else:
                batch.update(self.processor.encode_images(self._load_images(product_rows)))
        return batch


__all__ = ["STRIPPED_VIEW_PREFIX", "RetrievalCollator", "product_fields"]
