"""Metadata filters and facet counts over the products of a `ProductIndex`.

A shopper narrows a search by gender, article type, colour, brand or price; a merchandiser wants to see how
many results each value holds. Both read catalogue columns in the index's row order, which `ProductTable`
holds. A `ProductFilter` turns into a boolean mask over those rows (`ProductTable.allowed`), and
`ProductIndex.search(..., allowed=mask)` applies it *inside* the search: the k results come back after
filtering, never k results filtered down to fewer.

Matching rules:

- `values`: a product matches a column when its value equals one of the listed values, compared
  case- and whitespace-insensitively (`data.catalogue.normalise_value`). Several values of one column are
  alternatives (OR); several columns must all match (AND). A product with no value never matches.
- `ranges`: a product matches when its value reads as a number within `[minimum, maximum]` (either bound may
  be open); a missing or non-numeric value does not match.

Example:
```python
>>> table = ProductTable(["1", "2", "3"], {"gender": ["Women", "Men", "women"], "price": [900, 2500, None]})
>>> product_filter = ProductFilter.from_arguments(["gender=Women"], min_price=500, max_price=2000)
>>> table.allowed(product_filter).tolist()
[True, False, False]
>>> facet_counts(table, ["gender"])
{'gender': {'Women': 2, 'Men': 1}}
```
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.catalogue import CatalogueColumns, normalise_value

DEFAULT_PRICE_COLUMN = "price"
# Aliases a filter may use for the catalogue's colour column.
_COLOUR_ALIASES = ("colour", "color")


class FilterError(ValueError):
    """A filter that cannot be applied: malformed, or naming a column the catalogue lacks (one line)."""


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _as_number(value: Any) -> float | None:
    if _is_missing(value) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def parse_filter(text: str) -> tuple[str, str]:
    """`(column, value)` of a `column=value` filter argument; `FilterError` when it is not one.

    Example:
    ```python
    >>> parse_filter("article_type = Tshirts")
    ('article_type', 'Tshirts')
    ```
    """
    column, separator, value = str(text).partition("=")
    column, value = column.strip(), value.strip()
    if not separator or not column or not value:
        raise FilterError(f"--filter {text!r} must read COLUMN=VALUE, e.g. --filter gender=Women")
    return column, value


@dataclass(frozen=True)
class ProductFilter:
    """Which products a search may return: allowed values per column, numeric ranges per column.

    `values` maps a column to the values it may hold (any of them); `ranges` maps a column to
    `(minimum, maximum)`, either None for an open bound. Column names are resolved against a catalogue by
    `ProductFilter.resolved` (a `CatalogueColumns` field name such as `article_type` becomes the catalogue's
    own column).

    Example:
    ```python
    >>> ProductFilter(values={"brand": ("Nike", "Puma")}, ranges={"price": (None, 1500)}).describe()
    'brand=Nike|Puma, price <= 1500'
    ```
    """

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float | None, float | None]] = field(default_factory=dict)

    @classmethod
    def from_arguments(
        cls,
        filters: Iterable[str] = (),
        *,
        min_price: float | None = None,
        max_price: float | None = None,
        price_column: str = DEFAULT_PRICE_COLUMN,
    ) -> ProductFilter:
        """The filter of the command line's `--filter COLUMN=VALUE` (repeatable; a repeated column lists
        alternatives), `--min_price` and `--max_price`.

        Example:
        ```python
        >>> ProductFilter.from_arguments(["gender=Women", "base_colour=Red", "base_colour=Pink"]).values
        {'gender': ('Women',), 'base_colour': ('Red', 'Pink')}
        ```
        """
        values: dict[str, tuple[str, ...]] = {}
        for text in filters:
            column, value = parse_filter(text)
            values[column] = (*values.get(column, ()), value)
        ranges = {}
        if min_price is not None or max_price is not None:
            for name, bound in (("--min_price", min_price), ("--max_price", max_price)):
                if bound is not None and not math.isfinite(bound):
                    raise FilterError(f"{name} must be a finite number, got {bound}")
            if min_price is not None and max_price is not None and min_price > max_price:
                raise FilterError(f"--min_price {min_price:g} is above --max_price {max_price:g}")
            ranges[price_column] = (min_price, max_price)
        return cls(values=values, ranges=ranges)

    def __bool__(self) -> bool:
        return bool(self.values or self.ranges)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the filter reads, values first."""
        return tuple(dict.fromkeys([*self.values, *self.ranges]))

    def resolved(self, columns: CatalogueColumns | None, column_names: Sequence[str]) -> ProductFilter:
        """This filter with each column named as the catalogue names it: a `CatalogueColumns` field name
        (`gender`, `article_type`, `base_colour` or `colour`, `brand`, ...) becomes the mapped column, any
        other name must be a column of the catalogue. `FilterError` names a column it cannot find.

        Example:
        ```python
        >>> ProductFilter(values={"colour": ("Red",)}).resolved(CatalogueColumns(base_colour="color"), ["color"]).values
        {'color': ('Red',)}
        ```
        """
        range_flag = "--min_price/--max_price with --price_column"
        return ProductFilter(
            values={resolve_filter_column(name, columns, column_names): v for name, v in self.values.items()},
            ranges={resolve_filter_column(name, columns, column_names, flag=range_flag): r
                    for name, r in self.ranges.items()},
        )

    def describe(self) -> str:
        """One line naming every condition, e.g. for a results header."""
        parts = [f"{column}={'|'.join(values)}" for column, values in self.values.items()]
        for column, (minimum, maximum) in self.ranges.items():
            low = "" if minimum is None else f"{minimum:g} <= "
            parts.append(low + column + ("" if maximum is None else f" <= {maximum:g}"))
        return ", ".join(parts)


def resolve_filter_column(
    name: str, columns: CatalogueColumns | None, column_names: Sequence[str], *, flag: str | None = None
) -> str:
    """The catalogue column a filter's `name` refers to (see `ProductFilter.resolved`); `flag` names the
    command-line flag that set it in the error (default `--filter NAME=...`).

    Example:
    ```python
    >>> resolve_filter_column("article_type", CatalogueColumns(article_type="category"), ["category", "price"])
    'category'
    ```
    """
    columns = columns or CatalogueColumns()
    field_name = "base_colour" if name in _COLOUR_ALIASES else name
    mapped = getattr(columns, field_name, None) if field_name != "attribute_keys" else None
    if isinstance(mapped, str) and mapped in column_names:
        return mapped
    if name in column_names:
        return name
    raise FilterError(
        f"cannot filter on {name!r} ({flag or f'--filter {name}=...'}): the catalogue has no such column; "
        f"its columns are {sorted(column_names)}"
    )


class ProductTable:
    """Catalogue columns in a `ProductIndex`'s row order: what filters, facets and the lexical ranker read.

    Build it with `ProductTable.from_catalogue(catalogue, index.ids, ...)`, which matches catalogue rows to
    index rows by product id (the catalogue may hold more products than the index, in any order).

    Example:
    ```python
    >>> catalogue = [{"product_id": 7, "gender": "Men"}, {"product_id": 3, "gender": "Women"}]
    >>> ProductTable.from_catalogue(catalogue, ["3", "7"], names=["gender"]).column("gender")
    ['Women', 'Men']
    ```
    """

    def __init__(self, ids: Sequence, values: Mapping[str, Sequence[Any]]):
        self.ids = [str(product_id) for product_id in ids]
        self._values = {name: list(column) for name, column in values.items()}
        for name, column in self._values.items():
            if len(column) != len(self.ids):
                raise ValueError(f"column {name!r} has {len(column)} values for {len(self.ids)} products")

    @classmethod
    def from_catalogue(
        cls,
        catalogue,
        ids: Sequence,
        *,
        names: Sequence[str],
        id_column: str = "product_id",
    ) -> ProductTable:
        """The `names` columns of `catalogue` (a `datasets.Dataset` or a sequence of row dicts) for the
        products `ids` (e.g. `index.ids`), in that order. `ValueError` names a product id the catalogue lacks
        and a column it lacks.
        """
        names = list(dict.fromkeys(names))
        if hasattr(catalogue, "column_names"):  # a datasets.Dataset: read whole columns, never the images
            missing = [name for name in [id_column, *names] if name not in catalogue.column_names]
            if missing:
                raise ValueError(
                    f"the catalogue has no column {missing[0]!r}; its columns are {catalogue.column_names}"
                )
            catalogue_ids = catalogue[id_column]
            columns = {name: catalogue[name] for name in names}
        else:
            rows = list(catalogue)
            for number, row in enumerate(rows):
                if id_column not in row:
                    raise ValueError(f"catalogue row {number} has no {id_column!r} column")
            catalogue_ids = [row[id_column] for row in rows]
            columns = {name: [row.get(name) for row in rows] for name in names}
        row_of = {str(product_id): row for row, product_id in enumerate(catalogue_ids)}
        rows_in_order = []
        for product_id in ids:
            row = row_of.get(str(product_id))
            if row is None:
                raise ValueError(
                    f"the index holds product id {str(product_id)!r} that the catalogue lacks: index and catalogue "
                    "do not match (rebuild the index from this catalogue)"
                )
            rows_in_order.append(row)
        return cls(ids, {name: [column[row] for row in rows_in_order] for name, column in columns.items()})

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._values)

    def column(self, name: str) -> list:
        """The values of column `name`, one per product in index row order."""
        if name not in self._values:
            raise FilterError(f"no column {name!r} was read for filtering; read: {sorted(self._values)}")
        return self._values[name]

    def records(self, names: Sequence[str] | None = None) -> list[dict]:
        """One `{column: value}` dict per product in index row order (e.g. for `LexicalIndex.from_products`).

        Example:
        ```python
        >>> ProductTable(["a"], {"title": ["Red Shirt"], "brand": ["Nike"]}).records(["title"])
        [{'title': 'Red Shirt'}]
        ```
        """
        names = self.names if names is None else names
        columns = [self.column(name) for name in names]
        return [dict(zip(names, values, strict=True)) for values in zip(*columns, strict=True)] if columns else [
            {} for _ in self.ids
        ]

    def allowed(self, product_filter: ProductFilter) -> np.ndarray:
        """The boolean mask of the products `product_filter` lets through, for `ProductIndex.search(allowed=)`.

        Example:
        ```python
        >>> ProductTable(["a", "b"], {"brand": ["Nike", "Puma"]}).allowed(ProductFilter({"brand": ("nike",)})).tolist()
        [True, False]
        ```
        """
        mask = np.ones(len(self), dtype=bool)
        for name, values in product_filter.values.items():
            wanted = {normalise_value(value) for value in values}
            mask &= np.fromiter(
                (not _is_missing(value) and normalise_value(value) in wanted for value in self.column(name)),
                dtype=bool, count=len(self),
            )
        for name, (minimum, maximum) in product_filter.ranges.items():
            numbers = np.array([_as_number(value) for value in self.column(name)], dtype=np.float64)  # None -> nan
            with np.errstate(invalid="ignore"):
                inside = np.isfinite(numbers)
                if minimum is not None:
                    inside &= numbers >= minimum
                if maximum is not None:
                    inside &= numbers <= maximum
            mask &= inside
        return mask


def facet_counts(
    table: ProductTable,
    names: Sequence[str],
    *,
    allowed: np.ndarray | None = None,
    positions: Iterable[int] | None = None,
    limit: int | None = None,
) -> dict[str, dict[str, int]]:
    """`{column: {value: count}}` over the products of `table`: all of them, those `allowed` marks (e.g. a
    filter's mask: what each value would hold within the current filter), or the rows at `positions` (e.g. a
    search's results). Values are grouped as filters compare them (case- and whitespace-insensitively) and
    shown in their most frequent spelling (the first seen among equals); missing values are not counted. Each
    column's values are ordered by count, then alphabetically; `limit` keeps the most frequent ones.

    Example:
    ```python
    >>> table = ProductTable(["a", "b", "c"], {"brand": ["Nike", "Puma", "NIKE "]})
    >>> facet_counts(table, ["brand"]), facet_counts(table, ["brand"], positions=[1])
    ({'brand': {'Nike': 2, 'Puma': 1}}, {'brand': {'Puma': 1}})
    ```
    """
    if allowed is not None and positions is not None:
        raise ValueError("give allowed or positions, not both")
    if positions is None:
        rows = range(len(table)) if allowed is None else np.flatnonzero(np.asarray(allowed, dtype=bool)).tolist()
    else:
        rows = [int(position) for position in positions if int(position) >= 0]
    counts = {}
    for name in names:
        column = table.column(name)
        spellings: dict[str, Counter] = {}
        for row in rows:
            value = column[row]
            if not _is_missing(value):
                text = " ".join(str(value).split())
                spellings.setdefault(normalise_value(text), Counter())[text] += 1
        tally = {key: sum(counter.values()) for key, counter in spellings.items()}
        spelling = {key: counter.most_common(1)[0][0] for key, counter in spellings.items()}
        ordered = sorted(tally, key=lambda key: (-tally[key], spelling[key]))[:limit]
        counts[name] = {spelling[key]: tally[key] for key in ordered}
    return counts


__all__ = [
    "DEFAULT_PRICE_COLUMN",
    "FilterError",
    "ProductFilter",
    "ProductTable",
    "facet_counts",
    "parse_filter",
    "resolve_filter_column",
]
