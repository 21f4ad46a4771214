"""Data collator: dataset rows -> `MultimodalRetrievalModel` inputs, decoding images one batch at a time.

Rows keep their images encoded (`datasets.Image(decode=False)`); the collator decodes only the batch in
hand through `data.images.load_product_image`, so a catalogue never sits decoded in memory. A broken or
missing image makes that product image-less (`image_mask` False) under the default `on_image_error="mask"`,
or raises `ImageDecodeError` naming the product under `"raise"`. Other bad rows raise a typed error naming
the product: `TypeError` for a row that is not a mapping or a wrong-typed value (an image that is a number,
a query that is not a string), `ValueError` for a product without text or an empty query, `KeyError` for a
missing query column.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from .catalogue import CatalogueColumns
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageDecodeError, load_product_image
from .queries import QUERY_ATTRIBUTES_COLUMN
from .relevance import product_matches


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


@contextlib.contextmanager
def _naming_batch_products(product_ids: Sequence) -> Iterator[None]:
    """The processor reports a bad query or product by its position in the batch; this adds which product
    each position holds, so the offending dataset row can be found."""
    try:
        yield
    except (TypeError, ValueError) as error:
        if type(error) not in (TypeError, ValueError):  # subclasses may take other constructor arguments
            raise
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
            then carries `image_features` instead of `pixel_values`.
        mask_false_negatives (`bool`): for attribute-derived queries (rows with a `query_attributes` column),
            emit `false_negative_mask`: in-batch products that satisfy another query's attributes are
            relevant to it too, so the loss leaves them out instead of pushing them away.
        augment_product (`Callable[[Mapping, str, str], Mapping]`, *optional*): a training augmentation of each
            product mapping (called with the product, the id column and the query column) before its text is
            tokenised; `set_epoch` reaches it when it has one. E.g.
            [`~data.visual_words.VisualWordDropout`]. Only for training collators: evaluation and indexing
            must see products as they are.

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
        self.image_problems = 0  # products made image-less so far; a number to report, never silent

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
            try:
                result = load_product_image(
                    row.get(self.columns.image), max_pixels=self.max_image_pixels, on_error=self.on_image_error
                )
            except (ImageDecodeError, TypeError) as error:
                where = f"product {row.get(self.columns.product_id)!r}, column {self.columns.image!r}: {error}"
                if isinstance(error, ImageDecodeError):
                    raise ImageDecodeError(error.reason, where) from error
                raise TypeError(where) from error  # a wrong-typed image value, e.g. a number
            self.image_problems += not result.has_image
            images.append(result.image)
        return images

    def _cached_features(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        features, mask = [], []
        for row in rows:
            product_id = row.get(self.columns.product_id)
            key = str(product_id)  # the cache's keys, as precompute_image_features writes them
            if key not in self.image_features:
                raise KeyError(f"No cached image features for product {product_id!r}; rebuild the cache.")
            feature = self.image_features[key]
            mask.append(feature is not None)
            features.append(feature)
        size = next((f.shape[-1] for f in features if f is not None), 1)
        stacked = torch.stack([f if f is not None else torch.zeros(size) for f in features])
        return {"image_features": stacked, "image_mask": torch.tensor(mask, dtype=torch.bool)}

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
        if self.augment_product is not None:
            products = [self.augment_product(product, "product_id", self.columns.query) for product in products]
        queries = self._queries(rows) if self.with_queries else None
        with _naming_batch_products([row.get(self.columns.product_id) for row in product_rows]):
            batch = dict(self.processor(queries=queries, products=products))
        if self.with_queries and self.mask_false_negatives and QUERY_ATTRIBUTES_COLUMN in rows[0]:
            batch["false_negative_mask"] = self._false_negative_mask(rows, product_rows)
        if self.uses_images:
            if self.image_features is not None:
                batch.update(self._cached_features(product_rows))
            else:
                batch.update(self.processor.encode_images(self._load_images(product_rows)))
        return batch


__all__ = ["RetrievalCollator", "product_fields"]
