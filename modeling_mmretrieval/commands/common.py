"""What the `mmretrieval` commands share: the model, catalogue and image arguments, the up-front checks of a
catalogue and of the flags (before any model is loaded), loading a retriever, and `CliError`.

Every check here fails with a `CliError`: one line on stderr naming the product id, the column and the flag,
exit status 2, no traceback.

Example:

```python
>>> parser = retriever_parser("Search a catalogue.")
>>> args = parser.parse_args(["--model_name_or_path", "outputs/run/final", "--dataset", "shop.csv",
...                           "--product_id_column", "sku", "--title_column", "name"])
>>> catalogue, columns = load_catalogue_from_args(args, needs_queries=False)  # split "train": a single file
>>> catalogue = checked_products(catalogue, columns, args)  # bad products: an error, or left out (--skip_bad_rows)
>>> model, processor = load_retriever(args.model_name_or_path, args.device)
```
"""

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets.exceptions import DatasetGenerationError

from modeling_mmretrieval.data import CatalogueColumnError, CatalogueColumns, load_catalogue
from modeling_mmretrieval.data.images import ImageFailureError, ImageReport
from modeling_mmretrieval.data.product_checks import BadProduct, find_bad_products
from modeling_mmretrieval.retrieval.search import load_retriever as load_checkpoint_retriever

logger = logging.getLogger(__name__)

# Columns a catalogue may lack entirely: `--<name>_column none` turns them off.
_NONE_VALUES = ("", "none", "null")
_COLUMN_FIELDS = tuple(field for field in dataclasses.fields(CatalogueColumns) if field.name != "attribute_keys")
# The columns attribute-derived queries read; only the article type is indispensable to them.
QUERY_DERIVATION_FIELDS = ("article_type", "gender", "base_colour", "usage", "brand", "attributes")
# The split a verb reads by default; a single data file is split "train", which the verbs then read instead.
DEFAULT_SPLIT = "test"
BAD_ROWS_FILENAME = "bad_rows.jsonl"
IMAGE_REPORT_FILENAME = "image_report.json"
DEFAULT_MAX_IMAGE_FAILURE_SHARE = 0.5


def _is_optional(field: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(field.type)


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status 2, no traceback.

    Example:

    ```python
    >>> raise CliError("--max_products must be positive, got 0")
    ```
    """

    def __str__(self) -> str:
        # One line, whatever the message it wraps (a library error may span several).
        return " ".join(str(self.args[0]).split()) if self.args else ""


def run_cli(function, args, prog: str | None) -> int:
    """Runs `function(args)`: 0, or 2 with `<prog>: error: <one line>` on stderr for a `CliError`.

    Example: `return run_cli(build_index, parse_args(argv, prog), prog)`.
    """
    try:
        function(args)
    except CliError as error:
        print(f"{prog or Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model_name_or_path`, `--device` and `--batch_size`.

    Example: `add_model_arguments(parser); load_retriever(parser.parse_args().model_name_or_path)`.
    """
    parser.add_argument(
        "--model_name_or_path", required=True, help="checkpoint folder or Hub id (model and processor)"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--batch_size", type=int, default=64, help="products encoded per batch")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """`--fetch_images`, `--on_image_error`, `--strict_images`, `--max_image_failure_share` and the persistent
    image-feature store: `--image_feature_store DIR` / `--no_image_feature_store`
    (`retrieval.image_feature_store.image_feature_store_from_args` opens it).

    Example: `add_image_arguments(parser); report_images(report, parser.parse_args(["--strict_images"]))` raises
    `CliError` as soon as one image failed.
    """
    group = parser.add_argument_group("images")
    group.add_argument(
        "--fetch_images", action="store_true",
        help="download http(s) image URLs (10 s timeout, size cap); without it an image URL is refused, with a reason",
    )
    group.add_argument(
        "--on_image_error", choices=("mask", "raise"), default="mask",
        help="mask: a missing or broken image makes its product text-only (counted and reported); raise: stop there",
    )
    group.add_argument("--strict_images", action="store_true", help="any missing or broken image is an error")
    group.add_argument(
        "--max_image_failure_share", type=float, default=DEFAULT_MAX_IMAGE_FAILURE_SHARE,
        help="warn loudly when more than this share of the images fail (default %(default)s)",
    )
    group.add_argument(
        "--image_feature_store", metavar="DIR", default=None,
        help="keep the frozen image tower's features of product photos here between runs, shared by training, "
             "indexing and evaluation (default: $MMRETRIEVAL_CACHE/image_features, else "
             "~/.cache/mmretrieval/image_features)",
    )
    group.add_argument(
        "--no_image_feature_store", action="store_true",
        help="compute image features afresh and keep none on disk",
    )


def add_bad_rows_argument(parser: argparse.ArgumentParser) -> None:
    """`--skip_bad_rows`: leave bad products out (listed in `bad_rows.jsonl`) instead of stopping.

    Example: `add_bad_rows_argument(parser); checked_products(catalogue, columns, args, report_dir=Path("out"))`.
    """
    parser.add_argument(
        "--skip_bad_rows", action="store_true",
        help=f"leave out products with a blank, repeated or malformed id or text, listed in {BAD_ROWS_FILENAME} in "
             "the output folder (default: stop at the first one)",
    )


def add_catalogue_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dataset`, `--split`, `--max_products`, one `--<name>_column` per catalogue column, `--attribute_keys`.

    Example: `add_catalogue_arguments(parser); columns = catalogue_columns_from_args(parser.parse_args())`.
    """
    group = parser.add_argument_group("catalogue")
    group.add_argument(
        "--dataset",
        default=None,
        help="directory, data file(s) or Hub dataset name (default: the shared catalogue, else the committed sample)",
    )
    group.add_argument(
        "--split", default=None,
        help=f"default {DEFAULT_SPLIT!r}, or 'train' for a single data file (which becomes split 'train')",
    )
    group.add_argument("--max_products", type=int, default=None, help="keep only the first N products")
    add_column_arguments(group)
    group.add_argument(
        "--attribute_keys",
        nargs="*",
        default=list(CatalogueColumns.attribute_keys),
        help="keys of the attributes JSON that derived queries may use",
    )


def add_column_arguments(group) -> None:
    """One `--<name>_column` flag per `CatalogueColumns` field. An optional column left at its default name is
    dropped when the catalogue lacks it; one named by its flag must exist; `none` turns one off.

    Example: `add_column_arguments(parser)`; then `--title_column name --base_colour_column colour --brand_column none`.
    """
    for field in _COLUMN_FIELDS:
        optional = _is_optional(field)
        group.add_argument(
            f"--{field.name}_column",
            default=None,
            help=f"default {field.default!r}"
                 + ("; left out when the catalogue lacks it; 'none' turns it off" if optional else ""),
        )


def retriever_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the model and catalogue arguments, to which a command adds its own.

    Example: `parser = retriever_parser("Search a catalogue.", prog="mmretrieval search")`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_arguments(parser)
    add_catalogue_arguments(parser)
    return parser


def explicit_columns(args: argparse.Namespace) -> set[str]:
    """The `CatalogueColumns` fields whose `--<name>_column` flag was given (parsers default them to None).

    Example: `explicit_columns(parser.parse_args(["--title_column", "name"]))` gives `{"title"}`.
    """
    return {field.name for field in _COLUMN_FIELDS if getattr(args, f"{field.name}_column", None) is not None}


def catalogue_columns_from_args(args: argparse.Namespace) -> CatalogueColumns:
    """The `CatalogueColumns` named by the `--<name>_column` arguments (`none` for an absent optional column).

    Example: `catalogue_columns_from_args(parser.parse_args(["--base_colour_column", "none", ...])).base_colour`
    is None.
    """
    names = {}
    for field in _COLUMN_FIELDS:
        value = getattr(args, f"{field.name}_column", None)
        if value is None:
            value = field.default
        elif value.strip().lower() in _NONE_VALUES:
            if not _is_optional(field):
                raise CliError(f"--{field.name}_column is required and cannot be {value!r}")
            value = None
        names[field.name] = value
    keys = getattr(args, "attribute_keys", None) or CatalogueColumns.attribute_keys
    return CatalogueColumns(**names, attribute_keys=tuple(keys))


def columns_for_catalogue(
    columns: CatalogueColumns, column_names: Sequence[str], *, explicit: set[str], where: str, needs_queries: bool
) -> CatalogueColumns:
    """`columns` fitted to a catalogue: an optional column left at its default name that the catalogue lacks is
    dropped, a column named by its flag must exist, and queries must be readable or derivable when `needs_queries`.
    A catalogue without an image column is announced in one line on stderr: every product is then embedded from its
    text alone.

    Raises `CliError` whose one line names the column and its flag.

    Example:
    ```python
    >>> columns_for_catalogue(CatalogueColumns(product_id="sku", title="name"), ["sku", "name", "img"],
    ...                       explicit={"product_id", "title"}, where="split 'train'", needs_queries=False).brand
    None
    ```
    """
    present = set(column_names)
    available = f"available columns: {sorted(column_names)}"
    fitted = {}
    for field in _COLUMN_FIELDS:
        name = getattr(columns, field.name)
        if name is None or name in present:
            fitted[field.name] = name
        elif field.name in explicit or not _is_optional(field):
            raise CliError(
                f"{where} has no column {name!r} (--{field.name}_column); {available}; "
                f"pass --{field.name}_column <column>" + (" or 'none'" if _is_optional(field) else "")
            )
        else:
            fitted[field.name] = None
    fitted = dataclasses.replace(columns, **fitted)
    if columns.image is not None and fitted.image is None:
        # Printed, not logged: a run that silently ignores every image is the failure this line prevents.
        print(f"WARNING: {where} has no image column {columns.image!r} (--image_column): every product is embedded "
              "from its text alone", file=sys.stderr, flush=True)
    elif columns.image is None:
        logger.info(f"--image_column none: every product of {where} is embedded from its text alone")
    if needs_queries and fitted.query is None and fitted.article_type is None:
        raise CliError(
            f"{where} has neither a query column (--query_column) nor an article type column to derive queries from "
            f"(--article_type_column); {available}"
        )
    return fitted


def _cli_column_message(error: Exception) -> str:
    """A catalogue error in command-line terms: `CatalogueColumns.title` becomes `--title_column`."""
    text = str(error)
    text = re.sub(r"CatalogueColumns\.(\w+)", r"--\1_column", text)
    return re.sub(r"\s*Pass CatalogueColumns\(.*$", " Name the catalogue's own columns with those flags.", text)


def _loading_columns(columns: CatalogueColumns, *, image: bool = True) -> CatalogueColumns:
    """The columns `load_catalogue` checks while loading: only id, title and (unless `image` is False) the image.
    The rest (text, attributes, query) are fitted to the loaded columns by `columns_for_catalogue`, whose errors
    name the flags."""
    return CatalogueColumns(
        product_id=columns.product_id, title=columns.title, description=None, image=columns.image if image else None,
        query=None, gender=None, base_colour=None, article_type=None, usage=None, brand=None, attributes=None,
    )


def _load_splits(dataset, split: str | None, requested: CatalogueColumns, image_is_explicit: bool):
    """`{split: dataset}` with the products only (`needs_queries=False`). An image column left at its default name
    that the catalogue lacks is not an error: the catalogue is read without images (`columns_for_catalogue` then
    says so)."""
    try:
        loaded = load_catalogue(dataset, split=split, columns=_loading_columns(requested), needs_queries=False)
    except CatalogueColumnError as error:
        if requested.image is None or image_is_explicit or set(error.fields) != {"image"}:
            raise
        loaded = load_catalogue(
            dataset, split=split, columns=_loading_columns(requested, image=False), needs_queries=False
        )
        splits = {split: loaded} if split is not None else dict(loaded)
        if any(requested.image in products.column_names for products in splits.values()):
            raise error from None  # some splits have images: the one without them is the catalogue's mistake
        return splits
    return {split: loaded} if split is not None else dict(loaded)


def load_catalogue_splits_from_args(args: argparse.Namespace) -> dict:
    """`{split: dataset}` of `--dataset`: only `--split` when given, else every split; images kept encoded, ids,
    titles and images checked. Fit the other columns with `columns_for_catalogue`.

    Example: `splits = load_catalogue_splits_from_args(parser.parse_args(["--dataset", "shop.csv"]))` gives
    `{"train": Dataset(...)}`.
    """
    requested = catalogue_columns_from_args(args)
    try:
        # `train` resolves every column flag at parsing time and records which were given in `args.explicit_columns`.
        explicit = getattr(args, "explicit_columns", None)
        explicit = explicit_columns(args) if explicit is None else explicit
        return _load_splits(args.dataset, args.split, requested, "image" in explicit)
    except CatalogueColumnError as error:
        raise CliError(_cli_column_message(error)) from error
    except KeyError as error:  # a missing split: KeyError's str() quotes its message
        raise CliError(f"cannot load the catalogue: {error.args[0] if error.args else error} (--split)") from error
    except ValueError as error:
        raise CliError(f"cannot load the catalogue: {error} (--dataset)") from error
    except FileNotFoundError as error:
        raise CliError(f"cannot load the catalogue: {error} (--dataset)") from error
    except DatasetGenerationError as error:  # a file that does not parse: the parser's own message says where
        cause = f": {error.__cause__}" if error.__cause__ is not None else ""
        raise CliError(f"cannot read the catalogue {args.dataset}{cause} (--dataset)") from error


def load_catalogue_from_args(
    args: argparse.Namespace, *, needs_queries: bool, default_split: str = DEFAULT_SPLIT
):
    """`(catalogue, columns)`: the `--split` of `--dataset` (first `--max_products` rows, images kept encoded)
    and the `CatalogueColumns` of the flags fitted to it (see `columns_for_catalogue`).

    Without `--split`, `default_split` is read, or the only split of a catalogue that has one (a single data
    file is split "train"), which is announced in one line. `args.split` is set to the split read.

    Example: `catalogue, columns = load_catalogue_from_args(args, needs_queries=False)`.
    """
    splits = load_catalogue_splits_from_args(args)
    if args.split is None:
        args.split = _default_split(splits, default_split)
    catalogue = splits[args.split]
    columns = columns_for_catalogue(
        catalogue_columns_from_args(args), catalogue.column_names, explicit=explicit_columns(args),
        where=f"split {args.split!r}", needs_queries=needs_queries,
    )
    check_images_exist(columns, args, where=f"split {args.split!r}")
    if args.max_products is not None:
        if args.max_products < 1:
            raise CliError(f"--max_products must be positive, got {args.max_products}")
        catalogue = catalogue.select(range(min(args.max_products, len(catalogue))))
    logger.info(f"Catalogue: {len(catalogue)} products ({args.dataset or 'default data'}, split {args.split!r})")
    return catalogue, columns


def _default_split(splits, default_split: str) -> str:
    if default_split in splits:
        return default_split
    if len(splits) == 1:
        (only,) = splits
        # Printed, not logged: the user must see which products a command reads, whatever the logging setup.
        print(f"The catalogue has one split, {only!r} (a single data file): reading it (--split to choose)",
              file=sys.stderr)
        return only
    raise CliError(f"the catalogue has no split {default_split!r}; pass --split, one of {sorted(splits)}")


def checked_products(catalogue, columns: CatalogueColumns, args: argparse.Namespace, *, report_dir: Path | None = None,
                     published_dir: Path | None = None):
    """The catalogue after the cheap product checks (`find_bad_products`: ids, texts; no image decoded): a bad
    product is a `CliError` naming it, or with `--skip_bad_rows` it is left out and listed in
    `report_dir/bad_rows.jsonl`. `published_dir` is where that file ends up when `report_dir` is a staging folder
    (the log line names it).

    Example: `catalogue = checked_products(catalogue, columns, args, report_dir=Path(args.output_dir))`.
    """
    bad = find_bad_products(catalogue, columns)
    if not bad:
        return catalogue
    if not getattr(args, "skip_bad_rows", False):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        hint = "; fix the catalogue or pass --skip_bad_rows" if hasattr(args, "skip_bad_rows") else ""
        raise CliError(f"{bad[0].line()}{more}{hint}")
    return drop_bad_products(catalogue, bad, columns, report_dir, published_dir)


def drop_bad_products(catalogue, bad: Sequence[BadProduct], columns: CatalogueColumns, report_dir: Path | None,
                      published_dir: Path | None = None):
    """`catalogue` without the rows of the `bad` products (the later rows of a repeated id; every row of a
    product with another problem), which are listed in `report_dir/bad_rows.jsonl` and counted in one log line
    (naming `published_dir/bad_rows.jsonl` when the file is moved there later).

    Example: `drop_bad_products(catalogue, find_bad_products(catalogue, columns), columns, Path("out"))`.
    """
    bad_rows = {product.row for product in bad}
    keep = [row for row in range(len(catalogue)) if row not in bad_rows]
    where = ""
    if report_dir is not None:
        written = write_bad_rows(Path(report_dir) / BAD_ROWS_FILENAME, bad)
        where = f", listed in {Path(published_dir) / BAD_ROWS_FILENAME if published_dir is not None else written}"
    logger.warning(f"--skip_bad_rows: left out {len(catalogue) - len(keep)} bad products of {len(catalogue)}{where}")
    if not keep:
        raise CliError(f"every product is bad, so --skip_bad_rows leaves none; the first: {bad[0].line()}")
    return catalogue.select(keep)


def write_bad_rows(path: Path, bad: Sequence[BadProduct]) -> Path:
    """Writes one JSON object per bad product (`product_id`, `row`, `column`, `reason`) to `path`.

    Example: `write_bad_rows(Path("out/bad_rows.jsonl"), find_bad_products(catalogue, columns))`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A lone surrogate in an id is written escaped: the report itself must stay valid UTF-8.
    lines = (json.dumps(product.to_dict(), ensure_ascii=True, default=str) for product in bad)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def check_image_arguments(args: argparse.Namespace) -> None:
    """`--max_image_failure_share` must lie in [0, 1].

    Example: `check_image_arguments(parser.parse_args(["--max_image_failure_share", "2"]))` raises `CliError`.
    """
    share = args.max_image_failure_share
    if not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise CliError(f"--max_image_failure_share must lie in [0, 1], got {share}")


def _strict_image_flag(args: argparse.Namespace) -> str | None:
    """The flag that makes any failed image an error (`--strict_images`, `--on_image_error raise`), if given."""
    if getattr(args, "strict_images", False):
        return "--strict_images"
    if getattr(args, "on_image_error", "mask") == "raise":
        return "--on_image_error raise"
    return None


def check_images_exist(columns: CatalogueColumns, args: argparse.Namespace, *, where: str) -> None:
    """A catalogue without an image column cannot satisfy `--strict_images` or `--on_image_error raise`: refused
    before any model is loaded.

    Example: `check_images_exist(columns, parser.parse_args([..., "--strict_images"]), where="split 'train'")`
    raises `CliError` when `columns.image` is None.
    """
    flag = _strict_image_flag(args)
    if columns.image is None and flag is not None:
        raise CliError(f"{where} has no image column (--image_column), so no product has an image, and {flag} "
                       "requires every product's image")


def report_images(report: ImageReport, args: argparse.Namespace, columns: CatalogueColumns | None = None) -> None:
    """Prints the image outcome in one line (stderr) and applies `--strict_images`, `--on_image_error raise` (any
    failure is an error) and `--max_image_failure_share` (a loud warning above it). A catalogue without an image
    column (`columns.image` None; announced when it was loaded) gets its line only, not the warning again.

    Example: `report_images(image_report, args, columns)` prints "images: 970 ok, 20 missing (e.g. 'sku-7': ...),
    ...".
    """
    print(report.summary(), file=sys.stderr, flush=True)
    if columns is not None and columns.image is None:
        return
    strict = _strict_image_flag(args) is not None
    try:
        report.check(max_failure_share=args.max_image_failure_share, strict=strict)
    except ImageFailureError as error:
        flag = _strict_image_flag(args)
        raise CliError(str(error) if flag in str(error) else f"{error} ({flag})") from error


def check_text_lengths(lengths: dict[str, int | None], max_positions: int | None, tower: str) -> None:
    """Each `--max_*_length` must be positive and within the text tower's position embeddings.

    Example: `check_text_lengths({"--max_product_length": 600}, 512, "all-MiniLM-L6-v2")` raises `CliError`.
    """
    for flag, length in lengths.items():
        if length is None:
            continue
        if length < 1:
            raise CliError(f"{flag} must be positive, got {length}")
        if max_positions is not None and length > max_positions:
            raise CliError(f"{flag} {length} exceeds the {max_positions} positions of the text tower {tower}")


def text_tower_positions(name_or_path: str) -> int | None:
    """The position embeddings of a text tower or of a retriever checkpoint's text tower, read from its config
    only (no weights loaded); None when it cannot be told.

    Example: `text_tower_positions("sentence-transformers/all-MiniLM-L6-v2")` gives 512.
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return None
    text_config = getattr(config, "text_config", None) or config
    positions = getattr(text_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def check_retriever_settings(args: argparse.Namespace) -> None:
    """The model-side flags, checked before anything is loaded: `--device`, `--batch_size`.

    Example: `check_retriever_settings(parser.parse_args([..., "--device", "cuda"]))` raises `CliError` on a
    machine without CUDA.
    """
    resolve_device(args.device)
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be positive, got {args.batch_size}")


def resolve_device(name: str) -> torch.device:
    """`torch.device(name)`, where "auto" means CUDA when available, else the CPU.

    Example: `resolve_device("auto")` gives `device(type='cpu')` on a machine without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CliError(f"--device {name!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: CUDA is not available on this machine; pass --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_retriever(name_or_path: str, device: str = "auto"):
    """`(model, processor)` of a checkpoint, the model in eval mode on `device`, with the CPU speedups applied.

    A local folder is loaded by its absolute path, so the model id an index records does not depend on the
    directory the command was started from.

    Example: `model, processor = load_retriever("outputs/run/final", device="cpu")`.
    """
    try:
        return load_checkpoint_retriever(name_or_path, resolve_device(device))
    except OSError as error:
        raise CliError(f"cannot load a retriever from {str(name_or_path)!r}: {error}") from error

