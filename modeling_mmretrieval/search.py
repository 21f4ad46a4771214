"""Glue between a trained retriever and a `ProductIndex`: embed queries, index catalogues, search.

Example:
```python
>>> from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
>>> from modeling_mmretrieval.search import build_product_index, search_text
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

from .collator import RetrievalCollator
from .data import CatalogueColumns
from .index import ProductIndex


def config_fingerprint(config) -> str:
    """A stable hash of the settings that decide a model's embedding space (towers, fusion, sizes)."""
    settings = config.to_dict()
    for volatile in ("transformers_version", "_name_or_path", "architectures", "auto_map", "dtype"):
        settings.pop(volatile, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model) -> str:
    return model.config.name_or_path or model.__class__.__name__


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@torch.no_grad()
def embed_queries(model, processor, queries: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """L2-normalised query embeddings `(len(queries), embedding_dim)` as float32 on the CPU."""
    device = _model_device(model)
    chunks = []
    for start in range(0, len(queries), batch_size):
        inputs = _to_device(processor.encode_queries(list(queries[start : start + batch_size])), device)
        chunks.append(model.get_query_embeddings(**inputs).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty((0, model.embedding_dim))


@torch.no_grad()
def embed_images(model, processor, images: Sequence) -> torch.Tensor:
    """L2-normalised image-query embeddings for PIL images (4tower concat/alpha_concat models)."""
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
) -> ProductIndex:
    """Encodes a catalogue (a `datasets.Dataset` or iterable of rows) into a `ProductIndex`.

    Images are decoded per batch; the index records the model's id and config fingerprint so a later
    load with another model is refused.
    """
    columns = columns or CatalogueColumns()
    model.eval()
    collator = RetrievalCollator(processor, columns, with_queries=False, uses_images=model.config.uses_images)
    return ProductIndex.build(
        catalogue,
        product_embedder(model, collator),
        output_dir=output_dir,
        batch_size=batch_size,
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
    "product_embedder",
    "search_images",
    "search_text",
]
