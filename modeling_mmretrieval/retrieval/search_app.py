"""The search page's application, without HTTP: rankings, facets, example queries, images and relevance marks.

`ProductSearchDemo` answers what `retrieval.demo`'s server asks: a page of results per ranker for a
`search_page.SearchRequest` (text, an uploaded photo, or both combined), facet counts within the other filters,
example queries drawn from the catalogue's own attribute values, product images (only the catalogue row's own
bytes, or files inside the catalogue's folder), uploaded photos kept under tokens, and relevance marks appended
to a JSONL file (`retrieval.judgements`).

Two models side by side: a `ComparedModel` (a second checkpoint with its own index, and visual index, over the same
catalogue) is offered beside the results; its column ranks the same query, photo, filters and page with the same
ranker, and each column is labelled by its model's checkpoint folder (`model_labels`).

Photos, for every model with an image tower:

- a 4tower `concat`/`alpha_concat` model ranks a photo in its product index (`embed_images`); with text, both query
  embeddings are L2-normalised, combined as `(1 - w) * text + w * image` with `w` the request's `image_weight` (0.5
  by default), and renormalised (`combine_query_embeddings`);
- any other model ranks a photo alone by its similarity to the product photos in its visual index
  (`retrieval.visual_index`, `search_images`), and a photo with text by the blended score
  `(1 - w) * cos(text, product) + w * cos(photo, product photo)` (`search_text_and_image`);
- a text-only model takes no photo, and the page says why in one line.

Example:
```python
>>> app = ProductSearchDemo(model, processor, index, catalogue, judgements_path="marks.jsonl")
>>> request = SearchRequest(query="black watch", filters={"gender": ("Men",)}, compare="lexical")
>>> [column.label for column in app.columns_for(request)]
['dense', 'lexical']
```
"""

import functools
import hashlib
import io
import logging
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.catalogue import CatalogueColumns, normalise_value
from ..data.images import ImageDecodeError, is_image_url, load_product_image
from ..data.queries import article_type_phrases
from .filters import DEFAULT_PRICE_COLUMN, ProductFilter, ProductTable, facet_counts
from .hybrid import Fusion, ProductRanker
from .index import ProductIndex
from .judgements import Judgement, JudgementError, append_judgement, load_judgements
from .lexical import LexicalIndex, lexical_fields
from .hybrid import RANKERS
from .search import (
    check_image_tower,
    embed_images,
    embed_queries,
    fused_image_queries_supported,
    model_identity,
    search_images,
    search_text_and_image,
)
from .search_page import (
    DEFAULT_IMAGE_WEIGHT,
    DEFAULT_PAGE_SIZE,
    DEFAULT_TOP_K,
    MAX_TOP_K,
    DemoRequestError,
    PageContext,
    RankingColumn,
    SearchRequest,
    SearchResult,
    image_url,
)

logger = logging.getLogger(__name__)

IMAGE_CACHE_SIZE = 1024
JPEG_QUALITY = 90
MAX_WAITING_SEARCHES = 4
SEARCH_WAIT_TIMEOUT_S = 30.0
MAX_UPLOAD_PIXELS = 25_000_000
QUERY_IMAGE_SIDE = 1024
QUERY_IMAGE_CACHE_SIZE = 32
FACET_VALUES_SHOWN = 12
EXAMPLE_QUERY_COUNT = 6
# Facet fields of `CatalogueColumns`, in the order the page lists them, with their headings.
FACET_FIELDS = {"gender": "gender", "article_type": "article type", "base_colour": "colour", "brand": "brand",
                "usage": "usage"}
# Checkpoint folder names that say nothing about the model (a training run's `final`, a seed): labels skip them.
GENERIC_FOLDER_NAME = re.compile(r"(final|best|last|latest|checkpoint(-\d+)?|seed[-_]?\d+|step[-_]?\d+)", re.IGNORECASE)


class DemoBusyError(RuntimeError):
    """Too many searches are waiting for the model (answered with HTTP 503)."""


class SearchAbandoned(RuntimeError):
    """The client hung up before its search ran; the search is skipped."""


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------


def encode_jpeg(image) -> bytes:
    """An RGB PIL image as JPEG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def combine_query_embeddings(text: torch.Tensor, image: torch.Tensor, image_weight: float) -> torch.Tensor:
    """The text + image query: `(1 - w) * text + w * image` of the two L2-normalised embeddings, renormalised.

    `w = image_weight` in [0, 1]: 0 is the text alone, 1 the image alone, 0.5 (the page's default) both equally.

    Example:
    ```python
    >>> combine_query_embeddings(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.5)
    tensor([[0.7071, 0.7071]])
    ```
    """
    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be within [0, 1], got {image_weight}")
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    image = torch.nn.functional.normalize(image.float(), dim=-1)
    return torch.nn.functional.normalize((1 - image_weight) * text + image_weight * image, dim=-1)


def image_inside(value, root: Path | None) -> bool:
    """Whether a catalogue image entry may be served: embedded bytes (or a decoded image) always; a file path only
    when it resolves (symlinks followed) inside `root`, the catalogue's folder; nothing else (URLs, `..` escapes,
    absolute paths elsewhere, or any path when `root` is None).

    Example:
    ```python
    >>> image_inside({"bytes": b"...", "path": None}, None), image_inside("/etc/passwd", Path("/data/shop"))
    (True, False)
    ```
    """
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return True
        value = value.get("path")
    if value is None or isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "getpixel"):
        return True  # missing (shown as "no image") or the row's own bytes or decoded image
    if not isinstance(value, (str, os.PathLike)) or root is None or is_image_url(value):
        return False
    path = Path(value).expanduser()
    root = Path(root).expanduser().resolve()
    resolved = (path if path.is_absolute() else root / path).resolve()
    return resolved.is_relative_to(root)


def example_queries(table: ProductTable, colour: str | None, article_type: str | None, limit: int) -> list[str]:
    """The catalogue's most common "colour article-type" pairs as queries ("black tshirt"), or its most common
    article types when it has no colour column; [] without an article type column.

    Example:
    ```python
    >>> table = ProductTable(["1", "2", "3"], {"colour": ["Black", "black", "Red"], "type": ["Tshirts"] * 3})
    >>> example_queries(table, "colour", "type", 2)
    ['black tshirt', 'red tshirt']
    ```
    """
    if article_type is None:
        return []
    types = table.column(article_type)
    colours = table.column(colour) if colour is not None else [""] * len(types)
    pairs = Counter(
        (normalise_value(c) if c else "", normalise_value(t))
        for c, t in zip(colours, types, strict=True) if t is not None and str(t).strip()
    )
    queries = []
    for (colour_value, type_value), _ in sorted(pairs.items(), key=lambda item: (-item[1], item[0])):
        phrases = article_type_phrases(type_value)
        query = " ".join(filter(None, [colour_value, phrases[-1] if phrases else type_value]))
        if query not in queries:
            queries.append(query)
        if len(queries) == limit:
            break
    return queries


def _path_parts(name_or_path: str) -> list[str]:
    return [part for part in re.split(r"[\\/]+", str(name_or_path)) if part]


def model_label(name_or_path: str) -> str:
    """The page's name of a model loaded from `name_or_path` (a path or Hub id): its checkpoint's last folder name
    that is not generic (`final`, `best`, `checkpoint-N`, `seedN`, ...); " model" is added to a name that would read
    as a ranker.

    Example:
    ```python
    >>> model_label("outputs/images_that_pay/text-only/seed0/final"), model_label("org/dense")
    ('text-only', 'dense model')
    ```
    """
    parts = _path_parts(name_or_path)
    meaningful = [part for part in parts if not GENERIC_FOLDER_NAME.fullmatch(part)]
    label = meaningful[-1] if meaningful else (parts[-1] if parts else "model")
    return f"{label} model" if label in RANKERS else label


def model_labels(first: str, second: str) -> tuple[str, str]:
    """The page's names of two models shown side by side (`model_label`); equal names get the last path part that
    tells the two apart.

    Example:
    ```python
    >>> model_labels("outputs/text-only/seed0/final", "outputs/4tMM_concat/seed0/final")
    ('text-only', '4tMM_concat')
    >>> model_labels("outputs/text-only/seed0/final", "outputs/text-only/seed1/final")
    ('text-only (seed0)', 'text-only (seed1)')
    ```
    """
    labels = model_label(first), model_label(second)
    if labels[0] != labels[1]:
        return labels
    differing = [(a, b) for a, b in zip(reversed(_path_parts(first)), reversed(_path_parts(second))) if a != b]
    if not differing:  # the same checkpoint twice
        return labels[0], f"{labels[1]} (compared)"
    return f"{labels[0]} ({differing[0][0]})", f"{labels[1]} ({differing[0][1]})"


@dataclass(frozen=True)
class ComparedModel:
    """A second retriever shown beside the first on the search page: its model, processor and index over the same
    catalogue, its `label` on the page (None: from its checkpoint folder, see `model_labels`), and its
    `visual_index` (`retrieval.visual_index.build_visual_index`), which a model with an image tower but no fused
    image queries needs to rank the page's photo (see `ProductSearchDemo`).

    Example: `ProductSearchDemo(model, processor, index, catalogue, compared_model=ComparedModel(residual_model,
    residual_processor, residual_index, visual_index=residual_visual_index))`.
    """

    model: object
    processor: object
    index: ProductIndex
    label: str | None = None
    visual_index: ProductIndex | None = None


def _column_values(catalogue, name: str) -> list:
    """One column of a `datasets.Dataset` or of a sequence of row dicts."""
    if hasattr(catalogue, "column_names"):
        return list(catalogue[name])
    return [row.get(name) for row in catalogue]


def _column_names(catalogue) -> list[str]:
    if hasattr(catalogue, "column_names"):
        return list(catalogue.column_names)
    return list(dict.fromkeys(name for row in catalogue for name in row))


def _checked_visual_index(model, index: ProductIndex, visual_index: ProductIndex | None) -> ProductIndex | None:
    """`visual_index` once it is known to be this model's visual index over `index`'s products (`ValueError` in one
    line otherwise), so a mismatch stops the page at start rather than at its first photo."""
    if visual_index is None:
        return None
    check_image_tower(model)
    if visual_index.dim is not None and visual_index.dim != model.image_tower_feature_size:
        raise ValueError(
            f"the visual index holds {visual_index.dim}-wide vectors but this model's image tower gives "
            f"{model.image_tower_feature_size}: pass the visual index built by this model (build_visual_index)"
        )
    stranger = next((product_id for product_id in visual_index.ids if product_id not in index), None)
    if stranger is not None:
        raise ValueError(
            f"the visual index holds product id {stranger!r}, which the product index lacks: build both from the "
            "same catalogue"
        )
    return visual_index


def _number_or_none(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


# ----------------------------------------------------------------------------------------------------------------
# The application (no HTTP)
# ----------------------------------------------------------------------------------------------------------------


class ProductSearchDemo:
    r"""
    What the search page needs, without HTTP: rankings, facets, examples, images and relevance marks.

    Args:
        model ([`MultimodalRetrievalModel`]): the retriever that built `index`.
        processor ([`MultimodalRetrievalProcessor`]): its processor.
        index ([`ProductIndex`]): the catalogue's product embeddings.
        catalogue (`datasets.Dataset` or sequence of row dicts): the products of `index` (titles, facets, images).
        columns ([`CatalogueColumns`]): catalogue column names.
        image_root (`str` or `Path`, *optional*): the catalogue's folder; image files are served only from inside
            it (None: only images embedded in the catalogue rows).
        judgements_path (`str` or `Path`, *optional*): the JSONL file relevance marks are appended to (None: the
            page has no mark buttons). Marks already in it are shown on the cards.
        fusion ([`Fusion`]): how the hybrid ranker fuses.
        price_column (`str`): the catalogue column of prices (cards and the price range; ignored when absent).
        page_size (`int`): results per page.
        compared_model ([`ComparedModel`], *optional*): a second model the page can show beside the results
            ("beside it": its label), ranking the same query with the same ranker over its own index.
        visual_index ([`ProductIndex`], *optional*): the image tower's features of the catalogue's product photos
            (`retrieval.visual_index.build_visual_index`, by this model over the products of `index`). A model with
            an image tower whose product index takes no image query (anything but 4tower `concat`/`alpha_concat`)
            ranks the page's photos in it: a photo alone by image-to-image similarity (`search_images`), a photo
            with text by `(1 - w) * text score + w * photo similarity` (`search_text_and_image`). Without it such a
            model's page says in one line that photo search is off. A 4tower concat model ranks photos in `index`
            and does not read it.

    Searches are serialised (a fast tokenizer must not be used by two threads at once); product images are
    decoded once and cached.

    Example:
    ```python
    >>> demo = ProductSearchDemo(model, processor, index, catalogue)
    >>> [result.title for result in demo.search("black watch", k=3)]
    ```
    """

    def __init__(
        self,
        model,
        processor,
        index: ProductIndex,
        catalogue,
        columns: CatalogueColumns | None = None,
        *,
        image_root: str | os.PathLike | None = None,
        judgements_path: str | os.PathLike | None = None,
        fusion: Fusion | None = None,
        price_column: str = DEFAULT_PRICE_COLUMN,
        page_size: int = DEFAULT_PAGE_SIZE,
        compared_model: ComparedModel | None = None,
        visual_index: ProductIndex | None = None,
    ):
        if isinstance(page_size, bool) or not isinstance(page_size, int) or not 1 <= page_size <= MAX_TOP_K:
            raise ValueError(f"page_size must be an integer from 1 to {MAX_TOP_K}, got {page_size!r}")
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.catalogue = catalogue
        self.columns = columns = columns or CatalogueColumns()
        self.image_root = None if image_root is None else Path(image_root).expanduser().resolve()
        self.page_size = page_size
        self.max_page = max(1, MAX_TOP_K // page_size)
        product_ids = [str(product_id) for product_id in _column_values(catalogue, columns.product_id)]
        self._position_by_id = {product_id: position for position, product_id in enumerate(product_ids)}
        unknown = [product_id for product_id in index.ids if str(product_id) not in self._position_by_id]
        if unknown:
            raise ValueError(
                f"{len(unknown)} indexed products are not in the catalogue (e.g. {unknown[:3]!r}); pass the "
                "catalogue the index was built from"
            )
        available = _column_names(catalogue)
        self.facet_columns = {
            getattr(columns, name): title for name, title in FACET_FIELDS.items()
            if getattr(columns, name) is not None and getattr(columns, name) in available
        }
        self.price_column = price_column if price_column in available else None
        self.brand_column = columns.brand if columns.brand in available else None
        fields = tuple(name for name in lexical_fields(columns) if name in available)
        names = [columns.title, *self.facet_columns, *fields, *filter(None, [self.price_column])]
        self.table = ProductTable.from_catalogue(catalogue, index.ids, names=names, id_column=columns.product_id)
        self._row_of = {product_id: row for row, product_id in enumerate(self.table.ids)}
        self._rankers = {"dense": ProductRanker(index)}
        if fields:
            try:
                lexical = LexicalIndex.from_products(self.table.records(fields), fields)
            except ImportError as error:  # bm25s is optional: the page then offers the dense ranker only
                logger.info(f"lexical and hybrid ranking are off: {error}")
            else:
                for name in ("lexical", "hybrid"):
                    self._rankers[name] = ProductRanker(index, lexical, ranker=name, fusion=fusion or Fusion())
        self.examples = example_queries(
            self.table, columns.base_colour if columns.base_colour in self.facet_columns else None,
            columns.article_type if columns.article_type in self.facet_columns else None, EXAMPLE_QUERY_COUNT,
        )
        self.visual_index = _checked_visual_index(model, index, visual_index)
        # Where the page's photos are ranked: the product index (fused image queries) or the visual index.
        self.ranks_photos_by_similarity = model.image_tower is not None and not fused_image_queries_supported(model)
        self.image_query_refusal = self._image_query_refusal()
        self.judgements_path = None if judgements_path is None else Path(judgements_path)
        self._marks: dict[str, dict[str, int]] = {}
        if self.judgements_path is not None and self.judgements_path.exists():
            try:
                self._marks = load_judgements(self.judgements_path)
            except JudgementError as error:
                raise JudgementError(f"cannot append marks to a malformed file: {error}") from error
        self._search_lock = threading.Lock()
        self._waiting = threading.BoundedSemaphore(MAX_WAITING_SEARCHES)
        self._state_lock = threading.Lock()
        self._query_images: OrderedDict[str, object] = OrderedDict()
        self._query_image_embeddings: dict[str, torch.Tensor] = {}
        self._cached_jpeg = functools.lru_cache(maxsize=IMAGE_CACHE_SIZE)(self._encode_product_image)
        self._cached_facets = functools.lru_cache(maxsize=256)(self._facet_counts)
        self.label = model_label(model_identity(model))  # its column's name when two models are compared
        self.compared: ProductSearchDemo | None = None
        if compared_model is not None:
            self._add_compared_model(compared_model, image_root, fusion, price_column)

    def _add_compared_model(self, compared: ComparedModel, image_root, fusion, price_column) -> None:
        # The compared model's own application over the same catalogue: its rankers, table (in its index's row
        # order) and filters; it records no marks (the page's marks go through this one) and shares the images.
        try:
            self.compared = ProductSearchDemo(
                compared.model, compared.processor, compared.index, self.catalogue, self.columns,
                image_root=image_root, fusion=fusion, price_column=price_column, page_size=self.page_size,
                visual_index=compared.visual_index,
            )
        except ValueError as error:
            raise ValueError(f"the compared model {model_identity(compared.model)}: {error}") from error
        self.compared._cached_jpeg = self._cached_jpeg
        self.label, self.compared.label = model_labels(model_identity(self.model), model_identity(compared.model))
        if compared.label is not None:
            if compared.label in (*RANKERS, self.label) or not compared.label.strip():
                raise ValueError(f"the compared model's label {compared.label!r} must be new: not empty, not a "
                                 f"ranker name {list(RANKERS)} and not {self.label!r}")
            self.compared.label = compared.label

    @property
    def rankers(self) -> tuple[str, ...]:
        """The rankers the page offers: dense, and lexical and hybrid when the catalogue has text fields."""
        return tuple(self._rankers)

    @property
    def compare_models(self) -> tuple[str, ...]:
        """The labels of the models the page offers beside the results (none, or the compared model's)."""
        return () if self.compared is None else (self.compared.label,)

    def _image_query_refusal(self) -> str | None:
        """Why this page takes no photo (one line), or None when it does."""
        try:
            check_image_tower(self.model)
        except ValueError as error:
            return str(error)
        if getattr(self.processor, "image_processor", None) is None:
            return "the processor has no image processor, so a photo cannot be prepared for the model."
        if not self.ranks_photos_by_similarity:
            return None
        if self.columns.image is None or self.columns.image not in _column_names(self.catalogue):
            return "the catalogue has no image column, so there is no product photo to compare a photo with."
        if self.visual_index is None:
            return (
                f"a {self.model.config.architecture} model with {self.model.config.fusion!r} fusion ranks a photo by "
                "its similarity to the product photos, and no visual index of them was given (serve_demo("
                "visual_index=build_visual_index(model, processor, catalogue)); the search command builds it)."
            )
        return None

    @property
    def image_weighting(self) -> str:
        """How the page combines a photo with text: "embeddings" (the two query embeddings blended, for models
        whose product index takes image queries) or "scores" (text and photo similarity blended, through the
        visual index)."""
        return "scores" if self.ranks_photos_by_similarity else "embeddings"

    # ----- images ---------------------------------------------------------------------------------------------------

    def image_jpeg(self, product_id: str) -> bytes | None:
        """The product's image re-encoded as JPEG, or None for an unknown product, a missing or broken image, or
        an image file outside `image_root`."""
        return self._cached_jpeg(product_id)

    def _encode_product_image(self, product_id: str) -> bytes | None:
        position = self._position_by_id.get(product_id)
        if position is None or self.columns.image is None:  # a catalogue without an image column
            return None
        value = self.catalogue[position][self.columns.image]
        if not image_inside(value, self.image_root):
            logger.info(f"product {product_id!r}: its image file is outside the catalogue folder {self.image_root}; "
                        "not served")
            return None
        loaded = load_product_image(value)
        if not loaded.has_image:
            logger.info(f"product {product_id!r} has no usable image: {loaded.error}")
            return None
        return encode_jpeg(loaded.image)

    def remember_query_image(self, encoded: bytes) -> str:
        """Decodes an uploaded photo (`MAX_UPLOAD_PIXELS`), keeps it (at most `QUERY_IMAGE_SIDE` a side) among the
        last `QUERY_IMAGE_CACHE_SIZE`, and returns its token; `DemoRequestError` in one line when the model
        cannot take image queries or the file is not a usable image."""
        if self.image_query_refusal is not None:
            raise DemoRequestError(f"this model cannot search by image: {self.image_query_refusal}")
        try:
            image = load_product_image(encoded, max_pixels=MAX_UPLOAD_PIXELS, on_error="raise").image
        except ImageDecodeError as error:
            raise DemoRequestError(f"the uploaded image cannot be used: {error}") from None
        image.thumbnail((QUERY_IMAGE_SIDE, QUERY_IMAGE_SIDE))
        token = hashlib.sha256(encoded).hexdigest()[:32]
        self.keep_query_image(token, image)
        return token

    def keep_query_image(self, token: str, image) -> None:
        """Keeps a decoded query photo under `token` among the last `QUERY_IMAGE_CACHE_SIZE` (how a compared
        model's application receives the photo uploaded to this one)."""
        with self._state_lock:
            self._query_images[token] = image
            self._query_images.move_to_end(token)
            while len(self._query_images) > QUERY_IMAGE_CACHE_SIZE:
                dropped, _ = self._query_images.popitem(last=False)
                self._query_image_embeddings.pop(dropped, None)

    def query_image(self, token: str):
        """The uploaded photo of `token`, or None when unknown (or dropped from the cache)."""
        with self._state_lock:
            return self._query_images.get(token)

    def _image_embedding(self, token: str) -> torch.Tensor:
        cached = self._query_image_embeddings.get(token)
        if cached is None:
            image = self.query_image(token)
            if image is None:
                raise DemoRequestError("the uploaded image is no longer kept by the server: upload it again")
            try:
                cached = embed_images(self.model, self.processor, [image])
            except ValueError as error:
                raise DemoRequestError(f"this model cannot search by image: {error}") from None
            with self._state_lock:
                self._query_image_embeddings[token] = cached
        return cached

    # ----- search ---------------------------------------------------------------------------------------------------

    def product_filter(self, request: SearchRequest, *, without: str | None = None) -> ProductFilter:
        """The `ProductFilter` of a request's facet values and price range (leaving out the column `without`)."""
        values = {column: values for column, values in request.filters.items() if column != without}
        ranges = {}
        if self.price_column is not None and (request.min_price is not None or request.max_price is not None):
            ranges[self.price_column] = (request.min_price, request.max_price)
        return ProductFilter(values=values, ranges=ranges)

    def allowed(self, request: SearchRequest) -> np.ndarray | None:
        """The mask of the products a request's filters let through (None: no filter)."""
        product_filter = self.product_filter(request)
        return self.table.allowed(product_filter) if product_filter else None

    def _facet_counts(self, column: str, values: tuple, ranges: tuple) -> dict[str, int]:
        product_filter = ProductFilter(values=dict(values), ranges=dict(ranges))
        allowed = self.table.allowed(product_filter) if product_filter else None
        return facet_counts(self.table, [column], allowed=allowed, limit=FACET_VALUES_SHOWN)[column]

    def facets(self, request: SearchRequest) -> dict[str, dict[str, int]]:
        """`{column: {value: count}}` of every facet: the products each value would hold with the other filters
        kept (a column's own choices do not shrink its counts, so its values stay alternatives)."""
        counts = {}
        for column in self.facet_columns:
            other = self.product_filter(request, without=column)
            counts[column] = self._cached_facets(
                column, tuple(sorted(other.values.items())), tuple(sorted(other.ranges.items()))
            )
        return counts

    def search(
        self,
        query: str = "",
        k: int = DEFAULT_TOP_K,
        *,
        image_token: str | None = None,
        image_weight: float = DEFAULT_IMAGE_WEIGHT,
        ranker: str = "dense",
        allowed: np.ndarray | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> list[SearchResult]:
        """The top-`k` products for a text query, an uploaded image (`image_token`), or both combined with
        `image_weight` (see `image_weighting`), ranked by `ranker` within the `allowed` mask.

        A photo goes to the product index (4tower concat/alpha_concat: `combine_query_embeddings` with text) or to
        the visual index (every other model with an image tower: `search_images`, or `search_text_and_image` with
        text, ranked densely). `still_wanted()` is asked once the model is free; a False answer raises
        `SearchAbandoned` (the client left). `DemoBusyError` when `MAX_WAITING_SEARCHES` searches already wait;
        `DemoRequestError` for a query this demo cannot rank (an image with the lexical ranker, text + photo with
        the hybrid ranker on a visual index, a photo the model cannot take).

        Example:
        ```python
        >>> token = demo.remember_query_image(open("shirt.jpg", "rb").read())
        >>> [result.product_id for result in demo.search("in red", 3, image_token=token, image_weight=0.4)]
        ['1164', '5310', '2207']
        ```
        """
        if ranker not in self._rankers:
            raise DemoRequestError(f"ranker must be one of {list(self._rankers)}, got {ranker!r}")
        if not query and image_token is None:
            raise DemoRequestError("pass a query text or an image")
        if ranker == "lexical" and not query:
            raise DemoRequestError("the lexical ranker matches words: it cannot rank an image alone")
        if image_token is not None and self.image_query_refusal is not None:
            raise DemoRequestError(f"this model cannot search by image: {self.image_query_refusal}")
        if image_token is not None and query and ranker == "hybrid" and self.ranks_photos_by_similarity:
            raise DemoRequestError(
                "this model ranks text + photo by the text's score plus the photo's similarity to the product "
                "photos, which BM25 does not share: choose the dense ranker"
            )
        if allowed is not None and not allowed.any():
            return []
        if not self._waiting.acquire(blocking=False):
            raise DemoBusyError(f"{MAX_WAITING_SEARCHES} searches are already waiting: try again in a moment")
        try:
            if not self._search_lock.acquire(timeout=SEARCH_WAIT_TIMEOUT_S):
                raise DemoBusyError("the model stayed busy: try again in a moment")
            try:
                if still_wanted is not None and not still_wanted():
                    raise SearchAbandoned("the client hung up before its search ran")
                scores, ids = self._rank(query, k, image_token, image_weight, ranker, allowed)
            finally:
                self._search_lock.release()
        finally:
            self._waiting.release()
        return self._results(scores, ids)

    def _rank(self, query, k, image_token, image_weight, ranker, allowed):
        if image_token is not None and ranker != "lexical" and self.ranks_photos_by_similarity:
            return self._rank_by_photo_similarity(query, k, image_token, image_weight, allowed)
        embeddings = None
        if ranker != "lexical":
            embeddings = embed_queries(self.model, self.processor, [query]) if query else None
            if image_token is not None:
                image = self._image_embedding(image_token)
                embeddings = image if embeddings is None else combine_query_embeddings(embeddings, image, image_weight)
        if not query:  # an image alone: hybrid has no words to match, so the image ranks densely
            ranker = "dense"
        scores, ids = self._rankers[ranker].search([query], k=k, query_embeddings=embeddings, allowed=allowed)
        return scores[0].tolist(), ids[0]

    def _rank_by_photo_similarity(self, query, k, image_token, image_weight, allowed):
        """A photo alone, or text + photo, ranked through the visual index (`search_images`,
        `search_text_and_image`)."""
        image = self.query_image(image_token)
        if image is None:
            raise DemoRequestError("the uploaded image is no longer kept by the server: upload it again")
        try:
            if not query:
                scores, ids = search_images(self.model, self.processor, self.index, [image], k=k,
                                            visual_index=self.visual_index, allowed=allowed)
            else:
                scores, ids = search_text_and_image(self.model, self.processor, self.index, self.visual_index,
                                                    [query], [image], k=k, image_weight=image_weight, allowed=allowed)
        except ValueError as error:
            raise DemoRequestError(f"this model cannot search by this image: {error}") from None
        return scores[0].tolist(), ids[0]

    def _results(self, scores: list[float], ids: list) -> list[SearchResult]:
        table, results = self.table, []
        for score, product_id in zip(scores, ids, strict=True):
            if product_id is None:  # a slot no product filled (fewer allowed products than k)
                continue
            product_id, row = str(product_id), self._row_of[str(product_id)]
            brand = table.column(self.brand_column)[row] if self.brand_column else None
            price = _number_or_none(table.column(self.price_column)[row]) if self.price_column else None
            results.append(SearchResult(
                rank=len(results) + 1, product_id=product_id, score=float(score),
                title=str(table.column(self.columns.title)[row] or ""),
                image_url=image_url(product_id) if self.image_jpeg(product_id) is not None else None,
                brand=str(brand) if brand not in (None, "") else None, price=price,
            ))
        return results

    def _column_sources(self, request: SearchRequest) -> list[tuple["ProductSearchDemo", str, str]]:
        """`(application, ranker, label)` of each column: the request's rankers, or with a compared model as
        `compare`, both models ranking with `request.ranker`, each column labelled by its model."""
        if self.compared is not None and request.compare == self.compared.label:
            return [(self, request.ranker, self.label), (self.compared, request.ranker, self.compared.label)]
        return [(self, ranker, ranker) for ranker in request.rankers]

    def columns_for(self, request: SearchRequest, still_wanted=None) -> list[RankingColumn]:
        """The page's ranking columns for a request: each ranker's (or each model's) page of results, or why it has
        none."""
        k = request.page * self.page_size
        sources = self._column_sources(request)
        columns = []
        for app, ranker, label in sources:
            try:
                if app is not self and ranker == "lexical":
                    raise DemoRequestError("BM25 reads no model, so both models rank alike: choose the dense or "
                                           "hybrid ranker to compare them")
                if app is not self and request.image_token is not None and app.image_query_refusal is None:
                    image = self.query_image(request.image_token)
                    if image is not None:
                        app.keep_query_image(request.image_token, image)
                results = app.search(
                    request.query, min(k + 1, MAX_TOP_K), image_token=request.image_token,
                    image_weight=request.image_weight, ranker=ranker, allowed=app.allowed(request),
                    still_wanted=still_wanted,
                )
            except DemoRequestError as error:
                if len(sources) == 1:
                    raise
                columns.append(RankingColumn(label, note=str(error)))
                continue
            columns.append(RankingColumn(
                label, results[k - self.page_size : k], has_next=len(results) > k and request.page < self.max_page
            ))
        return columns

    def page_context(self, request: SearchRequest) -> PageContext:
        """Everything the page shows besides the results, for `request`."""
        return PageContext(
            rankers=self.rankers, compare_models=self.compare_models, facets=self.facets(request),
            facet_titles=self.facet_columns,
            price_column=self.price_column, examples=self.examples, image_queries=self.image_query_refusal,
            image_weighting=self.image_weighting,
            marks=self.marks_for(request.query), can_mark=self.judgements_path is not None, page_size=self.page_size,
        )

    # ----- relevance marks ------------------------------------------------------------------------------------------

    def mark(self, query: str, product_id: str, relevance: int, label: str = "") -> Judgement:
        """Appends a judgement to `judgements_path` and returns it; `DemoRequestError` in one line when marks are
        not recorded, the product is not indexed, or a field is malformed."""
        if self.judgements_path is None:
            raise DemoRequestError("this demo records no marks: start it with a judgements file")
        if product_id not in self._position_by_id:
            raise DemoRequestError(f"product_id {product_id[:64]!r} is not in the catalogue")
        try:
            judgement = append_judgement(self.judgements_path, query, product_id, relevance, label)
        except JudgementError as error:
            raise DemoRequestError(f"cannot record the mark of product {product_id[:64]!r}: {error}") from None
        with self._state_lock:
            self._marks.setdefault(judgement.query, {})[judgement.product_id] = judgement.relevance
        return judgement

    def marks_for(self, query: str) -> dict[str, int]:
        """`{product_id: relevance}` marked so far for `query`."""
        with self._state_lock:
            return dict(self._marks.get(query.strip(), {}))


__all__ = [
    "ComparedModel",
    "DemoBusyError",
    "ProductSearchDemo",
    "SearchAbandoned",
    "combine_query_embeddings",
    "encode_jpeg",
    "example_queries",
    "image_inside",
    "model_label",
    "model_labels",
]
