"""Search a product catalogue with a trained retriever: text queries, image queries, or a local web demo.

The product index is built from `--dataset`/`--split` on first use and saved in `--index_dir`; later runs load
it, after checking that it was built by the same model (its model fingerprint: config and weights, wherever the
checkpoint lives), and refuse an index built by another one (new weights saved into the same folder included), one
saved before indexes recorded the fingerprint, or a damaged one. The catalogue and the flags are checked before the
model is loaded, and a run that builds the index prints how its images fared (ok, missing, undecodable, refused,
with example product ids).
Text queries are ranked by the model (`--ranker dense`), by BM25 over the products' title, brand and description
(`lexical`) or by both fused (`hybrid`, `--fusion rrf` or `score`); `--filter COLUMN=VALUE`, `--min_price` and
`--max_price` restrict the search to matching products, so `--top_k` of them come back.
Image queries (`--image`) work for every model with an image tower: a 4tower concat/alpha_concat model ranks its
product index, any other one its visual index (the image tower's features of the product photos, built on first use
and saved in `<index_dir>/visual`). One `--query` with one `--image` is one text + image query, scored
`(1 - w) * text cosine + w * image cosine` (`--image_weight w`, default 0.5). The search page (`--serve`) takes
photos the same way, for every model with an image tower. See docs/search.md.

Examples:
```bash
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test \
    --query "red running shoes for men" --top_k 5
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --query "red tshirt" \
    --ranker hybrid --fusion rrf --filter gender=Women --filter article_type=Tshirts --min_price 500 --max_price 2000
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --query "red tshirt" \
    --index_backend int8 --rescore_candidates 8
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --image shoe.jpg
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --query "in red" --image shirt.jpg \
    --image_weight 0.4
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --serve --port 8000
mmretrieval search --model_name_or_path outputs/4tMM/final --index_dir indexes/test --serve \
    --compare_model outputs/text-only/final --judgements marks/judgements.jsonl
```
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_mmretrieval.data import (
    CatalogueColumns,
    ImageDecodeError,
    load_product_image,
)
from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.filters import (
    DEFAULT_PRICE_COLUMN,
    FilterError,
    ProductFilter,
    ProductTable,
)
from modeling_mmretrieval.retrieval.hybrid import (
    DEFAULT_ALPHA,
    DEFAULT_DEPTH,
    DEFAULT_RRF_K,
    FUSIONS,
    NORMALISATIONS,
    RANKERS,
    Fusion,
    ProductRanker,
)
from modeling_mmretrieval.retrieval.image_feature_store import (
    ImageFeatureStore,
    image_feature_store_from_args,
)
from modeling_mmretrieval.retrieval.index import BACKENDS, ProductIndex
from modeling_mmretrieval.retrieval.index_files import (
    META_FILENAME,
    IndexIntegrityError,
    IndexModelMismatchError,
)
from modeling_mmretrieval.retrieval.lexical import LexicalIndex, lexical_fields
from modeling_mmretrieval.retrieval.search import (
    DEFAULT_IMAGE_WEIGHT,
    build_product_index,
    check_image_tower,
    embed_queries,
    fused_image_queries_supported,
    model_fingerprint,
    search_images,
    search_text_and_image,
)
from modeling_mmretrieval.retrieval.visual_index import (
    build_visual_index,
    load_visual_index,
    visual_index_dir,
)

from .common import (
    CliError,
    add_image_arguments,
    catalogue_columns_from_args,
    check_image_arguments,
    check_retriever_settings,
    checked_products,
    load_catalogue_from_args,
    load_retriever,
    report_images,
    retriever_parser,
)

logger = logging.getLogger(__name__)


def check_index_dir(index_dir: Path | None, rebuild: bool) -> None:
    """Refuses (`CliError`) an `--index_dir` that holds something other than a complete index, unless `rebuild`:
    a folder without `index_meta.json` (a damaged index, or another folder) is never rebuilt behind the user's
    back, nor is a file replaced. Cheap, so it runs before the catalogue and the model are loaded.

    Example: `check_index_dir(Path("indexes/test"), rebuild=args.rebuild_index)`.
    """
    if index_dir is None or not index_dir.exists():
        return
    if not index_dir.is_dir():
        raise CliError(f"--index_dir {index_dir} is a file, not an index folder; pass another --index_dir")
    if rebuild or (index_dir / META_FILENAME).is_file() or not any(index_dir.iterdir()):
        return
    raise CliError(
        f"--index_dir {index_dir} holds no complete index (no {META_FILENAME}: damaged, interrupted, or another "
        "folder); pass --rebuild_index to replace it, or another --index_dir"
    )


def load_saved_index(load: Callable[[str], ProductIndex], model, what: str) -> ProductIndex:
    """`load(model_fingerprint(model))`, its refusals as one-line `CliError`s naming `what` (e.g. "the index in
    indexes/test") and the `--rebuild_index` way out.

    Example: `load_saved_index(lambda fp: ProductIndex.load(folder, expected_model_fingerprint=fp), model, "the index")`.
    """
    try:
        return load(model_fingerprint(model))
    except IndexModelMismatchError as error:
        raise CliError(f"{error} (pass --rebuild_index to replace it, or another --index_dir)") from error
    except IndexIntegrityError as error:
        raise CliError(f"{what} is damaged ({error}); pass --rebuild_index") from error


def open_or_build_index(
    model,
    processor,
    index_dir: Path | None,
    load_products: Callable[[], Any],
    *,
    columns: CatalogueColumns,
    rebuild: bool,
    batch_size: int,
    fetch_images: bool = False,
    image_report: ImageReport | None = None,
    check_images: Callable[[], None] | None = None,
    image_feature_store: ImageFeatureStore | None = None,
) -> ProductIndex:
    """The saved index of `index_dir` when there is one and `model` built it (same `model_fingerprint`: config and
    weights), else a new one; `CliError` for a saved index of another model, of no recorded model, or a damaged one.

    `load_products()` returns the catalogue; it is only called when the index has to be built. A new index is
    saved to `index_dir` (replacing the old one when `rebuild`); `image_report` then counts its images, and
    `check_images()` runs before it is saved, so an image failure it raises (`--strict_images`) leaves no index.

    Example: `open_or_build_index(model, processor, Path("indexes/test"), lambda: catalogue, columns=columns,
    rebuild=False, batch_size=64)`.
    """
    check_index_dir(index_dir, rebuild)
    if index_dir is not None and (index_dir / META_FILENAME).is_file() and not rebuild:
        index = load_saved_index(lambda fingerprint: ProductIndex.load(index_dir, expected_model_fingerprint=fingerprint),
                                 model, f"the index in {index_dir}")
        logger.info(f"Loaded the index of {len(index)} products from {index_dir}")
        return index
    index = build_product_index(
        model, processor, load_products(), columns=columns, batch_size=batch_size, metadata_columns=(columns.title,),
        fetch_images=fetch_images, image_report=image_report, image_feature_store=image_feature_store,
    )
    if check_images is not None:
        check_images()
    if index_dir is not None:
        index.save(index_dir, overwrite=rebuild)
        logger.info(f"Built an index of {len(index)} products and saved it to {index_dir}")
    return index


def page_ranks_photos_by_similarity(model, columns: CatalogueColumns) -> bool:
    """Whether the search page of `model` ranks its photos in a visual index: a model with an image tower whose
    product index takes no image query (anything but 4tower concat/alpha_concat), over a catalogue with an image
    column (without one, the page says that photo search is off).

    Example: `page_ranks_photos_by_similarity(residual_model, columns)` is True; for a text-only model, False.
    """
    return model.image_tower is not None and not fused_image_queries_supported(model) and columns.image is not None


def needs_visual_index(model, args, columns: CatalogueColumns) -> bool:
    """Whether this run needs the visual index: for the image queries of `args` (a text + image query always, an
    image query alone unless the model ranks image queries in its product index: 4tower concat/alpha_concat), or
    for the photos of the search page (`--serve`, see `page_ranks_photos_by_similarity`).

    Example: `needs_visual_index(model, parse_args([..., "--image", "shoe.jpg"]), columns)` is True for a 3tower
    model.
    """
    if args.serve and page_ranks_photos_by_similarity(model, columns):
        return True
    if not args.image:
        return False
    return is_combined_query(args) or not fused_image_queries_supported(model)


def open_or_build_visual_index(
    model,
    processor,
    index: ProductIndex,
    index_dir: Path | None,
    load_products: Callable[[], Any],
    *,
    columns: CatalogueColumns,
    rebuild: bool,
    batch_size: int,
    fetch_images: bool = False,
    image_report: ImageReport | None = None,
    check_images: Callable[[], None] | None = None,
    image_feature_store: ImageFeatureStore | None = None,
) -> ProductIndex:
    """The visual index saved in `<index_dir>/visual` when there is one and `model` built it (same
    `model_fingerprint`), else a new one from `load_products()`, saved there (`retrieval.visual_index`); `CliError`
    for one of another model, a damaged one, a catalogue without a usable image, or one holding products that the
    product `index` lacks (nothing is saved then). Call it after `open_or_build_index`: the visual index is kept
    inside the product index's folder, and a rebuilt product index drops the old one. `image_report` counts the
    images; `check_images()` runs before the index is saved.

    Example: `open_or_build_visual_index(model, processor, index, Path("indexes/test"), lambda: catalogue,
    columns=columns, rebuild=False, batch_size=64)`.
    """
    folder = visual_index_dir(index_dir) if index_dir is not None else None
    if folder is not None and folder.exists() and not rebuild:
        if not (folder / META_FILENAME).is_file():
            raise CliError(
                f"the visual index in {folder} is damaged (no {META_FILENAME}); pass --rebuild_index to rebuild both "
                "indexes"
            )
        visual_index = load_saved_index(
            lambda fingerprint: load_visual_index(index_dir, expected_model_fingerprint=fingerprint), model,
            f"the visual index in {folder}")
        logger.info(f"Loaded the visual index of {len(visual_index)} product images from {folder}")
        return visual_index
    try:
        visual_index = build_visual_index(
            model, processor, load_products(), columns=columns, batch_size=batch_size, fetch_images=fetch_images,
            image_report=image_report, image_feature_store=image_feature_store,
        )
    except ValueError as error:  # no product has a usable image
        raise CliError(f"{error} (--dataset, --image_column)") from error
    stranger = next((product_id for product_id in visual_index.ids if product_id not in index), None)
    if stranger is not None:
        where = "" if index_dir is None else f" in {index_dir}"
        raise CliError(
            f"product id {stranger!r} of this catalogue is not in the product index{where}: it was built from another "
            "catalogue (--dataset, --split, --max_products); pass --rebuild_index"
        )
    if check_images is not None:
        check_images()
    if folder is not None:
        visual_index.save(folder, overwrite=True)  # an old one is either this model's or refused above
        logger.info(f"Built a visual index of {len(visual_index)} product images and saved it to {folder}")
    return visual_index


def is_combined_query(args) -> bool:
    """Whether `args` ask for one text + image query: exactly one `--query` and one `--image`.

    Example: `is_combined_query(parse_args([..., "--query", "in red", "--image", "shirt.jpg"]))` is True.
    """
    return len(args.query) == 1 and len(args.image) == 1


def load_query_image(path: str):
    """The decoded image at `path` (see `load_product_image`); `CliError` when it cannot be read.

    Example: `search_images(model, processor, index, [load_query_image("shoe.jpg")], k=5)`.
    """
    try:
        return load_product_image(path, on_error="raise").image
    except ImageDecodeError as error:
        raise CliError(f"cannot read the query image {path!r}: {error}") from error


def result_records(index: ProductIndex, scores: torch.Tensor, ids: list, title_column: str) -> list[dict]:
    """One `{rank, score, product_id, title}` dict per ranked product (slots no product filled are left out).

    Example: `scores, ids = search_text(model, processor, index, ["red shoes"]); result_records(index, scores[0],
    ids[0], "title")[0]["rank"] == 1`.
    """
    ranked = [pair for pair in zip(scores.tolist(), ids, strict=True) if pair[1] is not None]
    return [
        {
            "rank": rank,
            "score": score,
            "product_id": str(product_id),
            "title": index.metadata_for(product_id).get(title_column) or "",
        }
        for rank, (score, product_id) in enumerate(ranked, start=1)
    ]


def format_results(label: str, records: list[dict]) -> str:
    """A plain-text table of `result_records`.

    Example: `print(format_results("text query: red shoes", result_records(index, scores[0], ids[0], "title")))`.
    """
    id_width = max([len("product_id"), *(len(record["product_id"]) for record in records)])
    lines = [label, f"{'rank':>4}  {'score':>7}  {'product_id':<{id_width}}  title"]
    for record in records:
        lines.append(
            f"{record['rank']:>4}  {record['score']:>7.4f}  {record['product_id']:<{id_width}}  {record['title']}"
        )
    return "\n".join(lines)


def product_filter_from_args(args) -> ProductFilter:
    """The `ProductFilter` of `--filter`, `--min_price`, `--max_price` and `--price_column` (`CliError` when
    malformed).

    Example: `product_filter_from_args(parse_args([..., "--filter", "gender=Women"])).values == {"gender": ("Women",)}`.
    """
    try:
        return ProductFilter.from_arguments(
            args.filter, min_price=args.min_price, max_price=args.max_price, price_column=args.price_column
        )
    except FilterError as error:
        raise CliError(str(error)) from error


def fusion_from_args(args) -> Fusion:
    """The `Fusion` of `--fusion`, `--rrf_k`, `--alpha`, `--normalisation` and `--fusion_depth`.

    Example: `fusion_from_args(parse_args([..., "--ranker", "hybrid", "--fusion", "score"])).method == "score"`.
    """
    try:
        return Fusion(
            args.fusion, rrf_k=args.rrf_k, alpha=args.alpha, normalisation=args.normalisation, depth=args.fusion_depth
        )
    except ValueError as error:
        raise CliError(f"{error} (--fusion, --rrf_k, --alpha, --normalisation, --fusion_depth)") from error


def add_filter_arguments(parser: argparse.ArgumentParser, *, applies_to: str = "--top_k matching products come back"
                         ) -> None:
    """`--filter COLUMN=VALUE` (repeatable), `--min_price`, `--max_price` and `--price_column`, as one argument group;
    `applies_to` finishes its title ("filters (applied inside the search: ...)"). Read them with
    `product_filter_from_args`.

    Example: `add_filter_arguments(parser); product_filter = product_filter_from_args(parser.parse_args([...]))`.
    """
    group = parser.add_argument_group(f"filters (applied inside the search: {applies_to})")
    group.add_argument(
        "--filter", action="append", default=[], metavar="COLUMN=VALUE",
        help="keep products whose COLUMN (a catalogue column, or gender, article_type, colour, brand, ...) is VALUE "
             "(case-insensitive); repeat a column for alternatives, several columns must all match",
    )
    group.add_argument("--min_price", type=float, default=None, help="keep products priced at least this")
    group.add_argument("--max_price", type=float, default=None, help="keep products priced at most this")
    group.add_argument("--price_column", default=DEFAULT_PRICE_COLUMN, help="the column --min/--max_price read")


# Flags of the index backends: each applies to the backends listed, and is refused beside another backend.
BACKEND_FLAGS = {
    "rescore_candidates": ("int8", "binary", "faiss-ivfpq"),
    "ivf_nlist": ("faiss-ivfpq",),
    "ivf_m": ("faiss-ivfpq",),
    "ivf_nbits": ("faiss-ivfpq",),
    "ivf_nprobe": ("faiss-ivfpq",),
    "ivf_training_rows": ("faiss-ivfpq",),
    "hnsw_neighbors": ("faiss-hnsw",),
    "hnsw_ef_construction": ("faiss-hnsw",),
    "hnsw_ef_search": ("faiss-hnsw",),
}


def add_index_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """`--index_backend` and the settings of each backend (`BACKEND_FLAGS`), as one argument group; check them
    with `check_index_backend_arguments`, apply them with `apply_index_backend`.

    Example: `add_index_backend_arguments(parser); apply_index_backend(index, parser.parse_args([...]))`.
    """
    group = parser.add_argument_group("index backend (how the dense ranker searches the product index)")
    group.add_argument(
        "--index_backend", choices=BACKENDS, default="exact",
        help="exact (default); faiss-flat (exact, faiss); faiss-hnsw (graph); faiss-ivfpq (clusters and product "
             "codes); int8 (a byte per dimension) or binary (a bit per dimension). faiss-ivfpq, int8 and binary "
             "rescore their candidates with the float vectors, so scores are exact cosines (docs/performance.md)",
    )
    group.add_argument("--rescore_candidates", type=int, default=None, metavar="N",
                       help="int8, binary, faiss-ivfpq: rescore N x top_k candidates per query (default 4, 16, 8)")
    group.add_argument("--ivf_nlist", type=int, default=None, help="faiss-ivfpq: clusters (default 1024)")
    group.add_argument("--ivf_nprobe", type=int, default=None, help="faiss-ivfpq: clusters visited per query "
                                                                       "(default 32)")
    group.add_argument("--ivf_m", type=int, default=None,
                       help="faiss-ivfpq: product-code sub-vectors, a divisor of the embedding dimension (default: "
                            "sub-vectors of about 8 dimensions)")
    group.add_argument("--ivf_nbits", type=int, default=None, help="faiss-ivfpq: bits per sub-vector code (default 8)")
    group.add_argument("--ivf_training_rows", type=int, default=None,
                       help="faiss-ivfpq: rows sampled to train the clusters and codes (default 65536)")
    group.add_argument("--hnsw_neighbors", type=int, default=None, help="faiss-hnsw: graph degree (default 32)")
    group.add_argument("--hnsw_ef_construction", type=int, default=None,
                       help="faiss-hnsw: candidate list while building (default 200)")
    group.add_argument("--hnsw_ef_search", type=int, default=None,
                       help="faiss-hnsw: candidate list while searching (default 128)")


def check_index_backend_arguments(args) -> str | None:
    """The one-line complaint about the index backend flags of `args` (a non-positive value, or a flag of another
    backend than `--index_backend`), or None when they are fine.

    Example: `check_index_backend_arguments(parse_args([..., "--ivf_nprobe", "8"]))` names --index_backend faiss-ivfpq.
    """
    for name, backends in BACKEND_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if value < 1:
            return f"--{name} must be a positive integer, got {value}"
        if args.index_backend not in backends:
            return (f"--{name} applies to --index_backend {' or '.join(backends)}, not {args.index_backend}: drop it "
                    "or choose that backend")
    return None


def apply_index_backend(index: ProductIndex, args) -> ProductIndex:
    """`index` searching with `--index_backend` and its flags, its structure built now (`ProductIndex.set_backend`,
    `prepare_backend`); `CliError` when faiss is missing or a setting does not fit this index.

    Example: `index = apply_index_backend(index, parse_args([..., "--index_backend", "int8"]))`.
    """
    settings = {name: getattr(args, name) for name in BACKEND_FLAGS if getattr(args, name) is not None}
    try:
        return index.set_backend(args.index_backend, **settings).prepare_backend()
    except ImportError as error:
        raise CliError(str(error).splitlines()[0]) from error
    except ValueError as error:
        raise CliError(f"--index_backend {args.index_backend}: {error}") from error


def add_ranker_arguments(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    """`--ranker` (one, or with `several` one or more to compare) and the fusion flags of the hybrid ranker.

    Example: `add_ranker_arguments(parser); fusion = fusion_from_args(parser.parse_args([...]))`.
    """
    group = parser.add_argument_group("ranking")
    group.add_argument(
        "--ranker", choices=RANKERS, default=["dense"] if several else "dense", nargs="+" if several else None,
        help="dense: the model; lexical: BM25 over title, brand and description; hybrid: both, fused (--fusion)"
             + ("; several are evaluated side by side" if several else ""),
    )
    group.add_argument(
        "--fusion", choices=FUSIONS, default="rrf",
        help="hybrid: rrf (reciprocal rank fusion) or score (normalised score fusion, --alpha, --normalisation)",
    )
    group.add_argument("--rrf_k", type=float, default=DEFAULT_RRF_K, help="rank offset of rrf (default %(default)s)")
    group.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="weight of the dense scores in score fusion, 0 to 1"
    )
    group.add_argument("--normalisation", choices=NORMALISATIONS, default="minmax", help="per-query score scaling")
    group.add_argument(
        "--fusion_depth", type=int, default=DEFAULT_DEPTH,
        help="candidates fused from each ranker (default %(default)s)",
    )


def catalogue_table(
    catalogue, index: ProductIndex, columns: CatalogueColumns, product_filter: ProductFilter, ranker: str
) -> tuple[ProductTable, tuple[str, ...]]:
    """The catalogue columns the filter and the lexical ranker read, in the index's row order, and the lexical
    fields; `CliError` when the index holds a product the catalogue lacks.

    Example: `table, fields = catalogue_table(catalogue, index, columns, ProductFilter(), "hybrid")`.
    """
    fields = ()
    if ranker != "dense":
        fields = tuple(name for name in lexical_fields(columns) if name in catalogue.column_names)
    try:
        return ProductTable.from_catalogue(
            catalogue, index.ids, names=[*fields, *product_filter.columns], id_column=columns.product_id
        ), fields
    except ValueError as error:
        raise CliError(f"{error} (--dataset, --split, --max_products, or --rebuild_index)") from error


def build_ranker(
    index: ProductIndex, table: ProductTable | None, fields: Sequence[str], ranker: str, fusion: Fusion
) -> ProductRanker:
    """The `ProductRanker` of `--ranker` over `index`, with its BM25 index built once from `table` when needed.

    Example: `ranker = build_ranker(index, table, fields, "hybrid", Fusion("rrf"))`.
    """
    lexical = None
    if ranker != "dense":
        lexical = LexicalIndex.from_products(table.records(fields), fields)
    return ProductRanker(index, lexical, ranker=ranker, fusion=fusion)


def run_searches(
    args,
    model,
    processor,
    index: ProductIndex,
    columns: CatalogueColumns,
    ranker: ProductRanker | None = None,
    allowed: np.ndarray | None = None,
    visual_index: ProductIndex | None = None,
) -> list[dict]:
    """`[{query, kind, ranker, results}]` for every `--query` then every `--image`, or the one text + image query
    (`is_combined_query`: also `image` and `image_weight`). `ranker` ranks the text queries (dense by default);
    image queries are ranked by the model in its product index (`ranker` "dense", 4tower concat/alpha_concat) or
    by the image tower in `visual_index` ("visual"); a text + image query is "dense+visual". `allowed` (a filter's
    mask) restricts them all.

    Example: `run_searches(parse_args([..., "--query", "red shoes"]), model, processor, index, columns)[0]["kind"]`
    is "text".
    """
    ranker = ranker or ProductRanker(index)
    searches = []
    if is_combined_query(args):
        weight = DEFAULT_IMAGE_WEIGHT if args.image_weight is None else args.image_weight
        (query,), (path,) = args.query, args.image
        try:
            scores, ids = search_text_and_image(
                model, processor, index, visual_index, [query], [load_query_image(path)], k=args.top_k,
                image_weight=weight, allowed=allowed,
            )
        except ValueError as error:  # no image tower, or indexes of different catalogues
            raise CliError(str(error)) from error
        records = result_records(index, scores[0], ids[0], columns.title)
        return [{"query": query, "image": path, "image_weight": weight, "kind": "text+image", "ranker": "dense+visual",
                 "results": records}]
    for query in args.query:
        scores, ids = ranker.search(
            [query], k=args.top_k, embed=lambda texts: embed_queries(model, processor, texts), allowed=allowed
        )
        records = result_records(index, scores[0], ids[0], columns.title)
        searches.append({"query": query, "kind": "text", "ranker": ranker.ranker, "results": records})
    for path in args.image:
        try:
            scores, ids = search_images(
                model, processor, index, [load_query_image(path)], k=args.top_k, visual_index=visual_index,
                allowed=allowed,
            )
        except ValueError as error:  # no image tower, or indexes of different catalogues
            raise CliError(str(error)) from error
        records = result_records(index, scores[0], ids[0], columns.title)
        kind = "dense" if fused_image_queries_supported(model) else "visual"
        searches.append({"query": path, "kind": "image", "ranker": kind, "results": records})
    return searches


def catalogue_folder(dataset: str | None) -> Path | None:
    """The folder of a local `--dataset` (the default data folder without one), from which the web demo may serve
    image files; None for a Hub dataset or a glob, whose images are then served from the rows' own bytes only.

    Example: `catalogue_folder("data/shop/train.parquet") == Path("data/shop")`.
    """
    from modeling_mmretrieval.data.catalogue import default_data_dir

    if dataset is None:
        return default_data_dir()
    path = Path(dataset).expanduser()
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


COMPARE_INDEX_DIRNAME = "compare"


def compare_index_dir(index_dir: Path) -> Path:
    """Where the index of `--compare_model` is kept: a folder of the main index's folder.

    Example: `compare_index_dir(Path("indexes/test")) == Path("indexes/test/compare")`.
    """
    return index_dir / COMPARE_INDEX_DIRNAME


def open_compared_model(args, catalogue, columns: CatalogueColumns):
    """The `--compare_model` checkpoint for the search page, with its index over the same catalogue: loaded from
    `<index_dir>/compare` when that model built it, else built (and saved there; in memory without `--index_dir`),
    refused in one line when another model built it (see `open_or_build_index`). A model that ranks the page's
    photos by similarity (`page_ranks_photos_by_similarity`) also gets its visual index, in `<index_dir>/compare/visual`
    (see `open_or_build_visual_index`).

    Example: `serve(..., compared=open_compared_model(args, catalogue, columns))`.
    """
    from modeling_mmretrieval.retrieval.search_app import ComparedModel

    model, processor = load_retriever(args.compare_model, args.device)
    index_dir = None if args.index_dir is None else compare_index_dir(args.index_dir)
    builds_index = args.rebuild_index or index_dir is None or not (index_dir / META_FILENAME).is_file()
    image_report = ImageReport()
    # A text-only model reads no image: no image line (it would count nothing).
    check_images = (lambda: report_images(image_report, args, columns)) if model.config.uses_images else None
    index = open_or_build_index(
        model, processor, index_dir, lambda: catalogue, columns=columns, rebuild=args.rebuild_index,
        batch_size=args.batch_size, fetch_images=args.fetch_images, image_report=image_report,
        check_images=check_images, image_feature_store=image_feature_store_from_args(args),
    )
    visual_index = None
    if page_ranks_photos_by_similarity(model, columns):
        visual_index = open_visual_index_for_run(args, model, processor, index, index_dir, lambda: catalogue, columns,
                                                 image_report if builds_index else None)
    return ComparedModel(model, processor, index, visual_index=visual_index)


def open_visual_index_for_run(args, model, processor, index: ProductIndex, index_dir: Path | None,
                              load_products: Callable[[], Any], columns: CatalogueColumns,
                              image_report: ImageReport | None) -> ProductIndex:
    """`open_or_build_visual_index` with this run's flags; `image_report` is that of a product index built in this
    run, which already counted (and reported) the same images, or None: a visual index built now then prints its own
    image line.

    Example: `visual_index = open_visual_index_for_run(args, model, processor, index, args.index_dir, lambda:
    catalogue, columns, None)`.
    """
    report = image_report if image_report is not None else ImageReport()
    return open_or_build_visual_index(
        model, processor, index, index_dir, load_products, columns=columns, rebuild=args.rebuild_index,
        batch_size=args.batch_size, fetch_images=args.fetch_images, image_report=report,
        check_images=None if image_report is not None else lambda: report_images(report, args, columns),
        image_feature_store=image_feature_store_from_args(args),
    )


def serve(
    model, processor, index: ProductIndex, catalogue, columns: CatalogueColumns, port: int, *,
    image_root: Path | None = None, judgements: Path | None = None, fusion: Fusion | None = None,
    price_column: str = DEFAULT_PRICE_COLUMN, compared=None, visual_index: ProductIndex | None = None,
) -> None:
    """Run the search page on 127.0.0.1 until Ctrl-C: image files only from `image_root`, relevance marks
    appended to `judgements` (none recorded without it), `fusion` for its hybrid ranker, `compared` (a
    `search_app.ComparedModel`, see `open_compared_model`) offered beside the results, and `visual_index` (see
    `open_or_build_visual_index`), through which a model that ranks photos by similarity takes the page's photos.

    Example: `serve(model, processor, index, catalogue, columns, port=8000, judgements=Path("marks.jsonl"))`.
    """
    from modeling_mmretrieval.retrieval.demo import serve_demo
    from modeling_mmretrieval.retrieval.judgements import JudgementError

    try:
        server = serve_demo(
            model, processor, index, catalogue, port=port, columns=columns, image_root=image_root,
            judgements_path=judgements, fusion=fusion, price_column=price_column, compared_model=compared,
            visual_index=visual_index,
        )
    except JudgementError as error:  # the marks already in the file cannot be read
        raise CliError(f"{error} (--judgements)") from error
    except ValueError as error:  # the index holds products that this catalogue lacks
        raise CliError(str(error)) from error
    except OSError as error:
        raise CliError(f"cannot serve on port {port}: {error}") from error
    with server:
        marks = f"; relevance marks go to {judgements}" if judgements is not None else ""
        if server.app.compared is not None:
            marks += f"; {server.app.compared.label!r} can be shown beside {server.app.label!r}"
        if server.app.image_query_refusal is not None:
            marks += f"; photo search is off: {server.app.image_query_refusal}"
        print(f"Serving the search page on {server.url} (Ctrl-C to stop){marks}", flush=True)
        with stopped_by_signals():
            try:
                server.wait()
            except KeyboardInterrupt:
                pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def stopped_by_signals():
    """While the block runs, Ctrl-C (SIGINT) and SIGTERM raise `KeyboardInterrupt` in the main thread, even in a
    process started with them ignored (a shell's background job inherits an ignored SIGINT), so a server stops.

    Example: `with stopped_by_signals(): server.wait()`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The search command's arguments; `prog` names the program in usage and error lines.

    Example: `parse_args(["--model_name_or_path", "outputs/run/final", "--query", "red shoes"]).top_k == 10`.
    """
    parser = retriever_parser(__doc__.split("\n\n")[0], prog)
    parser.add_argument("--index_dir", type=Path, default=None, help="where the index is saved and reused")
    parser.add_argument("--rebuild_index", action="store_true", help="rebuild the index even if --index_dir has one")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument(
        "--image", action="append", default=[],
        help="a query image file (repeatable), for any model with an image tower: a 4tower concat/alpha_concat model "
             "ranks it in the product index, others by image similarity in the visual index (<index_dir>/visual, "
             "built on first use). With exactly one --query, the two make one text + image query (--image_weight)",
    )
    parser.add_argument(
        "--image_weight", type=float, default=None, metavar="W",
        help="the photo's share in a text + image query (one --query, one --image): products score (1 - W) * "
             "cos(text, product) + W * cos(photo, product photo), so 0 ranks by the text, 1 by the photo (default "
             f"{DEFAULT_IMAGE_WEIGHT}); to search a text and a photo apart, run them separately",
    )
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--output_format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--serve", action="store_true",
        help="start the search page on 127.0.0.1 (its own ranker choice, filters and pages; --fusion and the "
             "fusion flags set its hybrid ranker, --price_column its price range). It takes photos for any model "
             "with an image tower: a model that ranks them by similarity to the product photos gets its visual "
             "index (<index_dir>/visual, built on first use)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port of the search page (0: any free port)")
    parser.add_argument(
        "--judgements", type=Path, default=None, metavar="FILE",
        help="with --serve: the JSONL file the page's relevance marks are appended to (evaluate --judgements reads it)",
    )
    parser.add_argument(
        "--compare_model", default=None, metavar="PATH",
        help="with --serve: a second checkpoint the page shows beside the first (\"beside it\"), over the same "
             "catalogue; its index is kept in <index_dir>/compare (in memory without --index_dir)",
    )
    add_ranker_arguments(parser)
    add_filter_arguments(parser)
    add_image_arguments(parser)
    add_index_backend_arguments(parser)
    args = parser.parse_args(argv)
    backend_problem = check_index_backend_arguments(args)
    if backend_problem is not None:
        parser.error(backend_problem)
    if not (args.query or args.image or args.serve):
        parser.error("give --query, --image or --serve")
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
    if args.image_weight is not None and not is_combined_query(args):
        parser.error("--image_weight weighs the photo of a text + image query: give one --query and one --image")
    if args.image_weight is not None and not 0.0 <= args.image_weight <= 1.0:
        parser.error(f"--image_weight must lie between 0 and 1, got {args.image_weight}")
    if args.image and args.ranker != "dense":
        parser.error(f"--image queries are ranked by the model (an image has no words for BM25); --ranker "
                     f"{args.ranker} ranks text queries only: give them in a separate run")
    if args.judgements is not None and not args.serve:
        parser.error("--judgements is where the search page (--serve) records relevance marks: add --serve")
    if args.judgements is not None and args.judgements.is_dir():
        parser.error(f"--judgements {args.judgements} is a folder; give the JSONL file the marks are appended to")
    if args.compare_model is not None and not args.serve:
        parser.error("--compare_model is shown beside the first model on the search page: add --serve")
    return args


def main(argv=None, prog: str | None = None) -> int:
    """Runs the search command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--model_name_or_path", "outputs/run/final", "--query", "red shoes", "--top_k", "5"])`.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prog = prog or os.path.basename(sys.argv[0])
    args = parse_args(argv, prog)
    try:
        check_retriever_settings(args)
        check_image_arguments(args)
        check_index_dir(args.index_dir, args.rebuild_index)
        if args.compare_model is not None and args.index_dir is not None:
            check_index_dir(compare_index_dir(args.index_dir), args.rebuild_index)
        product_filter = product_filter_from_args(args)
        fusion = fusion_from_args(args)
        builds_index = args.rebuild_index or args.index_dir is None or not (args.index_dir / META_FILENAME).is_file()
        # Filters and the lexical ranker read the catalogue's columns, even beside a saved index.
        reads_catalogue = bool(product_filter) or args.ranker != "dense"
        catalogue = None
        if builds_index or args.serve or reads_catalogue:
            # Checked before the model is loaded: a bad catalogue fails in a second, not after the model.
            catalogue, columns = load_catalogue_from_args(args, needs_queries=False)
            catalogue = checked_products(catalogue, columns, args)
            try:
                product_filter = product_filter.resolved(columns, catalogue.column_names)
            except FilterError as error:
                raise CliError(str(error)) from error
        else:
            columns = catalogue_columns_from_args(args)
        model, processor = load_retriever(args.model_name_or_path, args.device)
        if args.image:
            try:
                check_image_tower(model)  # a text-only model: refused before any index is built
            except ValueError as error:
                raise CliError(str(error)) from error
        image_report = ImageReport()
        index = open_or_build_index(
            model, processor, args.index_dir, lambda: catalogue, columns=columns, rebuild=args.rebuild_index,
            batch_size=args.batch_size, fetch_images=args.fetch_images, image_report=image_report,
            check_images=lambda: report_images(image_report, args, columns),
            image_feature_store=image_feature_store_from_args(args),
        )
        index = apply_index_backend(index, args)
        ranker, allowed = ProductRanker(index), None
        if reads_catalogue:
            table, fields = catalogue_table(catalogue, index, columns, product_filter, args.ranker)
            ranker = build_ranker(index, table, fields, args.ranker, fusion)
            if product_filter:
                allowed = table.allowed(product_filter)
                logger.info(f"Filter {product_filter.describe()}: {int(allowed.sum())} of {len(index)} products")
        visual_index = None
        if needs_visual_index(model, args, columns):

            def products_for_visual_index():
                if catalogue is not None:
                    return catalogue
                loaded, loaded_columns = load_catalogue_from_args(args, needs_queries=False)
                return checked_products(loaded, loaded_columns, args)

            visual_index = open_visual_index_for_run(args, model, processor, index, args.index_dir,
                                                     products_for_visual_index, columns,
                                                     image_report if builds_index else None)
        searches = run_searches(args, model, processor, index, columns, ranker, allowed, visual_index)
        if searches and args.output_format == "json":
            print(json.dumps(searches, indent=2))
        elif searches:
            labels = [f"{s['kind']} query: {s['query']}"
                      + (f" + {s['image']} (image weight {s['image_weight']:g})" if "image" in s else "")
                      + ("" if s["ranker"] == "dense" else f" ({s['ranker']})")
                      for s in searches]
            print("\n\n".join(format_results(label, s["results"]) for label, s in zip(labels, searches)))
        if args.serve:
            compared = None if args.compare_model is None else open_compared_model(args, catalogue, columns)
            serve(model, processor, index, catalogue, columns, args.port, image_root=catalogue_folder(args.dataset),
                  judgements=args.judgements, fusion=fusion, price_column=args.price_column, compared=compared,
                  visual_index=visual_index if page_ranks_photos_by_similarity(model, columns) else None)
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0

