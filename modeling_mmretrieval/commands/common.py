"""What the `mmretrieval` commands share: the model and catalogue arguments, loading a retriever, `CliError`.

Example:

```python
>>> parser = retriever_parser("Search a catalogue.")
>>> args = parser.parse_args(["--model_name_or_path", "outputs/run/final", "--split", "test"])
>>> columns = catalogue_columns_from_args(args)
>>> catalogue = load_catalogue_from_args(args, columns)
>>> model, processor = load_retriever(args.model_name_or_path, args.device)
```
"""

import argparse
import dataclasses
import logging
import typing
from pathlib import Path

import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.data import CatalogueColumns, load_catalogue

logger = logging.getLogger(__name__)

# Columns a catalogue may lack entirely: `--<name>_column none` turns them off.
_NONE_VALUES = ("", "none", "null")
_COLUMN_FIELDS = tuple(
    field for field in dataclasses.fields(CatalogueColumns) if field.name not in ("query", "attribute_keys")
)


def _is_optional(field: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(field.type)


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status 2, no traceback.

    Example:

    ```python
    >>> raise CliError("--max_products must be positive, got 0")
    ```
    """


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model_name_or_path`, `--device` and `--batch_size`.

    Example: `add_model_arguments(parser); load_retriever(parser.parse_args().model_name_or_path)`.
    """
    parser.add_argument(
        "--model_name_or_path", required=True, help="checkpoint folder or Hub id (model and processor)"
    )
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--batch_size", type=int, default=64, help="products encoded per batch")


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


def retriever_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A parser with the model and catalogue arguments, to which a command adds its own.

    Example: `parser = retriever_parser("Search a catalogue.", prog="mmretrieval search")`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_model_arguments(parser)
    add_catalogue_arguments(parser)
    return parser


def catalogue_columns_from_args(args: argparse.Namespace) -> CatalogueColumns:
    """The `CatalogueColumns` named by the `--<name>_column` arguments (`none` for an absent optional column).

    Example: `catalogue_columns_from_args(parser.parse_args(["--colour_column", "none", ...])).colour is None`.
    """
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
    """The `--split` of `--dataset` (first `--max_products` rows), images kept encoded.

    Example: `catalogue = load_catalogue_from_args(args, catalogue_columns_from_args(args))`.
    """
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
    """`torch.device(name)`, where "auto" means CUDA when available, else the CPU.

    Example: `resolve_device("auto")` gives `device(type='cpu')` on a machine without a GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_retriever(name_or_path: str, device: str = "auto"):
    """`(model, processor)` of a checkpoint, the model in eval mode on `device`, with the CPU speedups applied.

    A local folder is loaded by its absolute path, so the model id an index records does not depend on the
    directory the command was started from.

    Example: `model, processor = load_retriever("outputs/run/final", device="cpu")`.
    """
    if Path(name_or_path).is_dir():
        name_or_path = str(Path(name_or_path).resolve())
    try:
        model = MultimodalRetrievalModel.from_pretrained(name_or_path)
        processor = MultimodalRetrievalProcessor.from_pretrained(name_or_path)
    except OSError as error:
        raise CliError(f"cannot load a retriever from {name_or_path!r}: {error}") from error
    model = model.to(resolve_device(device)).eval()
    speedups.apply(model, processor)
    return model, processor

