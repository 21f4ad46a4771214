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
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import speedups
from ..data.catalogue import CatalogueColumns
from ..data.collator import RetrievalCollator, product_fields
from ..data.images import ImageReport, load_product_image
from ..modeling_mmretrieval import embed_in_length_order
from ..processing_mmretrieval import join_product_text, validate_texts
from .exact_search import order_candidates
from .image_feature_store import ImageFeatureStore, with_image_feature_store
from .index import ProductIndex, _allowed_mask

# A text + image query weighs the two cosines equally unless told otherwise (`search_text_and_image`).
DEFAULT_IMAGE_WEIGHT = 0.5
# Catalogue rows scored per step of a text + image search (converted to float64 a block at a time).
_SCORE_BLOCK_ROWS = 1 << 16

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


def weights_fingerprint(model) -> str:
    """The sha256 of a model's weights: every tensor of its state dict (parameters and persistent buffers), in name
    order, with its name, dtype and shape.

    Two models with the same weights give the same fingerprint wherever their checkpoints live; one changed value,
    or the same values in another dtype, gives another. Tensors are hashed as raw bytes on the CPU (a GPU tensor
    is copied there first): about a second per GB of weights.

    Example:
    ```python
    >>> weights_fingerprint(model) == weights_fingerprint(MultimodalRetrievalModel.from_pretrained(saved_folder))
    True
    ```
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # A byte view of any dtype (bfloat16 included, which numpy lacks); no copy of a contiguous tensor.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_fingerprint(model) -> str:
    """The identity of a model's embedding space: a short hash of its `config_fingerprint` and `weights_fingerprint`.

    An index records it (`ProductIndex.model_fingerprint`) and is reused only by a model with the same one: a copy
    of the checkpoint in another folder (or on the Hub) matches, a retrain saved into the same folder does not.

    Example:
    ```python
    >>> index = ProductIndex.load("indexes/test", expected_model_fingerprint=model_fingerprint(model))
    ```
    """
    combined = f"{config_fingerprint(model.config)}:{weights_fingerprint(model)}"
    return hashlib.sha256(combined.encode()).hexdigest()[:16]


def model_identity(model) -> str:
    """Where a model was loaded from (its path or Hub id), for people to read; `model_fingerprint` identifies it.

    Example: `model_identity(MultimodalRetrievalModel.from_pretrained("outputs/run/final"))` is "outputs/run/final".
    """
    return model.config.name_or_path or model.__class__.__name__


def index_provenance(model) -> dict:
    """What an index records about the model that built it: `model_id` (where it was loaded from, for people),
    `config_hash` and `model_fingerprint` (config and weights: what `ProductIndex.load` checks).

    Example: `ProductIndex.build(rows, embed, **index_provenance(model))`.
    """
    return {"model_id": model_identity(model), "config_hash": config_fingerprint(model.config),
            "model_fingerprint": model_fingerprint(model)}


def load_retriever(name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
    """`(model, processor)` of a checkpoint for search and indexing: the model in eval mode on `device`, with the CPU
    speedups applied. A local folder is loaded by its absolute path, so the model id an index records does not
    depend on the directory a command was started from (or on the node of a cluster that loads it). Raises `OSError`
    when nothing loads from `name_or_path`.

    Example: `model, processor = load_retriever("outputs/run/final", "cpu")`.
    """
    from .. import MultimodalRetrievalModel, MultimodalRetrievalProcessor

    name_or_path = str(name_or_path)
    if Path(name_or_path).is_dir():
        name_or_path = str(Path(name_or_path).resolve())
    model = MultimodalRetrievalModel.from_pretrained(name_or_path)
    processor = MultimodalRetrievalProcessor.from_pretrained(name_or_path)
    model = model.to(device).eval()
    speedups.apply(model, processor)
    return model, processor


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


def fused_image_queries_supported(model) -> bool:
    """Whether `model` embeds image queries into the space of its product index (4tower with `concat` or
    `alpha_concat` fusion: `embed_images`); other models with an image tower answer them through a visual index.

    Example: `fused_image_queries_supported(model)` is False for the default 4tower residual model.
    """
    try:
        model.check_image_queries_supported()
    except ValueError:
        return False
    return True


def check_image_tower(model) -> None:
    """Raises a one-line `ValueError` for a model without an image tower (`architecture='text_only'`), which can
    answer no image query at all.

    Example: `check_image_tower(text_only_model)` raises "Image queries need a 4tower or 3tower model ...".
    """
    if model.image_tower is None:
        raise ValueError(
            "Image queries need a 4tower or 3tower model (one with an image tower); this model is "
            f"architecture={model.config.architecture!r}, which has none: search it with text queries"
        )


def _as_image_list(images) -> list:
    """`images` as a list: a list or tuple as it is, anything else (one PIL image, path, bytes) as one image."""
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _query_pixel_values(model, processor, images) -> torch.Tensor:
    """The query images decoded (`load_product_image`: PIL images, bytes, file paths, `datasets.Image` dicts) and
    preprocessed, on the model's device; a `ValueError` names the first image that cannot be read."""
    decoded = []
    for position, image in enumerate(_as_image_list(images)):
        try:
            decoded.append(load_product_image(image, on_error="raise").image)
        except (ValueError, TypeError) as error:
            raise ValueError(f"query image {position} cannot be read: {error}") from error
    if not decoded:
        raise ValueError("give at least one query image")
    return processor.encode_images(decoded)["pixel_values"].to(_model_device(model))


@torch.no_grad()
def embed_images(model, processor, images: Sequence) -> torch.Tensor:
    """L2-normalised image-query embeddings in the product index's space (4tower concat/alpha_concat models;
    `fused_image_queries_supported`), float32 on the CPU.

    Images are PIL images or encoded ones (bytes, file paths, `datasets.Image` dicts), decoded with
    `load_product_image`. Other models raise `ValueError`: their image queries go to a visual index
    (`embed_image_features`, `search_images(visual_index=...)`).

    Example:
    ```python
    >>> scores, ids = index.search(embed_images(model, processor, ["shoe.jpg"]), k=10)
    ```
    """
    check_image_tower(model)
    model.check_image_queries_supported()
    pixel_values = _query_pixel_values(model, processor, images)
    return model.get_image_query_embeddings(pixel_values=pixel_values).float().cpu()


@torch.no_grad()
def embed_image_features(model, processor, images: Sequence) -> torch.Tensor:
    """L2-normalised image-tower features of query images, `(len(images), model.image_tower_feature_size)` float32 on
    the CPU: the space of a visual index (`retrieval.visual_index`), for every model with an image tower.

    The features are `model.get_image_features` (DINOv2 or the dual encoder's image embedding), the same the visual
    index holds for the catalogue's product images, so their dot product is image-to-image cosine similarity.

    Example:
    ```python
    >>> queries = embed_image_features(model, processor, ["shoe.jpg"])
    >>> scores, ids = visual_index.search(queries, k=10)  # the products whose photos look most like it
    ```
    """
    check_image_tower(model)
    pixel_values = _query_pixel_values(model, processor, images)
    features = model.get_image_features(pixel_values)[..., : model.image_tower_feature_size]
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


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
        return embed_in_length_order(rows, [text_length(row) for row in rows], embed_batch, batch_size=batch_size)

    return embed_window


def _autocast_embedder(embed_batch: Callable[[list[dict]], torch.Tensor], device: torch.device, dtype: torch.dtype):
    def embed_in_dtype(rows: list[dict]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return embed_batch(rows)

    return embed_in_dtype


def catalogue_embedder(
    model,
    processor,
    *,
    columns: CatalogueColumns | None = None,
    batch_size: int = 64,
    sort_by_length: bool = True,
    dtype: torch.dtype | None = None,
    image_features: Mapping[str, torch.Tensor | None] | None = None,
    fetch_images: bool = False,
    image_report: ImageReport | None = None,
    on_image_error: str = "mask",
    image_feature_store: ImageFeatureStore | None = None,
) -> tuple[Callable[[list[dict]], torch.Tensor], int]:
    """`(embed_window, rows_per_read)`: how `build_product_index` embeds catalogue rows (collation, image decoding or
    the image-feature store, length-sorted batches, autocast), for callers that feed rows themselves, such as the
    replicas of `retrieval.ray_indexing`. `embed_window(rows)` returns their float32 CPU embeddings in row order; give
    it `rows_per_read` rows at a time for the length sorting to pay. The arguments are `build_product_index`'s; flush
    `image_feature_store` when done.

    Example:
    ```python
    >>> embed_window, rows_per_read = catalogue_embedder(model, processor, batch_size=64)
    >>> embeddings = embed_window(rows[:rows_per_read])
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
    collator = with_image_feature_store(collator, model, processor, image_feature_store)
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
    return embed_batch, rows_per_read


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
    image_feature_store: ImageFeatureStore | None = None,
) -> ProductIndex:
    """Encodes a catalogue (a `datasets.Dataset` or iterable of rows) into a `ProductIndex`.

    Images are decoded per batch; the index records the model's `model_fingerprint` (config and weights) so a
    later load with another model, or with new weights saved into the same folder, is refused, and the model's id
    (`model_identity`) for people to read. The index keeps the catalogue's row order.

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
        image_feature_store: an `ImageFeatureStore` (`retrieval.image_feature_store`) to read the image tower's
            features from, computing (in float32) and adding only those of photos it has not seen (written
            before the build returns); unused with `image_features` or `on_image_error="raise"`.

    A bad product (no text, text that is not valid Unicode) raises an error naming its id and column.

    Example:
    ```python
    >>> index = build_product_index(model, processor, catalogue, batch_size=64, dtype=torch.bfloat16)
    >>> scores, ids = index.search(embed_queries(model, processor, ["white sneakers"]), k=10)
    ```
    """
    columns = columns or CatalogueColumns()
    embed_window, rows_per_read = catalogue_embedder(
        model, processor, columns=columns, batch_size=batch_size, sort_by_length=sort_by_length, dtype=dtype,
        image_features=image_features, fetch_images=fetch_images, image_report=image_report,
        on_image_error=on_image_error, image_feature_store=image_feature_store,
    )
    index = ProductIndex.build(
        catalogue,
        embed_window,
        output_dir=output_dir,
        batch_size=rows_per_read,
        id_column=columns.product_id,
        **index_provenance(model),
        show_progress=show_progress,
        shard=shard,
        metadata_columns=metadata_columns,
    )
    if image_feature_store is not None:
        image_feature_store.flush()
    return index


def search_text(model, processor, index: ProductIndex, queries: Sequence[str], k: int = 10):
    """Top-k `(scores, product_ids)` for text queries."""
    return index.search(embed_queries(model, processor, queries), k=k)


# visual index -> (weak reference to its product index, (their sizes), positions): searches of one pair of indexes
# map the ids once, not per query.
_VISUAL_POSITIONS: "weakref.WeakKeyDictionary[ProductIndex, tuple]" = weakref.WeakKeyDictionary()


def _visual_positions(index: ProductIndex, visual_index: ProductIndex) -> np.ndarray:
    """The product index row of every visual index row (an int64 array), cached per pair of indexes until either
    grows; `ValueError` naming the first product of the visual index that the product index lacks (the two were
    built from different catalogues)."""
    cached = _VISUAL_POSITIONS.get(visual_index)
    counts = (len(index), len(visual_index))
    if cached is not None and cached[0]() is index and cached[1] == counts:
        return cached[2]
    positions = np.empty(len(visual_index), dtype=np.int64)
    for row, product_id in enumerate(visual_index.ids):
        position = index.position_of(product_id)
        if position is None:
            raise ValueError(
                f"the visual index holds product id {product_id!r}, which the product index lacks: they were built "
                "from different catalogues; rebuild the visual index from the product index's catalogue"
            )
        positions[row] = position
    _VISUAL_POSITIONS[visual_index] = (weakref.ref(index), counts, positions)
    return positions


def _check_visual_index(model, visual_index: ProductIndex | None, what: str) -> ProductIndex:
    if visual_index is None:
        raise ValueError(
            f"{what} on an architecture={model.config.architecture!r}, fusion={model.config.fusion!r} model are "
            "answered by its visual index (the image tower's features of the product images): pass "
            "visual_index=build_visual_index(model, processor, catalogue) or load_visual_index(index_dir, ...)"
        )
    if visual_index.dim is not None and visual_index.dim != model.image_tower_feature_size:
        raise ValueError(
            f"the visual index holds {visual_index.dim}-wide vectors but this model's image tower gives "
            f"{model.image_tower_feature_size}: it is a product index, or another model's visual index; rebuild it with "
            "build_visual_index"
        )
    return visual_index


def search_images(
    model,
    processor,
    index: ProductIndex,
    images: Sequence,
    k: int = 10,
    visual_index: ProductIndex | None = None,
    *,
    allowed: np.ndarray | torch.Tensor | None = None,
):
    """Top-k `(scores, product_ids)` for query images (image-to-product search), for every model with an image tower.

    A 4tower model with `concat`/`alpha_concat` fusion ranks the product index itself (`embed_images`: the query
    matches the image half of the product vectors). Every other model ranks its `visual_index`
    (`retrieval.visual_index.build_visual_index`) by image-to-image cosine of the image tower's features ("more like
    this"): products without a usable image are not in it and never come back. `allowed` (a boolean mask in the
    product index's row order, e.g. `retrieval.filters.ProductTable.allowed`) filters inside the search either way.
    A text-only model, or another model without `visual_index`, raises a `ValueError` saying what to pass.

    Example:
    ```python
    >>> visual_index = build_visual_index(model, processor, catalogue)
    >>> scores, ids = search_images(model, processor, index, ["shoe.jpg"], k=10, visual_index=visual_index)
    ```
    """
    check_image_tower(model)
    if fused_image_queries_supported(model):
        return index.search(embed_images(model, processor, images), k=k, allowed=allowed)
    visual_index = _check_visual_index(model, visual_index, "Image queries")
    positions = _visual_positions(index, visual_index)
    visual_allowed = None
    mask = _allowed_mask(allowed, len(index))
    if mask is not None:
        visual_allowed = mask[positions]
    return visual_index.search(embed_image_features(model, processor, images), k=k, allowed=visual_allowed)


def _checked_image_weight(image_weight) -> float:
    if isinstance(image_weight, bool) or not isinstance(image_weight, (int, float, np.floating, np.integer)):
        raise TypeError(f"image_weight must be a number between 0 and 1, got {image_weight!r}")
    if not 0.0 <= float(image_weight) <= 1.0:  # NaN fails this too
        raise ValueError(f"image_weight must lie between 0 and 1, got {image_weight!r}")
    return float(image_weight)


def text_and_image_scores(
    index: ProductIndex,
    visual_index: ProductIndex,
    text_queries: torch.Tensor,
    image_queries: torch.Tensor,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
) -> np.ndarray:
    """`(Q, len(index))` float64 scores `(1 - w) * cos(text, product) + w * cos(image, product image)` of query pairs
    (L2-normalised rows of `text_queries` and `image_queries`, row i of both is query i) over every product of
    `index`; a product without an image in `visual_index` gets only its text part. Exact: every row is scored.

    Example: `text_and_image_scores(index, visual_index, embed_queries(m, p, ["in red"]), embed_image_features(m, p,
    ["shirt.jpg"]), 0.5).shape == (1, len(index))`.
    """
    weight = _checked_image_weight(image_weight)
    text = text_queries.detach().cpu().double().numpy()
    image = image_queries.detach().cpu().double().numpy()
    if text.ndim != 2 or image.ndim != 2 or len(text) != len(image):
        raise ValueError(f"give one image per text query: got {tuple(text.shape)} and {tuple(image.shape)} queries")
    positions = _visual_positions(index, visual_index)
    products, pictures = index.embeddings, visual_index.embeddings
    scores = np.empty((len(text), len(products)), dtype=np.float64)
    for start in range(0, len(products), _SCORE_BLOCK_ROWS):
        block = np.asarray(products[start : start + _SCORE_BLOCK_ROWS], dtype=np.float64)
        scores[:, start : start + len(block)] = (1.0 - weight) * (text @ block.T)
    for start in range(0, len(pictures), _SCORE_BLOCK_ROWS):
        block = np.asarray(pictures[start : start + _SCORE_BLOCK_ROWS], dtype=np.float64)
        scores[:, positions[start : start + len(block)]] += weight * (image @ block.T)
    return scores


def search_text_and_image(
    model,
    processor,
    index: ProductIndex,
    visual_index: ProductIndex,
    texts: Sequence[str],
    images: Sequence,
    k: int = 10,
    image_weight: float = DEFAULT_IMAGE_WEIGHT,
    allowed: np.ndarray | torch.Tensor | None = None,
):
    """Top-k `(scores, product_ids)` for text + image queries ("like this, but in red"): query i is `texts[i]`
    with `images[i]`, and every product of `index` scores

        (1 - image_weight) * cos(text query, product embedding) + image_weight * cos(query image, product image)

    The text term is the model's text-to-product score over the product index; the image term is the image tower's
    image-to-image cosine against the product's photo in `visual_index` (`build_visual_index`). Both cosines lie in
    [-1, 1], so a weighted sum of the two needs no rescaling, and `image_weight` reads as a share: 0 is the text
    ranking, 1 the image ranking ("more like this"), 0.5 (default) both equally. Blending the scores rather than
    searching with an image alone keeps what the text asks for: the photo finds the look, the text term still
    ranks the red ones above the photo's blue ones. A product without an image gets only its text part. Scores are
    exact (every product is scored); ties are broken by catalogue order. `allowed` (a boolean mask in the product
    index's row order, `retrieval.filters.ProductTable.allowed`) filters inside the search, so k matching products
    come back. Returns `(Q, k)` scores and Q lists of ids, as `ProductIndex.search` does for a batch.

    Example:
    ```python
    >>> scores, ids = search_text_and_image(model, processor, index, visual_index, ["in red"], ["shirt.jpg"], k=10)
    ```
    """
    check_image_tower(model)
    visual_index = _check_visual_index(model, visual_index, "Text + image queries")
    texts = validate_texts(texts, "Query")
    images = _as_image_list(images)
    if len(texts) != len(images):
        raise ValueError(f"give one image per text query: got {len(texts)} texts and {len(images)} images")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    scores = text_and_image_scores(
        index, visual_index, embed_queries(model, processor, texts), embed_image_features(model, processor, images),
        image_weight,
    )
    mask = _allowed_mask(allowed, scores.shape[1])
    k = min(int(k), scores.shape[1] if mask is None else int(np.count_nonzero(mask)))
    if mask is not None:
        scores[:, ~mask] = -np.inf
    scores = torch.from_numpy(scores).float()
    positions = torch.arange(scores.shape[1]).expand_as(scores)
    top_scores, top_positions = order_candidates(scores, positions, k)
    ids = index.ids
    return top_scores, [[ids[position] for position in row] for row in top_positions.tolist()]


__all__ = [
    "DEFAULT_IMAGE_WEIGHT",
    "build_product_index",
    "catalogue_embedder",
    "check_image_tower",
    "config_fingerprint",
    "embed_image_features",
    "embed_images",
    "embed_queries",
    "fused_image_queries_supported",
    "load_retriever",
    "model_fingerprint",
    "model_identity",
    "index_provenance",
    "product_embedder",
    "search_images",
    "search_text",
    "search_text_and_image",
    "text_and_image_scores",
    "weights_fingerprint",
]
