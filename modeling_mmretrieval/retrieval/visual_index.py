"""The visual-similarity index: the image tower's features of a catalogue's product photos ("more like this").

Only 4tower models with `concat`/`alpha_concat` fusion can put an image query into the product index's space.
Every model with an image tower (3tower and 4tower, whatever the fusion) can still compare photos with photos: its
image tower's features (`model.get_image_features`: DINOv2, or the dual encoder's image embedding), L2-normalised,
are kept for every product with a usable image in a second `ProductIndex`, the visual index, beside the product
index (`<index_dir>/visual/`). A query photo embedded the same way (`search.embed_image_features`) ranks it by
image-to-image cosine (`search.search_images(visual_index=...)`), and a text + image query adds that cosine to the
text score (`search.search_text_and_image`).

The visual index is a `ProductIndex` in the same format, with the same checksums and the same model fingerprint
(`search.model_fingerprint`: config and weights) as the product index, and is loaded with the same checks: a
retrained model refuses it. Products without a usable image are left out of it and counted in the `ImageReport`.

Example:
```python
>>> index = build_product_index(model, processor, catalogue, output_dir="indexes/test")
>>> visual_index = build_visual_index(model, processor, catalogue, index_dir="indexes/test")
>>> visual_index = load_visual_index("indexes/test", expected_model_fingerprint=model_fingerprint(model))
>>> scores, ids = search_images(model, processor, index, ["shoe.jpg"], k=10, visual_index=visual_index)
```
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import speedups
from ..data.catalogue import CatalogueColumns
from ..data.collator import RetrievalCollator
from ..data.images import ImageReport
from ..data.rows import known_row_count, row_batches
from .image_feature_store import ImageFeatureStore, with_image_feature_store
from .index import ProductIndex
from .index_files import META_FILENAME
from .search import check_image_tower, index_provenance

# The visual index lives in this folder of the product index's folder.
VISUAL_INDEX_DIRNAME = "visual"
# Where a catalogue row carries its product's image feature from the tower to `ProductIndex.build`.
_FEATURE_KEY = "__image_feature__"


def visual_index_dir(index_dir: str | os.PathLike) -> Path:
    """The folder of the visual index kept beside the product index saved in `index_dir`.

    Example: `visual_index_dir("indexes/test") == Path("indexes/test/visual")`.
    """
    return Path(index_dir) / VISUAL_INDEX_DIRNAME


@torch.no_grad()
def _batch_features(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The image tower's features of a collated product batch (cached, or run through the tower; without the colour
    description a model may append), float32 on the CPU; None when no product of the batch has an image."""
    image_mask = batch["image_mask"]
    if not bool(image_mask.any()):
        return None
    if "image_features" in batch:
        features = batch["image_features"]
    else:
        device = next(model.parameters()).device
        features = model.get_image_features(batch["pixel_values"].to(device), image_mask.to(device))
    return features[..., : model.image_tower_feature_size].float().cpu()


def _rows_with_image_features(
    model, collator: RetrievalCollator, catalogue: Iterable[Mapping], batch_size: int, show_progress: bool
) -> Iterator[dict]:
    """`{product_id column: id, _FEATURE_KEY: feature}` for every product of `catalogue` with a usable image, in
    catalogue order; `ValueError` at the end when no product had one."""
    id_column = collator.columns.product_id
    total = known_row_count(catalogue)
    kept = 0
    with tqdm(total=total, unit="product", desc="Indexing product images", disable=not show_progress) as progress:
        for rows in row_batches(catalogue, batch_size):
            batch = collator(rows)
            features = _batch_features(model, batch)
            if features is not None:
                for row, has_image, feature in zip(rows, batch["image_mask"].tolist(), features, strict=True):
                    if has_image:
                        kept += 1
                        yield {id_column: row.get(id_column), _FEATURE_KEY: feature}
            progress.update(len(rows))
    if not kept:
        raise ValueError(
            f"no product of the catalogue has a usable image ({collator.image_report.summary()}): a visual index "
            "needs product photos"
        )


def _normalised_features(rows: list[dict]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.stack([row[_FEATURE_KEY] for row in rows]), dim=-1)


def build_visual_index(
    model,
    processor,
    catalogue: Iterable[Mapping],
    *,
    columns: CatalogueColumns | None = None,
    image_features: Mapping[str, torch.Tensor | None] | None = None,
    batch_size: int = 64,
    index_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    fetch_images: bool = False,
    image_report: ImageReport | None = None,
    image_feature_store: ImageFeatureStore | None = None,
) -> ProductIndex:
    """The visual index of a catalogue: the L2-normalised image-tower features of every product with a usable image.

    Build it from the catalogue the product index was built from (same rows, same columns): its rows follow the
    catalogue's order, and products without a usable image (missing, undecodable, a URL without `fetch_images`) are
    left out and counted in `image_report`. It records the model's `model_fingerprint`, as the product index does.

    Args:
        image_features: the image tower's features of the products, keyed by `str(product_id)` (`None` for an
            image-less product), e.g. the `ImageFeatureCache` of `training.image_feature_cache` computed with this
            model: images are then neither decoded nor run through the tower. A product missing from it raises
            `KeyError`.
        index_dir: the folder of the product index; the visual index is saved in its `visual/` folder
            (`visual_index_dir`), atomically, replacing an existing one only with `overwrite`. The product index
            must be saved there first (its folder is then no longer empty). None keeps the index in memory.
        fetch_images: download `http(s)://` product images (refused by default: the product is left out and
            counted as `refused`).
        image_report: an `ImageReport` that counts how every product's image loaded (a new one by default).
        image_feature_store: an `ImageFeatureStore` (`retrieval.image_feature_store`) to read the features from,
            computing and adding only those of photos it has not seen (written before the build returns); unused
            with `image_features`.

    A model without an image tower (`architecture='text_only'`) raises `ValueError`, and so does a catalogue in
    which no product has a usable image.

    Example:
    ```python
    >>> report = ImageReport()
    >>> visual_index = build_visual_index(model, processor, catalogue, index_dir="indexes/test", image_report=report)
    >>> len(visual_index), report.summary()
    (38, "images: 38 ok, 2 missing (e.g. 'sku-7': ...), 0 undecodable, 0 refused")
    ```
    """
    check_image_tower(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    output_dir = None
    if index_dir is not None:
        if not (Path(index_dir) / META_FILENAME).is_file():
            raise ValueError(
                f"{index_dir} holds no product index (no {META_FILENAME}): the visual index is kept beside one, so "
                "save the product index there first (build_product_index(..., output_dir=index_dir))"
            )
        output_dir = visual_index_dir(index_dir)
    columns = columns or CatalogueColumns()
    model.eval()
    if image_features is None and processor.fast_image_processing and processor.batched_image_processor is None:
        speedups.apply_to_processor(processor)  # the saved preference, as `build_product_index` applies it
    collator = RetrievalCollator(
        processor, columns, with_queries=False, uses_images=True, image_features=image_features,
        fetch_images=fetch_images, image_feature_size=model.image_feature_size, image_report=image_report,
    )
    collator = with_image_feature_store(collator, model, processor, image_feature_store)
    visual_index = ProductIndex.build(
        _rows_with_image_features(model, collator, catalogue, batch_size, show_progress),
        _normalised_features,
        output_dir=output_dir,
        overwrite=overwrite,
        batch_size=batch_size,
        id_column=columns.product_id,
        **index_provenance(model),
        show_progress=False,  # the rows' own bar counts the catalogue, image-less products included
    )
    if image_feature_store is not None:
        image_feature_store.flush()
    return visual_index


def load_visual_index(
    index_dir: str | os.PathLike,
    *,
    expected_model_fingerprint: str | None = None,
    mmap: bool = True,
    verify_checksums: bool = True,
) -> ProductIndex:
    """The visual index saved beside the product index in `index_dir` (in `visual_index_dir(index_dir)`), with the
    checks of `ProductIndex.load`: `IndexModelMismatchError` when `expected_model_fingerprint` (the
    `model_fingerprint` of the model about to search) differs from the one it records, `IndexIntegrityError` for
    damaged files or rows, `FileNotFoundError` when no visual index was saved there.

    Example:
    ```python
    >>> visual_index = load_visual_index("indexes/test", expected_model_fingerprint=model_fingerprint(model))
    ```
    """
    return ProductIndex.load(
        visual_index_dir(index_dir), expected_model_fingerprint=expected_model_fingerprint, mmap=mmap,
        verify_checksums=verify_checksums,
    )


__all__ = ["VISUAL_INDEX_DIRNAME", "build_visual_index", "load_visual_index", "visual_index_dir"]
