#!/usr/bin/env python
"""Search a product catalogue with a trained retriever: text queries, image queries, or a local web demo.

The product index is built from `--dataset`/`--split` on first use and saved in `--index_dir`; later runs load
it, after checking that it was built by the same model (model id and config fingerprint), and refuse an index
built by another one. See docs/search.md.

Examples:
```bash
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test \
    --query "red running shoes for men" --top_k 5
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --image shoe.jpg
python examples/search.py --model_name_or_path outputs/run/final --index_dir indexes/test --serve --port 8000
```

The catalogue helpers here (`add_catalogue_arguments`, `load_catalogue_from_args`, `load_retriever`) are shared
with `examples/evaluate.py`.
"""

import argparse
import dataclasses
import functools
import json
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor
from modeling_mmretrieval.data import CatalogueColumns, load_catalogue
from modeling_mmretrieval.image_loading import ImageDecodeError, load_product_image
from modeling_mmretrieval.index import META_FILENAME, IndexIntegrityError, IndexModelMismatchError, ProductIndex
from modeling_mmretrieval.search import (
    build_product_index,
    config_fingerprint,
    model_identity,
    search_images,
    search_text,
)

logger = logging.getLogger("search")

# Columns a catalogue may lack entirely: `--<name>_column none` turns them off.
_NONE_VALUES = ("", "none", "null")
_COLUMN_FIELDS = tuple(
    field for field in dataclasses.fields(CatalogueColumns) if field.name not in ("query", "attribute_keys")
)


def _is_optional(field: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(field.type)


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status 2, no traceback."""


# ----------------------------------------------------------------------------------------------------------------
# Shared with examples/evaluate.py: model and catalogue arguments
# ----------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model_name_or_path", required=True, help="checkpoint folder or Hub id (model and processor)"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--batch_size", type=int, default=64, help="products encoded per batch")


def add_catalogue_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("catalogue")
    group.add_argument(
        "--dataset",
        default=None,
        help="directory, data file(s) or Hub dataset name (default: the shared catalogue, else the committed sample)",
    )
    group.add_argument("--split", default="test")
    group.add_argument("--max_products", type=int, default=None, help="keep only the first N products")
    for field in _COLUMN_FIELDS:
        group.add_argument(
            f"--{field.name}_column",
            default=field.default,
            help=f"default {field.default!r}" + ("; 'none' if the catalogue lacks it" if _is_optional(field) else ""),
        )
    group.add_argument(
        "--attribute_keys",
        nargs="*",
        default=list(CatalogueColumns.attribute_keys),
        help="keys of the attributes JSON that derived queries may use",
    )


def catalogue_columns_from_args(args: argparse.Namespace) -> CatalogueColumns:
    names = {}
    for field in _COLUMN_FIELDS:
        value = getattr(args, f"{field.name}_column")
        if value.strip().lower() in _NONE_VALUES:
            if not _is_optional(field):
                raise CliError(f"--{field.name}_column is required and cannot be {value!r}")
            value = None
        names[field.name] = value
    return CatalogueColumns(**names, attribute_keys=tuple(args.attribute_keys))


def load_catalogue_from_args(args: argparse.Namespace, columns: CatalogueColumns):
    """The `--split` of `--dataset` (first `--max_products` rows), images kept encoded."""
    try:
        catalogue = load_catalogue(args.dataset, split=args.split, columns=columns)
    except (KeyError, FileNotFoundError, ValueError) as error:
        raise CliError(f"cannot load the catalogue: {error}") from error
    if args.max_products is not None:
        if args.max_products < 1:
            raise CliError(f"--max_products must be positive, got {args.max_products}")
        catalogue = catalogue.select(range(min(args.max_products, len(catalogue))))
    logger.info(f"Catalogue: {len(catalogue)} products ({args.dataset or 'default data'}, split {args.split!r})")
    return catalogue


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_retriever(name_or_path: str, device: str = "auto"):
    """`(model, processor)` of a checkpoint, the model in eval mode on `device`.

    A local folder is loaded by its absolute path, so the model id an index records does not depend on the
    directory the command was started from.
    """
    if Path(name_or_path).is_dir():
        name_or_path = str(Path(name_or_path).resolve())
    try:
        model = MultimodalRetrievalModel.from_pretrained(name_or_path)
        processor = MultimodalRetrievalProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise CliError(f"cannot load a retriever from {name_or_path!r}: {error}") from error
    return model.to(resolve_device(device)).eval(), processor


# ----------------------------------------------------------------------------------------------------------------
# Index and results
# ----------------------------------------------------------------------------------------------------------------


def open_or_build_index(
    model,
    processor,
    index_dir: Path | None,
    load_products: Callable[[], Any],
    *,
    columns: CatalogueColumns,
    rebuild: bool,
    batch_size: int,
) -> ProductIndex:
    """The saved index of `index_dir` when there is one and `model` built it, else a new one.

    `load_products()` returns the catalogue; it is only called when the index has to be built. A new index is
    saved to `index_dir` (replacing the old one when `rebuild`).
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
        model, processor, load_products(), columns=columns, batch_size=batch_size, metadata_columns=(columns.title,)
    )
    if index_dir is not None:
        index.save(index_dir, overwrite=rebuild)
        logger.info(f"Built an index of {len(index)} products and saved it to {index_dir}")
    return index


def load_query_image(path: str):
    try:
        return load_product_image(path, on_error="raise").image
    except ImageDecodeError as error:
        raise CliError(f"cannot read the query image {path!r}: {error}") from error


def result_records(index: ProductIndex, scores: torch.Tensor, ids: list, title_column: str) -> list[dict]:
    """One `{rank, score, product_id, title}` dict per ranked product."""
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
    """A plain-text table of `result_records`."""
    id_width = max([len("product_id"), *(len(record["product_id"]) for record in records)])
    lines = [label, f"{'rank':>4}  {'score':>7}  {'product_id':<{id_width}}  title"]
    for record in records:
        lines.append(
            f"{record['rank']:>4}  {record['score']:>7.4f}  {record['product_id']:<{id_width}}  {record['title']}"
        )
    return "\n".join(lines)


def run_searches(args, model, processor, index: ProductIndex, columns: CatalogueColumns) -> list[dict]:
    """`[{query, kind, results}]` for every `--query` then every `--image`."""
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
    """Run the web demo on 127.0.0.1 until Ctrl-C."""
    from modeling_mmretrieval.demo import serve_demo

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    add_catalogue_arguments(parser)
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
    args = parser.parse_args(argv)
    if not (args.query or args.image or args.serve):
        parser.error("give --query, --image or --serve")
    if args.top_k < 1:
        parser.error(f"--top_k must be positive, got {args.top_k}")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        columns = catalogue_columns_from_args(args)
        model, processor = load_retriever(args.model_name_or_path, args.device)
        # Loaded at most once, and only when the index must be built or the demo shows the images.
        load_products = functools.cache(lambda: load_catalogue_from_args(args, columns))
        index = open_or_build_index(
            model, processor, args.index_dir, load_products, columns=columns, rebuild=args.rebuild_index,
            batch_size=args.batch_size,
        )
        searches = run_searches(args, model, processor, index, columns)
        if searches and args.output_format == "json":
            print(json.dumps(searches, indent=2))
        elif searches:
            print("\n\n".join(format_results(f"{s['kind']} query: {s['query']}", s["results"]) for s in searches))
        if args.serve:
            serve(model, processor, index, load_products(), columns, args.port)
    except CliError as error:
        print(f"search.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
