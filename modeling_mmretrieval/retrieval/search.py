"""Glue between a trained retriever and a `ProductIndex`: embed queries, index catalogues, search.

Example:
```python
>>> from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
>>> from modeling_mmretrieval.retrieval.search import build_product_index, search_text
>>> model = MultimodalRetrievalModel.from_pretrained("outputs/run/final")
>>> processor = MultimodalRetrievalProcessor.from_pretrained("outputs/run/final")
>>> index = build_product_index(model, processor, catalogue)
>>> scores, ids = search_text(model, processor, index, ["red running shoes for men"], k=10)
```
"""

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image

from .. import speedups
from ..data.catalogue import CatalogueColumns
from ..data.collator import RetrievalCollator, product_fields
from ..data.images import ImageReport, load_product_image
from ..processing_mmretrieval import join_product_text, validate_texts
from .index import ProductIndex

# Indexing reads this many batches of rows at a time and regroups them by product-text length.
LENGTH_SORT_WINDOW_BATCHES = 16


_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype", "_commit_hash",
     "custom_pipelines"}
)


def _without_volatile_keys(settings):
    if isinstance(settings, dict):
        return {k: _without_volatile_keys(v) for k, v in settings.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(settings, list):
        return [_without_volatile_keys(v) for v in settings]
    return settings


def config_fingerprint(config) -> str:
    """A stable hash of the settings that decide a model's embedding space (towers, fusion, sizes).

    Load-time details (dtype, paths, library versions), at any nesting depth, are left out so the same
    checkpoint gives the same fingerprint however it is loaded.
    """
    settings = _without_volatile_keys(config.to_dict())
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model) -> str:
    return model.config.name_or_path or model.__class__.__name__


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def embed_queries(model, processor, queries: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """L2-normalised query embeddings `(len(queries), embedding_dim)` as float32 on the CPU.

    A single string is one query. Every query is checked before any is embedded, so an error names its
    position in `queries`.
    """
    queries = validate_texts(queries, "Query")
    device = _model_device(model)
    chunks = []
    for start in range(0, len(queries), batch_size):
        inputs = _to_device(processor.encode_queries(queries[start : start + batch_size]), device)
        chunks.append(model.get_query_embeddings(**inputs).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty((0, model.embedding_dim))


@torch.no_grad()
def embed_images(model, processor, images: Sequence) -> torch.Tensor:
    """L2-normalised image-query embeddings (4tower concat/alpha_concat models).

    Images are PIL images or encoded ones (bytes, file paths, `datasets.Image` dicts), decoded with
    `load_product_image`.
    """
    model.check_image_queries_supported()
    images = [image if isinstance(image, Image.Image) else load_product_image(image).image for image in images]
    inputs = processor.encode_images(images)
    if not bool(inputs["image_mask"].all()):
        raise ValueError("Every query image must be a decodable image; got a missing one.")
    pixel_values = inputs["pixel_values"].to(_model_device(model))
    return model.get_image_query_embeddings(pixel_values=pixel_values).float().cpu()


def product_embedder(model, collator: RetrievalCollator) -> Callable[[list[dict]], torch.Tensor]:
    """An `embed_batch(rows)` callable for `ProductIndex.build`: collate, embed, return float32 CPU rows."""
    device = _model_device(model)

    @torch.no_grad()
    def embed_batch(rows: list[dict]) -> torch.Tensor:
        batch = collator(rows)
        inputs = {key.removeprefix("product_"): value for key, value in _to_device(batch, device).items()}
        return model.get_product_embeddings(**inputs).float().cpu()

    return embed_batch


def _length_sorted_embedder(
    embed_batch: Callable[[list[dict]], torch.Tensor], text_length: Callable[[Mapping], int], batch_size: int
) -> Callable[[list[dict]], torch.Tensor]:
    """Wraps `embed_batch` to take a window of rows: they are embedded `batch_size` at a time, longest text
    first, so each batch pads to a similar length; the embeddings come back in the window's row order."""

    def embed_window(rows: list[dict]) -> torch.Tensor:
        if len(rows) <= batch_size:
            return embed_batch(rows)
        order = sorted(range(len(rows)), key=lambda position: text_length(rows[position]), reverse=True)
        in_length_order = torch.cat(
            [embed_batch([rows[position] for position in order[start : start + batch_size]])
             for start in range(0, len(rows), batch_size)]
        )
        embeddings = torch.empty_like(in_length_order)
        embeddings[torch.tensor(order)] = in_length_order
        return embeddings

    return embed_window


def _autocast_embedder(embed_batch: Callable[[list[dict]], torch.Tensor], device: torch.device, dtype: torch.dtype):
    def embed_in_dtype(rows: list[dict]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return embed_batch(rows)

    return embed_in_dtype


def build_product_index(
    model,
    processor,
    catalogue: Iterable[Mapping],
    *,
    columns: CatalogueColumns | None = None,
    batch_size: int = 64,
    output_dir=None,
    show_progress: bool = True,
    shard: tuple[int, int] | None = None,
    metadata_columns: Sequence[str] = ("title",),
    sort_by_length: bool = True,
    dtype: torch.dtype | None = None,
    image_features: Mapping[str, torch.Tensor | None] | None = None,
    fetch_images: bool = False,
    image_report: ImageReport | None = None,
    on_image_error: str = "mask",
) -> ProductIndex:
    """Encodes a catalogue (a `datasets.Dataset` or iterable of rows) into a `ProductIndex`.

    Images are decoded per batch; the index records the model's id and config fingerprint so a later
    load with another model is refused. The index keeps the catalogue's row order.

    Args:
        sort_by_length: read `LENGTH_SORT_WINDOW_BATCHES` batches of rows at a time and encode them in
            batches of similar product-text length, so little compute goes to padding. Each product gets
            the same embedding as in catalogue-order batches (up to float rounding).
        dtype: run the towers under `torch.autocast` in this dtype (`torch.bfloat16` on GPUs and CPUs
            with native bf16); the index still stores float32.
        image_features: the frozen image tower's features of every product, keyed by `str(product_id)` (as
            `training.image_feature_cache.precompute_image_features` returns them): images are then neither decoded nor
            run through the tower. Only valid while the image tower stays frozen; a product missing from
            it raises `KeyError`. A catalogue in which no product has an image works too.
        fetch_images: download `http(s)://` product images (refused by default: the product is then indexed
            text-only and counted as `refused`).
        image_report: an `ImageReport` that counts how every product's image loaded (ok / missing / undecodable
            / refused, with example ids); print its `summary()` so nothing is indexed silently without its image.
        on_image_error: `"mask"` indexes a product whose image fails text-only; `"raise"` stops with an
            `ImageDecodeError` naming the product.

    A bad product (no text, text that is not valid Unicode) raises an error naming its id and column.

    Example:
    ```python
    >>> index = build_product_index(model, processor, catalogue, batch_size=64, dtype=torch.bfloat16)
    >>> scores, ids = index.search(embed_queries(model, processor, ["white sneakers"]), k=10)
    ```
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    columns = columns or CatalogueColumns()
    model.eval()
    if processor.fast_image_processing and processor.batched_image_processor is None:
        speedups.apply_to_processor(processor)  # the saved preference: same pixels within tolerance, faster
    collator = RetrievalCollator(
        processor, columns, with_queries=False, uses_images=model.config.uses_images, image_features=image_features,
        fetch_images=fetch_images, image_feature_size=getattr(model, "image_feature_size", None),
        image_report=image_report, on_image_error=on_image_error,
    )
    embed_batch = product_embedder(model, collator)
    if dtype is not None:
        embed_batch = _autocast_embedder(embed_batch, _model_device(model), dtype)
    rows_per_read = batch_size
    if sort_by_length:
        fields, separator = processor.product_text_fields, processor.product_text_separator

        def text_length(row: Mapping) -> int:
            try:
                return len(join_product_text(product_fields(row, columns), fields, separator))
            except (TypeError, ValueError):
                return 0  # still embedded: the collator then raises the error that names the product

        embed_batch = _length_sorted_embedder(embed_batch, text_length, batch_size)
        rows_per_read = batch_size * LENGTH_SORT_WINDOW_BATCHES
    return ProductIndex.build(
        catalogue,
        embed_batch,
        output_dir=output_dir,
        batch_size=rows_per_read,
        id_column=columns.product_id,
        model_id=model_identity(model),
        config_hash=config_fingerprint(model.config),
        show_progress=show_progress,
        shard=shard,
        metadata_columns=metadata_columns,
    )


def search_text(model, processor, index: ProductIndex, queries: Sequence[str], k: int = 10):
    """Top-k `(scores, product_ids)` for text queries."""
    return index.search(embed_queries(model, processor, queries), k=k)


def search_images(model, processor, index: ProductIndex, images: Sequence, k: int = 10):
    """Top-k `(scores, product_ids)` for query images (image-to-product search)."""
    return index.search(embed_images(model, processor, images), k=k)


__all__ = [
    "build_product_index",
    "config_fingerprint",
    "embed_images",
    "embed_queries",
    "model_identity",
    "product_embedder",
    "search_images",
    "search_text",
]
