"""The frozen image-feature cache, and the image size the image tower is fed.

A frozen image tower computes the same features for a product at every step, so training runs it once per
product (`precompute_image_features`) and hands the features to the collator (`RetrievalCollator(image_features=)`)
and the evaluator instead of decoding and embedding every image again each epoch. `check_cached_image_features`
verifies the cache against a fresh computation at start-up. With an `ImageFeatureStore`
(`retrieval.image_feature_store`) the features also persist on disk between runs, shared with indexing and
evaluation, so a second run of the same image tower computes none of them. Small catalogue photos are embedded
at a smaller image size than the processor's default (`resize_image_processor`) where the tower supports it.

Example:
```python
>>> resize_image_processor(processor.image_processor, 112)
>>> cache = precompute_image_features(model, processor, catalogue, store=ImageFeatureStore())
>>> check_cached_image_features(model, processor, catalogue.select(range(8)).to_list(), cache)  # largest difference
3.1e-06
>>> collator = RetrievalCollator(processor, image_features=cache)
```
"""

import math
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..data.catalogue import CatalogueColumns
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReport
from ..data.rows import row_batches
# `image_features_for_rows` lives with the store it reads; kept importable from here.
from ..retrieval.image_feature_store import ImageFeatureStore, image_features_for_rows

# Image towers that interpolate their position embeddings, so they accept any (patch-multiple) image size.
RESIZABLE_VISION_MODEL_TYPES = ("dinov2", "dinov2_with_registers")
CACHED_FEATURE_TOLERANCE_CPU = 1e-4
CACHED_FEATURE_TOLERANCE_ACCELERATOR = 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Image size
# ----------------------------------------------------------------------------------------------------------------


def resize_image_processor(image_processor, image_size: int) -> None:
    """Make `image_processor` output `image_size x image_size` pixels, keeping its resize-then-crop recipe.

    Catalogue photos are small (60x80 for the fashion catalogue), so upscaling them to 224 px only multiplies
    the image tower's cost by 4 (ViT cost grows with the number of 14x14 patches). The shortest edge is
    resized to `image_size` and, for processors that centre-crop, the crop is `image_size` square.

    Example:
    ```python
    >>> resize_image_processor(processor.image_processor, 112)
    >>> processor.image_processor.crop_size
    {'height': 112, 'width': 112}
    ```
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    size = dict(image_processor.size)
    if "shortest_edge" in size:
        image_processor.size = {"shortest_edge": image_size}
    else:
        image_processor.size = {"height": image_size, "width": image_size}
    if getattr(image_processor, "do_center_crop", False):
        image_processor.crop_size = {"height": image_size, "width": image_size}


def check_image_size_supported(image_tower, image_size: int) -> None:
    """Raise unless `image_tower` can embed `image_size` images.

    DINOv2 interpolates its position embeddings to any input; CLIP, SigLIP and ViT towers only do so when
    called with `interpolate_pos_encoding=True`, which the retrieval model does not pass, so they must get
    their native size.

    Example:
    ```python
    >>> check_image_size_supported(model.image_tower, 112)  # fine for DINOv2; a CLIP tower raises ValueError
    ```
    """
    config = image_tower.config
    vision_config = getattr(config, "vision_config", None) or config
    native = getattr(vision_config, "image_size", None)
    if vision_config.model_type in RESIZABLE_VISION_MODEL_TYPES or image_size == native:
        return
    raise ValueError(
        f"--image_size {image_size} is not supported by a {config.model_type!r} image tower (native size {native}); "
        f"only {list(RESIZABLE_VISION_MODEL_TYPES)} towers interpolate their position embeddings. Leave --image_size "
        "unset for this tower."
    )


# ----------------------------------------------------------------------------------------------------------------
# Frozen image features
# ----------------------------------------------------------------------------------------------------------------


class ImageFeatureCache(dict):
    """Image-tower features by `str(product_id)` (`None` for an image-less product), plus what a run needs to use
    and report them: `feature_size` (the width of a feature, known even when every image failed, so image-less
    batches get placeholders of the right size), `image_report` (how each product's image loaded) and
    `fetch_images` (whether image URLs were downloaded, so a check recomputes them the same way).

    Example:
    ```python
    >>> cache = precompute_image_features(model, processor, catalogue)
    >>> cache.feature_size, cache.image_report.summary()
    (384, 'images: 48 ok, 0 missing, 0 undecodable, 0 refused')
    ```
    """

    def __init__(self, *args, feature_size: int | None = None, image_report: ImageReport | None = None,
                 fetch_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.feature_size = feature_size
        self.image_report = image_report if image_report is not None else ImageReport()
        self.fetch_images = fetch_images


def precompute_image_features(
    model,
    processor,
    catalogue,
    *,
    columns: CatalogueColumns | None = None,
    batch_size: int = 64,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    show_progress: bool = True,
    fetch_images: bool = False,
    report: ImageReport | None = None,
    store: ImageFeatureStore | None = None,
) -> ImageFeatureCache:
    """Image-tower features of every product of `catalogue`, by product id, for `RetrievalCollator(image_features=)`.

    Only valid for a frozen image tower: it runs in eval mode without autograd, so its features are the same
    at every step and computing them once replaces `epochs x` tower passes by one. Products whose image cannot
    be decoded map to `None` (image-less, as the collator would have made them); a catalogue without a single
    image still gives a working cache, whose `feature_size` sizes the collator's placeholders.

    Args:
        fetch_images: download `http(s)://` images (refused by default, and counted as `refused`).
        report: an `ImageReport` to count every product's image in; the cache's `image_report` is this one
            (a new one by default).
        store: an `ImageFeatureStore` (`retrieval.image_feature_store`): features of photos this image tower
            already embedded (in any run) are read from disk, only the others are computed, and written back.
            The features are the same as without it; `store.hits` and `store.computed` count both.

    Example:
    ```python
    >>> report = ImageReport()
    >>> cache = precompute_image_features(model, processor, catalogue, report=report)
    >>> collator = RetrievalCollator(processor, image_features=cache)
    >>> print(report.summary())
    images: 970 ok, 20 missing (e.g. 'sku-7': no image: there is no file at '/data/shop/img/7.jpg'), ...
    ```
    """
    columns = columns or CatalogueColumns()
    if model.image_tower is None:
        raise ValueError("A text-only model has no image tower whose features could be cached.")
    if not model.image_features_are_frozen:
        raise ValueError(
            "Cached image features are only valid for a frozen image tower (and, for 4tower, a frozen projection); "
            "a trained one changes them at every step. Drop --cache_image_features or keep --freeze_image_towers."
        )
    report = report if report is not None else ImageReport()
    cache = ImageFeatureCache(feature_size=getattr(model, "image_feature_size", None), image_report=report, fetch_images=fetch_images)
    batches = row_batches(catalogue, batch_size)
    progress = tqdm(batches, total=math.ceil(len(catalogue) / batch_size), desc="Caching image features",
                    disable=not show_progress)
    try:
        for rows in progress:
            features = image_features_for_rows(model, processor, rows, columns, max_image_pixels,
                                               fetch_images=fetch_images, report=report, store=store)
            cache.feature_size = next((feature.shape[-1] for feature in features if feature is not None),
                                      cache.feature_size)
            cache.update({str(row[columns.product_id]): feature for row, feature in zip(rows, features)})
    finally:
        if store is not None:  # what was computed is kept, even when the run stops half-way
            store.flush()
    return cache


def check_cached_image_features(
    model, processor, rows: Sequence[Mapping], cache: Mapping[str, torch.Tensor | None], *,
    columns: CatalogueColumns | None = None, tolerance: float | None = None
) -> float:
    """Recompute the features of `rows` and compare them with `cache`; returns the largest absolute difference.

    Raises `ValueError` when they disagree by more than `tolerance` (default: 1e-4 for a model on the CPU,
    1e-2 on an accelerator, whose TF32 convolutions differ by about 1e-3 between batch sizes), e.g. because the
    image tower runs with dropout or the processor changed after the cache was built.

    Example:
    ```python
    >>> check_cached_image_features(model, processor, catalogue.select(range(8)).to_list(), cache) <= 1e-4
    True
    ```
    """
    columns = columns or CatalogueColumns()
    fetch_images = getattr(cache, "fetch_images", False)  # recompute the images the way the cache read them
    if tolerance is None:
        # GPUs convolve in TF32 by default and pick kernels by batch size: about 1e-3 apart between batches.
        on_cpu = next(model.parameters()).device.type == "cpu"
        tolerance = CACHED_FEATURE_TOLERANCE_CPU if on_cpu else CACHED_FEATURE_TOLERANCE_ACCELERATOR
    recomputed = image_features_for_rows(model, processor, rows, columns, fetch_images=fetch_images)
    largest = 0.0
    for row, fresh in zip(rows, recomputed):
        cached = cache[str(row[columns.product_id])]
        if (cached is None) != (fresh is None):
            raise ValueError(f"Cached image of product {row[columns.product_id]!r} disagrees on being decodable.")
        if fresh is not None:
            largest = max(largest, float((cached - fresh).abs().max()))
    if largest > tolerance:
        raise ValueError(
            f"Cached image features differ from recomputed ones by {largest:.2e} (> {tolerance:g}); is the image "
            "tower really frozen and in eval mode?"
        )
    return largest


__all__ = [
    "RESIZABLE_VISION_MODEL_TYPES",
    "ImageFeatureCache",
    "check_cached_image_features",
    "check_image_size_supported",
    "image_features_for_rows",
    "precompute_image_features",
    "resize_image_processor",
]
