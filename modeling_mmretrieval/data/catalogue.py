"""Product catalogue: its columns, loading with split discovery, and reading its products' values.

`load_catalogue` reads a local directory, data files or a Hub dataset into a `DatasetDict` whose splits are
checked against `CatalogueColumns`: an id and a title always, queries (a query column, or the attributes to derive
them from) only when asked (`needs_queries`), an image column unless `CatalogueColumns.image` is `None` (a
catalogue without images: every product is then embedded from its text alone). Images stay encoded
(`datasets.Image(decode=False)`, rows carry `{"bytes", "path"}`) until a batch needs them; relative image paths of
local data files are made absolute against the folder of their data file (`resolve_image_paths`), so a run works
from any working directory; `modeling_mmretrieval.data.images.load_product_image` then decodes them one by one.
Queries derived from the products live in `queries`, relevance and hard negatives in `relevance`.
See docs/data.md.
"""

import glob
import json
import math
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from .images import is_image_url

SAMPLE_DATA_DIR = Path(__file__).resolve().parent / "sample"
DATA_DIR_ENV = "MMRETRIEVAL_DATA_DIR"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SHARED_DATA_RELATIVE = Path("..", "shared", "data", "fashion-products")
_BUILDERS_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
_SPLIT_NAME_SEPARATORS = re.compile(r"[-_.]")
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test", "eval")  # also the order splits are listed in
# CatalogueColumns fields every split must have when they are set, and those needed only when queries must be
# derived.
_ALWAYS_NEEDED_FIELDS = ("product_id", "title", "description", "image")
_QUERY_DERIVATION_FIELDS = ("article_type", "gender", "base_colour", "usage", "brand", "attributes")

# Value types an image column may hold: paths and URLs, or encoded bytes.
_IMAGE_VALUE_DTYPES = ("string", "large_string", "binary", "large_binary")

# Catalogue placeholders that carry no information and must never become a query constraint.
_MISSING_VALUES = frozenset({"", "na", "n/a", "none", "null", "nan", "other", "others", "unknown", "-"})


@dataclass(frozen=True)
class CatalogueColumns:
    """Names of the catalogue columns the data modules read; defaults match the fashion-products catalogue.

    Set an optional column to `None` when a catalogue lacks it; `image=None` is a catalogue without images, whose
    products are all embedded from their text alone. `attributes` holds a JSON object (or a mapping)
    of free-form product attributes; `attribute_keys` are the keys of it that queries may use, in the order they
    are placed before the product noun (`usage` comes last, right before the noun: "striped slim fit casual
    shirt"). `query` is only read when a catalogue already has queries.

    Example:
    ```python
    >>> columns = CatalogueColumns(product_id="sku", brand=None, attribute_keys=("Pattern",))
    >>> columns.facet_columns
    ('article_type', 'gender', 'base_colour', 'usage')
    ```
    """

    product_id: str = "product_id"
    title: str = "title"
    description: str | None = "description"
    image: str | None = "image"
    query: str | None = "query"
    gender: str | None = "gender"
    base_colour: str | None = "base_colour"
    article_type: str | None = "article_type"
    usage: str | None = "usage"
    brand: str | None = "brand"
    attributes: str | None = "attributes"
    attribute_keys: tuple[str, ...] = ("Pattern", "Sleeve Length", "Fit", "Neck", "Fabric", "Sport")

    @property
    def facet_columns(self) -> tuple[str, ...]:
        """The top-level columns that queries can constrain (article type first)."""
        names = (self.article_type, self.gender, self.base_colour, self.usage, self.brand)
        return tuple(name for name in names if name is not None)

    @property
    def record_columns(self) -> tuple[str, ...]:
        """The columns query derivation, relevance and hard negatives read (never the image)."""
        names = (self.product_id, self.title, *self.facet_columns, self.attributes)
        return tuple(dict.fromkeys(name for name in names if name is not None))


class CatalogueColumnError(KeyError):
    """A configured catalogue column is missing from the data (a `KeyError` whose message reads as prose).

    Example:
    ```python
    >>> try:
    ...     load_catalogue(columns=CatalogueColumns(title="name"))
    ... except CatalogueColumnError as error:
    ...     print(str(error).split(";")[0])
    split 'train' has no column 'name' (CatalogueColumns.title)
    ```
    """

    def __init__(self, message: str, fields: tuple[str, ...] = ()):
        super().__init__(message)
        self.fields = tuple(fields)  # the `CatalogueColumns` fields whose columns are missing

    def __reduce__(self):
        # Keeps the error picklable (multiprocessing) despite the keyword argument.
        return type(self), (str(self), self.fields)

    def __str__(self) -> str:
        # KeyError.__str__ shows the repr of its argument, which would wrap this multi-part message in quotes.
        return str(self.args[0])


# --------------------------------------------------------------------------------------------------------------
# Reading products: values, records, per-product randomness
# --------------------------------------------------------------------------------------------------------------


def normalise_value(value: Any) -> str:
    """Case- and whitespace-insensitive form of an attribute value, used for every comparison.

    Example:
    ```python
    >>> normalise_value("  Navy   BLUE ")
    'navy blue'
    ```
    """
    return " ".join(str(value).split()).casefold()


def known_value(value: Any) -> str | None:
    """The whitespace-folded value, or `None` for missing placeholders ("", "NA", "Other", NaN, None).

    Example:
    ```python
    >>> known_value("  Navy   Blue "), known_value("NA"), known_value(float("nan"))
    ('Navy Blue', None, None)
    ```
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).split())
    return None if text.casefold() in _MISSING_VALUES else text


def parse_attributes(raw: Any) -> dict[str, str]:
    """The free-form attributes of a product as a `{key: value}` dict; invalid or missing JSON gives `{}`.

    Example:
    ```python
    >>> parse_attributes('{"Fit": "Slim Fit", "Neck": null}'), parse_attributes("not json")
    ({'Fit': 'Slim Fit'}, {})
    ```
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return {}
    if not isinstance(raw, Mapping):
        return {}
    return {str(key): str(value) for key, value in raw.items() if value is not None}


def product_records(dataset: datasets.Dataset | Sequence[Mapping], columns: CatalogueColumns) -> list[dict]:
    """The text columns of every product (never the images), with string product ids, checked unique.

    Raises:
        ValueError: two products share an id.

    Example:
    ```python
    >>> product_records([{"product_id": 7, "title": "Blue Shirt"}], CatalogueColumns())
    [{'product_id': '7', 'title': 'Blue Shirt'}]
    ```
    """
    if isinstance(dataset, datasets.Dataset):
        present = [name for name in columns.record_columns if name in dataset.column_names]
        records = dataset.select_columns(present).to_list()
    else:
        records = [dict(product) for product in dataset]
    for record in records:
        record[columns.product_id] = str(record[columns.product_id])
    duplicates = [pid for pid, count in Counter(r[columns.product_id] for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"product ids must be unique; repeated: {sorted(duplicates)[:10]}")
    return records


def product_rng(seed: int, product_id: str, purpose: str) -> random.Random:
    """The random generator of one product for one `purpose` ("train0", "evaluation", "hard-negatives").

    Query derivation and hard-negative sampling draw from it, so a product's queries and negatives depend only on
    the seed and the product, not on which other products are in the dataset or in what order.

    Example:
    ```python
    >>> product_rng(0, "15970", "evaluation").random() == product_rng(0, "15970", "evaluation").random()
    True
    ```
    """
    # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and Python runs.
    return random.Random(f"{seed}:{purpose}:{product_id}")


def with_lazy_images(dataset: datasets.Dataset, columns: CatalogueColumns | None = None) -> datasets.Dataset:
    """`dataset` with its image column as `datasets.Image(decode=False)`: rows carry `{"bytes", "path"}`.

    Accepts an image column that is a decoding `Image` feature, file paths (strings) or raw bytes. A catalogue
    without images (`columns.image` is `None`) is returned as is.

    Example:
    ```python
    >>> products = datasets.Dataset.from_dict({"image": ["photos/15970.jpg"]})
    >>> with_lazy_images(products)[0]["image"]
    {'bytes': None, 'path': 'photos/15970.jpg'}
    ```
    """
    columns = columns or CatalogueColumns()
    if columns.image is None:
        return dataset
    if columns.image not in dataset.column_names:
        raise CatalogueColumnError(
            f"no image column {columns.image!r} (CatalogueColumns.image); available columns: {dataset.column_names}",
            fields=("image",),
        )
    feature = dataset.features[columns.image]
    if isinstance(feature, datasets.Image) and not feature.decode:
        return dataset
    if isinstance(feature, datasets.Value) and feature.dtype not in _IMAGE_VALUE_DTYPES:
        # A column with no image at all is read from CSV as empty numbers; Arrow cannot cast those to images.
        if dataset.data.column(columns.image).null_count < dataset.data.num_rows:
            raise ValueError(
                f"image column {columns.image!r} (CatalogueColumns.image) holds {feature.dtype} values, not image "
                "paths, URLs or bytes"
            )
        dataset = dataset.cast_column(columns.image, datasets.Value("string"))
    return dataset.cast_column(columns.image, datasets.Image(decode=False))


def _is_relative_image_path(path: Any) -> bool:
    return (
        isinstance(path, str) and bool(path.strip()) and not is_image_url(path)
        and not os.path.isabs(os.path.expanduser(path))
    )


def _file_paths_of(dataset: datasets.Dataset, image: str) -> list:
    """The `path` of every lazy image without embedded bytes (read with Arrow: embedded bytes are never copied)."""
    if dataset._indices is not None:  # a selection: read the column through the indices
        return [value["path"] for value in dataset[image] if value and value.get("bytes") is None]
    column = dataset.data.column(image)
    paths = []
    for chunk in column.chunks:
        if not pa.types.is_struct(chunk.type):
            return []
        without_bytes = pc.is_null(pc.struct_field(chunk, "bytes"))
        paths.extend(pc.filter(pc.struct_field(chunk, "path"), without_bytes).to_pylist())
    return paths


def resolve_image_paths(
    dataset: datasets.Dataset, base_dir: str | os.PathLike, columns: CatalogueColumns | None = None
) -> datasets.Dataset:
    """`dataset` with its relative image paths made absolute against `base_dir` (the folder of its data file).

    Only lazy images without embedded bytes are touched; URLs and absolute paths are kept. A catalogue whose
    images are all embedded or absolute is returned as is, without a pass over its rows.

    Example:
    ```python
    >>> products = with_lazy_images(datasets.Dataset.from_dict({"image": ["img/7.jpg", None]}))
    >>> resolve_image_paths(products, "/data/shop")["image"]
    [{'bytes': None, 'path': '/data/shop/img/7.jpg'}, None]
    ```
    """
    columns = columns or CatalogueColumns()
    image = columns.image
    if image is None or image not in dataset.column_names:
        return dataset
    dataset = with_lazy_images(dataset, columns)
    if not any(_is_relative_image_path(path) for path in _file_paths_of(dataset, image)):
        return dataset
    base = Path(base_dir).expanduser().resolve()

    def absolute(value):
        if isinstance(value, Mapping) and value.get("bytes") is None and _is_relative_image_path(value.get("path")):
            return {**value, "path": str(base / value["path"].strip())}
        return value

    return dataset.map(
        lambda batch: {image: [absolute(value) for value in batch[image]]}, batched=True, features=dataset.features,
        desc="Resolving relative image paths",
    )


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """Where `load_catalogue()` reads from without a `source`.

    In order: the directory in the `MMRETRIEVAL_DATA_DIR` environment variable; `../shared/data/fashion-products`
    next to the working directory or to this repository, if it holds parquet files; else the committed sample
    (`SAMPLE_DATA_DIR`).

    Example:
    ```python
    >>> default_data_dir()  # the shared catalogue here; without it, SAMPLE_DATA_DIR
    PosixPath('/work/shared/data/fashion-products')
    ```
    """
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not _data_files_in(path):
            raise FileNotFoundError(f"{DATA_DIR_ENV}={configured!r} is not a directory of .parquet/.json/.csv files")
        return path
    for base in dict.fromkeys((Path.cwd(), _REPO_ROOT)):
        candidate = base / _SHARED_DATA_RELATIVE
        if any(candidate.glob("*.parquet")):
            return candidate.resolve()
    return SAMPLE_DATA_DIR


def _data_files_in(directory: Path) -> list[Path]:
    """The data files of one kind (parquet first, then json, then csv) directly inside `directory`."""
    if not directory.is_dir():
        return []
    files = sorted(path for path in directory.iterdir() if path.suffix.lower() in _BUILDERS_BY_SUFFIX)
    for builder in dict.fromkeys(_BUILDERS_BY_SUFFIX.values()):
        of_kind = [path for path in files if _BUILDERS_BY_SUFFIX[path.suffix.lower()] == builder]
        if of_kind:
            return of_kind
    return []


def _local_paths(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path] | None:
    """The local data files `source` names (directory, file, glob or list), or `None` for a Hub dataset name."""
    if isinstance(source, (list, tuple)):
        return [Path(item) for item in source]
    text = os.fspath(source)
    if any(character in text for character in "*?["):
        return sorted(Path(match) for match in glob.glob(text))
    path = Path(text).expanduser()
    if path.is_dir():
        return _data_files_in(path)
    if path.exists() or path.suffix.lower() in _BUILDERS_BY_SUFFIX or text.startswith((".", "/", "~")):
        return [path]
    return None


def _split_files(paths: Sequence[Path], source: Any) -> tuple[str, dict[str, list[str]]]:
    """(builder, {split: files}): splits come from file names like `train.parquet` / `test-00001.parquet`, else
    every file is "train"."""
    if not paths:
        raise FileNotFoundError(f"no .parquet/.json/.jsonl/.csv files found at {source!r}")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"catalogue file(s) not found: {missing}")
    builders = {_BUILDERS_BY_SUFFIX.get(path.suffix.lower()) for path in paths}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"cannot read {[str(path) for path in paths]}: give files of one kind (.parquet, .json/.jsonl or .csv)"
        )
    prefixes = [_SPLIT_NAME_SEPARATORS.split(path.name, maxsplit=1)[0].lower() for path in paths]
    if not set(prefixes) <= set(_SPLIT_NAMES):
        return builders.pop(), {"train": [str(path) for path in paths]}
    by_split: dict[str, list[str]] = defaultdict(list)
    for prefix, path in zip(prefixes, paths, strict=True):
        by_split[prefix].append(str(path))
    return builders.pop(), {name: by_split[name] for name in _SPLIT_NAMES if name in by_split}


def _local_files_by_split(data_files: Any) -> dict[str, list[Path]] | None:
    """`{split: files}` when every data file is a local file, else `None` (Hub files, remote URLs)."""
    if isinstance(data_files, Mapping):
        groups = dict(data_files)
    else:
        groups = {"train": data_files}
    by_split = {
        split: [Path(name) for name in ([group] if isinstance(group, (str, os.PathLike)) else group)]
        for split, group in groups.items()
    }
    if not all(path.is_file() for paths in by_split.values() for path in paths):
        return None
    return by_split


def _load_split_by_folder(builder: str, files: Sequence[Path], columns: CatalogueColumns, where: str,
                          cache_dir, needs_queries: bool) -> datasets.Dataset:
    """One split whose files lie in several folders: each file is read alone, so its relative image paths resolve
    against its own folder, then the files are concatenated in order."""
    parts = []
    for path in files:
        part = datasets.load_dataset(builder, data_files={"train": [str(path)]}, split="train", cache_dir=cache_dir)
        parts.append(
            _prepare_split(part, columns, f"{where} (file {str(path)!r})", path.resolve().parent, needs_queries)
        )
    return datasets.concatenate_datasets(parts)


def _builder_for(data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> str:
    groups = data_files.values() if isinstance(data_files, Mapping) else [data_files]
    files = [name for group in groups for name in ([group] if isinstance(group, str) else group)]
    builders = {_BUILDERS_BY_SUFFIX.get(Path(name).suffix.lower()) for name in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"cannot tell how to read {files}; pass source='parquet', 'csv' or 'json' with data_files")
    return builders.pop()


def _check_columns(column_names: Sequence[str], columns: CatalogueColumns, where: str, needs_queries: bool) -> None:
    needed = list(_ALWAYS_NEEDED_FIELDS)
    if needs_queries and (columns.query is None or columns.query not in column_names):
        if columns.article_type is None:
            raise ValueError(
                f"{where} has no query column and CatalogueColumns.article_type is None: "
                "queries can neither be read nor derived (or pass needs_queries=False to read the products only)"
            )
        needed += _QUERY_DERIVATION_FIELDS
    missing = {name: getattr(columns, name) for name in needed if getattr(columns, name) not in (None, *column_names)}
    if missing:
        listed = ", ".join(f"{column!r} (CatalogueColumns.{name})" for name, column in missing.items())
        raise CatalogueColumnError(
            f"{where} has no column {listed}; available columns: {sorted(column_names)}. Pass CatalogueColumns(...) "
            "naming the catalogue's own columns, or None for an optional column it lacks.",
            fields=tuple(missing),
        )


def _prepare_split(
    dataset: datasets.Dataset, columns: CatalogueColumns, where: str, image_base_dir: Path | None = None,
    needs_queries: bool = True,
) -> datasets.Dataset:
    _check_columns(dataset.column_names, columns, where, needs_queries)
    dataset = with_lazy_images(dataset, columns)
    if image_base_dir is not None:
        dataset = resolve_image_paths(dataset, image_base_dir, columns)
    if dataset.features[columns.product_id] != datasets.Value("string"):
        dataset = dataset.cast_column(columns.product_id, datasets.Value("string"))
    return dataset


def _splits_disagree(error: Exception) -> bool:
    """Whether a `datasets` generation error comes from a data file whose columns differ from the first file's
    (`datasets` says so with its own error type or through the cast error behind it, depending on the format)."""
    if isinstance(error, datasets.exceptions.DatasetGenerationCastError):
        return True
    cause = error.__cause__ or error.__context__
    return isinstance(cause, datasets.table.CastError) and "column names don't match" in str(cause)


def load_catalogue(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    split: str | None = None,
    columns: CatalogueColumns | None = None,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    cache_dir: str | os.PathLike | None = None,
    needs_queries: bool = True,
) -> datasets.DatasetDict | datasets.Dataset:
    """Load a product catalogue as a `DatasetDict` (or the `split` asked for), images kept encoded.

    Args:
        source: a local directory (its `train`/`validation`/`test` files become splits), data file(s) or a glob,
            or a Hugging Face Hub dataset name; with `data_files`, the `datasets` builder ("parquet", "csv",
            "json") or Hub name. `None` reads `default_data_dir()`: the shared fashion catalogue when present,
            else the committed sample.
        split: return only this split (for local files, and for a `data_files` mapping, only its files are read;
            a split name the mapping lacks is a `KeyError`).
        columns: the catalogue's column names; validated on every split. Every column it names must exist; set
            an optional one to `None` when the catalogue lacks it (`image=None`: a catalogue without images).
        data_files: passed to `datasets.load_dataset` (a mapping cut to `split` when one is asked for).
        cache_dir: the `datasets` cache directory.
        needs_queries: whether queries must be readable (a `columns.query` column) or derivable (an article type
            column and the other attribute columns named in `columns`). `False` reads the products only, as
            indexing, searching or evaluating with a queries file do: the query and attribute columns are then
            used where present and not required.

    Relative image paths in local data files are resolved against the folder of the file that holds them.

    Raises:
        CatalogueColumnError: (a `KeyError`) a configured column is missing; the message lists the available ones
            and `error.fields` names the `CatalogueColumns` fields that are missing.
        ValueError: `needs_queries` and a split has neither a query column nor `columns.article_type`.
        FileNotFoundError: a local source does not exist or holds no data files.

    Example:
    ```python
    >>> catalogue = load_catalogue()  # ../shared/data/fashion-products, else the committed sample
    >>> sorted(catalogue)
    ['test', 'train', 'validation']
    >>> catalogue["train"][0]["image"].keys()  # encoded: decode per batch with load_product_image
    dict_keys(['bytes', 'path'])
    >>> shop = load_catalogue("shop.csv", columns=CatalogueColumns(product_id="sku", title="name", description=None,
    ...                       image=None, article_type=None), needs_queries=False)  # no images, no attributes
    >>> sorted(shop), shop["train"].column_names
    (['train'], ['sku', 'name'])
    ```
    """
    columns = columns or CatalogueColumns()
    if data_files is None:
        source = default_data_dir() if source is None else source
        local_paths = _local_paths(source)
        if local_paths is not None:
            builder, split_files = _split_files(local_paths, source)
            if split is not None:
                if split not in split_files:
                    raise KeyError(f"no {split!r} split in {source!r}; splits found: {sorted(split_files)}")
                split_files = {split: split_files[split]}
            source, data_files = builder, split_files
    elif source is None:
        source = _builder_for(data_files)
    if split is not None and isinstance(data_files, Mapping):  # read only that split's files, whatever the others hold
        if split not in data_files:
            raise KeyError(f"no {split!r} split in data_files; splits given: {sorted(data_files)}")
        data_files = {split: data_files[split]}
    # Relative image paths in local data files are relative to the file's folder, not the working directory.
    local_files = _local_files_by_split(data_files) if data_files is not None else None
    folders = {name: {path.resolve().parent for path in paths} for name, paths in (local_files or {}).items()}
    if split is None and any(len(parents) > 1 for parents in folders.values()):
        return datasets.DatasetDict({
            name: _load_split_by_folder(
                os.fspath(source), local_files[name], columns, f"split {name!r}", cache_dir, needs_queries
            )
            for name in local_files
        })
    if split is not None and len(folders.get(split, ())) > 1:
        return _load_split_by_folder(
            os.fspath(source), local_files[split], columns, f"split {split!r}", cache_dir, needs_queries
        )

    def base_dir(name: str) -> Path | None:
        return next(iter(folders[name])) if len(folders.get(name, ())) == 1 else None

    try:
        loaded = datasets.load_dataset(os.fspath(source), data_files=data_files, split=split, cache_dir=cache_dir)
    except datasets.exceptions.DatasetGenerationError as error:
        if split is not None or not isinstance(data_files, Mapping) or not _splits_disagree(error):
            raise
        # One `load_dataset` call gives every split the first one's columns; splits whose columns differ are read
        # one by one instead, so that the column checks below name the split that lacks a column.
        loaded = datasets.DatasetDict({
            name: datasets.load_dataset(os.fspath(source), data_files={name: files}, split=name, cache_dir=cache_dir)
            for name, files in data_files.items()
        })
    if isinstance(loaded, datasets.Dataset):
        return _prepare_split(loaded, columns, f"split {split!r}", base_dir(split), needs_queries)
    # Listed train, validation, test whatever order the `datasets` cache recorded them in.
    names = sorted(loaded, key=lambda name: _SPLIT_NAMES.index(name) if name in _SPLIT_NAMES else len(_SPLIT_NAMES))
    return datasets.DatasetDict(
        {name: _prepare_split(loaded[name], columns, f"split {name!r}", base_dir(name), needs_queries)
         for name in names}
    )
