"""Search a product catalogue with a trained retriever: text queries, image queries, or a local web demo.

The product index is built from `--dataset`/`--split` on first use and saved in `--index_dir`; later runs load
it, after checking that it was built by the same model (model id and config fingerprint), and refuse an index
built by another one. The catalogue and the flags are checked before the model is loaded, and a run that builds
the index prints how its images fared (ok, missing, undecodable, refused, with example product ids). See
docs/search.md.

Examples:
```bash
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test \
    --query "red running shoes for men" --top_k 5
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --image shoe.jpg
mmretrieval search --model_name_or_path outputs/run/final --index_dir indexes/test --serve --port 8000
```
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modeling_mmretrieval.data import CatalogueColumns, ImageDecodeError, load_product_image
from modeling_mmretrieval.data.images import ImageReport
from modeling_mmretrieval.retrieval.index import ProductIndex
from modeling_mmretrieval.retrieval.index_files import META_FILENAME, IndexIntegrityError, IndexModelMismatchError
from modeling_mmretrieval.retrieval.search import (
    build_product_index,
    config_fingerprint,
    model_identity,
    search_images,
    search_text,
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
    """One `{rank, score, product_id, title}` dict per ranked product.

    Example: `scores, ids = search_text(model, processor, index, ["red shoes"]); result_records(index, scores[0],
    ids[0], "title")[0]["rank"] == 1`.
    """
    return [
        {
            "rank": rank,
            "score": score,
            "product_id": str(product_id),
            "title": index.metadata_for(product_id).get(title_column) or "",
        }
        for rank, (score, product_id) in enumerate(zip(scores.tolist(), ids, strict=True), start=1)
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


def run_searches(args, model, processor, index: ProductIndex, columns: CatalogueColumns) -> list[dict]:
    """`[{query, kind, results}]` for every `--query` then every `--image`.

    Example: `run_searches(parse_args([..., "--query", "red shoes"]), model, processor, index, columns)[0]["kind"]`
    is "text".
    """
    searches = []
    for query in args.query:
        scores, ids = search_text(model, processor, index, [query], k=args.top_k)
        records = result_records(index, scores[0], ids[0], columns.title)
        searches.append({"query": query, "kind": "text", "results": records})
    for path in args.image:
        try:
            scores, ids = search_images(model, processor, index, [load_query_image(path)], k=args.top_k)
        except ValueError as error:  # the model (or its processor) cannot embed image queries
            raise CliError(str(error)) from error
        records = result_records(index, scores[0], ids[0], columns.title)
        searches.append({"query": path, "kind": "image", "results": records})
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
    add_image_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.query or args.image or args.serve):
        parser.error("give --query, --image or --serve")
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
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
        builds_index = args.rebuild_index or args.index_dir is None or not (args.index_dir / META_FILENAME).is_file()
        catalogue = None
        if builds_index or args.serve:
            # Checked before the model is loaded: a bad catalogue fails in a second, not after the model.
            catalogue, columns = load_catalogue_from_args(args, needs_queries=False)
            catalogue = checked_products(catalogue, columns, args)
        else:
            columns = catalogue_columns_from_args(args)
        model, processor = load_retriever(args.model_name_or_path, args.device)
        image_report = ImageReport()
        index = open_or_build_index(
            model, processor, args.index_dir, lambda: catalogue, columns=columns, rebuild=args.rebuild_index,
            batch_size=args.batch_size, fetch_images=args.fetch_images, image_report=image_report,
            check_images=lambda: report_images(image_report, args, columns),
        )
        searches = run_searches(args, model, processor, index, columns)
        if searches and args.output_format == "json":
            print(json.dumps(searches, indent=2))
        elif searches:
            print("\n\n".join(format_results(f"{s['kind']} query: {s['query']}", s["results"]) for s in searches))
        if args.serve:
            serve(model, processor, index, catalogue, columns, args.port)
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0

