"""Search a product catalogue with a trained retriever: text queries, image queries, or a local web demo.

The product index is built from `--dataset`/`--split` on first use and saved in `--index_dir`; later runs load
it, after checking that it was built by the same model (model id and config fingerprint), and refuse an index
built by another one, or a damaged one. The catalogue and the flags are checked before the model is loaded, and a
run that builds the index prints how its images fared (ok, missing, undecodable, refused, with example product ids).
Text queries are ranked by the model (`--ranker dense`), by BM25 over the products' title, brand and description
(`lexical`) or by both fused (`hybrid`, `--fusion rrf` or `score`); `--filter COLUMN=VALUE`, `--min_price` and
`--max_price` restrict the search to matching products, so `--top_k` of them come back. See docs/search.md.

Examples:
```bash
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test \
    --query "red running shoes for men" --top_k 5
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --query "red tshirt" \
    --ranker hybrid --fusion rrf --filter gender=Women --filter article_type=Tshirts --min_price 500 --max_price 2000
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --image shoe.jpg
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --serve --port 8000
```
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_mmretrieval.data import CatalogueColumns, ImageDecodeError, load_product_image
from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.filters import DEFAULT_PRICE_COLUMN, FilterError, ProductFilter, ProductTable
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
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import META_FILENAME, IndexIntegrityError, IndexModelMismatchError
from modeling_mmretrieval.retrieval.lexical import LexicalIndex, lexical_fields
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    config_fingerprint,
    embed_images,
    embed_queries,
    model_identity,
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
) -> ProductIndex:
    """The saved index of `index_dir` when there is one and `model` built it, else a new one.

    `load_products()` returns the catalogue; it is only called when the index has to be built. A new index is
    saved to `index_dir` (replacing the old one when `rebuild`); `image_report` then counts its images, and
    `check_images()` runs before it is saved, so an image failure it raises (`--strict_images`) leaves no index.

    Example: `open_or_build_index(model, processor, Path("indexes/test"), lambda: catalogue, columns=columns,
    rebuild=False, batch_size=64)`.
    """
    check_index_dir(index_dir, rebuild)
    if index_dir is not None and (index_dir / META_FILENAME).is_file() and not rebuild:
        try:
            index = ProductIndex.load(
                index_dir,
                expected_model_id=model_identity(model),
                expected_config_hash=config_fingerprint(model.config),
            )
        except IndexModelMismatchError as error:
            raise CliError(f"{error} (or pass --rebuild_index to replace it, or another --index_dir)") from error
        except IndexIntegrityError as error:
            raise CliError(f"the index in {index_dir} is damaged ({error}); pass --rebuild_index") from error
        logger.info(f"Loaded the index of {len(index)} products from {index_dir}")
        return index
    index = build_product_index(
        model, processor, load_products(), columns=columns, batch_size=batch_size, metadata_columns=(columns.title,),
        fetch_images=fetch_images, image_report=image_report,
    )
    if check_images is not None:
        check_images()
    if index_dir is not None:
        index.save(index_dir, overwrite=rebuild)
        logger.info(f"Built an index of {len(index)} products and saved it to {index_dir}")
    return index


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
) -> list[dict]:
    """`[{query, kind, ranker, results}]` for every `--query` then every `--image`; `ranker` ranks the text queries
    (dense by default), image queries are ranked by the model; `allowed` (a filter's mask) restricts both.

    Example: `run_searches(parse_args([..., "--query", "red shoes"]), model, processor, index, columns)[0]["kind"]`
    is "text".
    """
    ranker = ranker or ProductRanker(index)
    searches = []
    for query in args.query:
        scores, ids = ranker.search(
            [query], k=args.top_k, embed=lambda texts: embed_queries(model, processor, texts), allowed=allowed
        )
        records = result_records(index, scores[0], ids[0], columns.title)
        searches.append({"query": query, "kind": "text", "ranker": ranker.ranker, "results": records})
    for path in args.image:
        try:
            embeddings = embed_images(model, processor, [load_query_image(path)])
        except ValueError as error:  # the model (or its processor) cannot embed image queries
            raise CliError(str(error)) from error
        scores, ids = index.search(embeddings, k=args.top_k, allowed=allowed)
        records = result_records(index, scores[0], ids[0], columns.title)
        searches.append({"query": path, "kind": "image", "ranker": "dense", "results": records})
    return searches


def serve(model, processor, index: ProductIndex, catalogue, columns: CatalogueColumns, port: int) -> None:
    """Run the web demo on 127.0.0.1 until Ctrl-C.

    Example: `serve(model, processor, index, catalogue, columns, port=8000)`.
    """
    from modeling_mmretrieval.retrieval.demo import serve_demo

    try:
        server = serve_demo(model, processor, index, catalogue, port=port, columns=columns)
    except ValueError as error:  # the index holds products that this catalogue lacks
        raise CliError(str(error)) from error
    except OSError as error:
        raise CliError(f"cannot serve on port {port}: {error}") from error
    with server:
        print(f"Serving the search demo on {server.url} (Ctrl-C to stop)", flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The search command's arguments; `prog` names the program in usage and error lines.

    Example: `parse_args(["--model_name_or_path", "outputs/run/final", "--query", "red shoes"]).top_k == 10`.
    """
    parser = retriever_parser(__doc__.split("\n\n")[0], prog)
    parser.add_argument("--index_dir", type=Path, default=None, help="where the index is saved and reused")
    parser.add_argument("--rebuild_index", action="store_true", help="rebuild the index even if --index_dir has one")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument(
        "--image", action="append", default=[], help="a query image file (repeatable; 4tower concat/alpha_concat)"
    )
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--output_format", choices=("table", "json"), default="table")
    parser.add_argument("--serve", action="store_true", help="start the web demo on 127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="port of the web demo (0: any free port)")
    add_ranker_arguments(parser)
    filters = parser.add_argument_group("filters (applied inside the search: --top_k matching products come back)")
    filters.add_argument(
        "--filter", action="append", default=[], metavar="COLUMN=VALUE",
        help="keep products whose COLUMN (a catalogue column, or gender, article_type, colour, brand, ...) is VALUE "
             "(case-insensitive); repeat a column for alternatives, several columns must all match",
    )
    filters.add_argument("--min_price", type=float, default=None, help="keep products priced at least this")
    filters.add_argument("--max_price", type=float, default=None, help="keep products priced at most this")
    filters.add_argument("--price_column", default=DEFAULT_PRICE_COLUMN, help="the column --min/--max_price read")
    add_image_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.query or args.image or args.serve):
        parser.error("give --query, --image or --serve")
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
    if args.image and args.ranker != "dense":
        parser.error(f"--image queries are ranked by the model (an image has no words for BM25); --ranker "
                     f"{args.ranker} ranks text queries only: give them in a separate run")
    filtered = args.filter or args.min_price is not None or args.max_price is not None
    if args.serve and (args.ranker != "dense" or filtered):
        parser.error("the web demo ranks with the model and has no filters yet: drop --ranker, --filter and the "
                     "price flags with --serve")
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
        image_report = ImageReport()
        index = open_or_build_index(
            model, processor, args.index_dir, lambda: catalogue, columns=columns, rebuild=args.rebuild_index,
            batch_size=args.batch_size, fetch_images=args.fetch_images, image_report=image_report,
            check_images=lambda: report_images(image_report, args, columns),
        )
        ranker, allowed = ProductRanker(index), None
        if reads_catalogue:
            table, fields = catalogue_table(catalogue, index, columns, product_filter, args.ranker)
            ranker = build_ranker(index, table, fields, args.ranker, fusion)
            if product_filter:
                allowed = table.allowed(product_filter)
                logger.info(f"Filter {product_filter.describe()}: {int(allowed.sum())} of {len(index)} products")
        searches = run_searches(args, model, processor, index, columns, ranker, allowed)
        if searches and args.output_format == "json":
            print(json.dumps(searches, indent=2))
        elif searches:
            labels = [f"{s['kind']} query: {s['query']}" + ("" if s["ranker"] == "dense" else f" ({s['ranker']})")
                      for s in searches]
            print("\n\n".join(format_results(label, s["results"]) for label, s in zip(labels, searches)))
        if args.serve:
            serve(model, processor, index, catalogue, columns, args.port)
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0

