"""Up-front checks of a catalogue's products: ids and texts, before any image is decoded or model loaded.

A bad row found when its batch is reached aborts a run that may have lasted an hour; `find_bad_products` reads
only the id and text columns, so a whole catalogue is checked in seconds and every problem is named in one line
(`BadProduct.line()`): "product 'sku-7', column 'title': blank text". The command line refuses a catalogue with
bad products, or leaves them out with `--skip_bad_rows`; the collator uses `text_problem` to name the product
behind a batch error.

Checked:

| problem | column | example |
|---|---|---|
| missing or blank id | id | `None`, `""`, `NaN` |
| id of a type that does not read back as itself | id | `True`, `1.5`, `[1]` |
| duplicate id, also across types that collide as text | id | `"7"` twice; `1` and `"1"` |
| no usable text | title | title and description blank after stripping |
| wrong-typed text | the field | a list, dict, bytes or bool as a title |
| text that is not valid Unicode | the field | a lone surrogate `"\\ud800"` |
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from .catalogue import CatalogueColumns


@dataclass(frozen=True)
class BadProduct:
    """One problem of one product: its id (`None` when the id itself is missing), the column, the reason, and the
    product's row in the catalogue when known.

    Example:
    ```python
    >>> BadProduct("sku-7", "title", "blank text").line()
    "product 'sku-7', column 'title': blank text"
    >>> BadProduct(None, "sku", "missing product id", row=12).line()
    "row 12, column 'sku': missing product id"
    ```
    """

    product_id: str | None
    column: str
    reason: str
    row: int | None = None

    def line(self) -> str:
        """The one-line message naming the product (or its row) and the column."""
        if self.product_id is not None:
            who = f"product {self.product_id!r}"
        else:
            who = f"row {self.row}" if self.row is not None else "a product without an id"
        return f"{who}, column {self.column!r}: {self.reason}"

    def to_dict(self) -> dict:
        """JSON-ready form (a line of `bad_rows.jsonl`)."""
        return {"product_id": self.product_id, "row": self.row, "column": self.column, "reason": self.reason}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_problem(value: Any) -> str | None:
    """Why `value` cannot be product or query text, or `None` when it can (blank text is not a problem here:
    a product needs text in one of its fields, not in every one).

    Example:
    ```python
    >>> text_problem("Blue Shirt"), text_problem(["Blue"]), text_problem("bad \\ud800 text")
    (None, 'wrong type: list, expected text', 'not valid Unicode text (lone surrogate)')
    ```
    """
    if _is_missing(value):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"wrong type: {type(value).__name__}, expected text"
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "not valid Unicode text (lone surrogate)"
    return None


def has_text(value: Any) -> bool:
    """Whether `value` gives non-blank text (numbers count, as the processor writes them)."""
    if _is_missing(value):
        return False
    return bool(value.strip()) if isinstance(value, str) else isinstance(value, (int, float)) and not isinstance(value, bool)


def _id_problem(value: Any) -> str | None:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return "missing product id"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"wrong type: product id {value!r} is a {type(value).__name__}; ids must be strings or integers"
    if isinstance(value, str) and text_problem(value):
        return f"product id is {text_problem(value)}"
    return None


def _query_problem(value: Any) -> str | None:
    if _is_missing(value) or (isinstance(value, str) and not value.strip()):
        return "blank query"
    if not isinstance(value, str):
        return f"wrong type: {type(value).__name__}, expected text"
    return text_problem(value)


def _rows_of(dataset_or_rows: datasets.Dataset | Iterable[Mapping], columns: CatalogueColumns,
             text_columns: Sequence[str]) -> Iterable[Mapping]:
    if isinstance(dataset_or_rows, datasets.Dataset):
        wanted = [columns.product_id, *text_columns]
        present = [name for name in dict.fromkeys(wanted) if name in dataset_or_rows.column_names]
        # Only the id and text columns are read: images stay untouched on disk.
        return (
            dict(zip(batch, values))
            for batch in dataset_or_rows.select_columns(present).iter(batch_size=1024)
            for values in zip(*batch.values())
        )
    return dataset_or_rows


def find_bad_products(
    dataset_or_rows: datasets.Dataset | Iterable[Mapping],
    columns: CatalogueColumns | None = None,
    *,
    check_queries: bool = False,
) -> list[BadProduct]:
    """Every problem of the catalogue's ids and texts, in row order, without decoding an image or loading a model.

    Args:
        dataset_or_rows: a `datasets.Dataset` (only its id and text columns are read) or an iterable of row mappings.
        columns: the catalogue's column names (the id, `title` and `description`).
        check_queries: also check the `query` column, when rows have one (catalogues with their own queries):
            a blank, wrong-typed or invalid query is a problem too.

    Returns:
        A list of `BadProduct`, empty for a clean catalogue. A product with several problems appears once per
        problem; the second and later rows of a repeated id are the ones reported as duplicates.

    Example:
    ```python
    >>> rows = [{"product_id": 1, "title": "Blue Shirt"}, {"product_id": "1", "title": "  "}]
    >>> [bad.line() for bad in find_bad_products(rows, CatalogueColumns(description=None))]
    ["product '1', column 'product_id': duplicate id: 1 (int, row 0) and '1' (str) are the same id as text",
     "product '1', column 'title': blank text (no text in 'title')"]
    ```
    """
    columns = columns or CatalogueColumns()
    text_columns = [name for name in (columns.title, columns.description) if name is not None]
    query_columns = [columns.query] if check_queries and columns.query is not None else []
    bad: list[BadProduct] = []
    first_seen: dict[str, tuple[int, Any]] = {}
    for position, row in enumerate(_rows_of(dataset_or_rows, columns, [*text_columns, *query_columns])):
        if not isinstance(row, Mapping):
            bad.append(BadProduct(None, columns.product_id, f"not a row mapping but a {type(row).__name__}", position))
            continue
        raw_id = row.get(columns.product_id)
        id_problem = _id_problem(raw_id)
        product_id = None if id_problem == "missing product id" else str(raw_id)

        def report(column: str, reason: str) -> None:
            bad.append(BadProduct(product_id, column, reason, position))

        if id_problem is not None:
            report(columns.product_id, id_problem)
        if product_id is not None:
            seen = first_seen.get(product_id)
            if seen is None:
                first_seen[product_id] = (position, raw_id)
            elif type(seen[1]) is type(raw_id):
                report(columns.product_id, f"duplicate id (first at row {seen[0]})")
            else:
                report(columns.product_id, f"duplicate id: {seen[1]!r} ({type(seen[1]).__name__}, row {seen[0]}) and "
                                           f"{raw_id!r} ({type(raw_id).__name__}) are the same id as text")
        for column in text_columns:
            problem = text_problem(row.get(column))
            if problem is not None:
                report(column, problem)
        if not any(has_text(row.get(column)) for column in text_columns):
            fields = " and ".join(repr(column) for column in text_columns) or "no text column"
            report(text_columns[0] if text_columns else columns.product_id, f"blank text (no text in {fields})")
        for column in query_columns:
            if column in row:
                report_query = _query_problem(row[column])
                if report_query is not None:
                    report(column, report_query)
    return bad


__all__ = ["BadProduct", "find_bad_products", "has_text", "text_problem"]
