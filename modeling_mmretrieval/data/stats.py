"""Catalogue statistics (the `data-stats` command's, `modeling_mmretrieval.commands.data_stats`).

Per split: products, article types, evaluation queries (attribute-derived, or read from a query column) and their
relevance-set sizes, the "image must matter" queries (colour absent from relevant titles) and, optionally, image
decoding outcomes. A catalogue without attribute columns gets its product and image counts; its queries and
article types show as "-"; one without an image column (`CatalogueColumns.image` None) shows its images as "-".

Example:
```bash
python -m modeling_mmretrieval data-stats --split validation   # or: python -m modeling_mmretrieval.data.stats
```
"""

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import datasets

from .catalogue import CatalogueColumns, normalise_value, with_lazy_images
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageReport, load_product_image
from .queries import make_evaluation_queries
from .query_column import evaluation_queries_from_column


@dataclass(frozen=True)
class SplitStats:
    """Summary of one catalogue split; image counts are `None` when images were not decoded, `article_types` when
    the catalogue has no article type column, and `derived_queries` counts the queries read from a query column
    when it has one (`query_source` says which).

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=10, decode_images=False)
    >>> stats["validation"].images_ok is None
    True
    ```
    """

    products: int
    article_types: int | None
    derived_queries: int
    relevant_per_query_mean: float
    relevant_per_query_median: float
    relevant_per_query_max: int
    colour_absent_queries: int
    images_ok: int | None = None
    image_problems: dict[str, int] = field(default_factory=dict)
    image_report: ImageReport | None = None
    query_source: str = "attribute-derived"


def count_image_problems(
    dataset: datasets.Dataset,
    *,
    columns: CatalogueColumns | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    batch_size: int = 512,
    fetch_urls: bool = False,
    report: ImageReport | None = None,
) -> tuple[int, dict[str, int]]:
    """Decode every image with `load_product_image`: (decodable count, {problem reason: count}); `report`, when
    given, also counts each product's outcome by id.

    Example:
    ```python
    >>> products = datasets.Dataset.from_dict({"image": [None, b""]})
    >>> count_image_problems(products)
    (0, {'missing': 1, 'empty': 1})
    ```
    """
    columns = columns or CatalogueColumns()
    with_ids = report is not None and columns.product_id in dataset.column_names
    images = with_lazy_images(dataset, columns).select_columns(
        [columns.image, columns.product_id] if with_ids else [columns.image]
    )
    problems: Counter[str] = Counter()
    decodable = 0
    for batch in images.iter(batch_size=batch_size):
        product_ids = batch[columns.product_id] if with_ids else [None] * len(batch[columns.image])
        for value, product_id in zip(batch[columns.image], product_ids, strict=True):
            result = load_product_image(value, max_pixels=max_pixels, fetch_urls=fetch_urls)
            if report is not None:
                report.add(product_id, result)
            if result.has_image:
                decodable += 1
            else:
                problems[result.reason.value] += 1
    return decodable, dict(problems)


def catalogue_stats(
    catalogue: datasets.DatasetDict | Mapping[str, datasets.Dataset] | datasets.Dataset,
    *,
    seed: int = 0,
    num_queries: int = 1000,
    columns: CatalogueColumns | None = None,
    decode_images: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    fetch_urls: bool = False,
) -> dict[str, SplitStats]:
    """Per-split statistics: products, article types, evaluation queries (from the query column when the split
    has one, else attribute-derived when it has an article type) and their relevance-set sizes, "image must
    matter" queries (colour absent from relevant titles) and, optionally, image decoding outcomes (not for a
    catalogue without images, `columns.image` None).

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=100, decode_images=False)
    >>> stats["validation"].derived_queries
    100
    ```
    """
    columns = columns or CatalogueColumns()
    splits = catalogue if isinstance(catalogue, Mapping) else {str(catalogue.split or "data"): catalogue}
    stats = {}
    for name, dataset in splits.items():
        has_article_types = columns.article_type is not None and columns.article_type in dataset.column_names
        if columns.query is not None and columns.query in dataset.column_names:
            queries = evaluation_queries_from_column(dataset, columns=columns, num_queries=num_queries, seed=seed)
            query_source = f"query column {columns.query!r}"
        elif has_article_types:
            queries = make_evaluation_queries(dataset, seed=seed, num_queries=num_queries, columns=columns)
            query_source = "attribute-derived"
        else:
            queries, query_source = [], "none (no query or article type column)"
        sizes = [len(query.relevant_ids) for query in queries] or [0]
        decodes = decode_images and columns.image is not None
        report = ImageReport() if decodes else None
        images_ok, image_problems = (
            count_image_problems(dataset, columns=columns, max_pixels=max_pixels, fetch_urls=fetch_urls, report=report)
            if decodes else (None, {})
        )
        article_types = None
        if has_article_types:
            article_types = len({normalise_value(value) for value in dataset[columns.article_type] if value})
        stats[name] = SplitStats(
            products=len(dataset),
            article_types=article_types,
            derived_queries=len(queries),
            relevant_per_query_mean=statistics.fmean(sizes),
            relevant_per_query_median=statistics.median(sizes),
            relevant_per_query_max=max(sizes),
            colour_absent_queries=sum(query.colour_absent_from_titles for query in queries),
            images_ok=images_ok,
            image_problems=image_problems,
            image_report=report,
            query_source=query_source,
        )
    return stats


def format_stats_table(stats: Mapping[str, SplitStats]) -> str:
    """A plain-text table of `catalogue_stats` output, one row per split.

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=10, decode_images=False)
    >>> print(format_stats_table(stats).splitlines()[0])
    split       products  article types  queries  relevant mean  median  max  colour not in titles  images ok  image problems
    ```
    """
    header = (
        "split",
        "products",
        "article types",
        "queries",
        "relevant mean",
        "median",
        "max",
        "colour not in titles",
        "images ok",
        "image problems",
    )
    rows = [header]
    for name, split in stats.items():
        problems = ", ".join(f"{reason}={count}" for reason, count in sorted(split.image_problems.items())) or "-"
        rows.append(
            (
                name,
                str(split.products),
                "-" if split.article_types is None else str(split.article_types),
                str(split.derived_queries),
                f"{split.relevant_per_query_mean:.1f}",
                f"{split.relevant_per_query_median:g}",
                str(split.relevant_per_query_max),
                str(split.colour_absent_queries),
                "-" if split.images_ok is None else str(split.images_ok),
                problems if split.images_ok is not None else "-",
            )
        )
    widths = [max(len(row[position]) for row in rows) for position in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def run_data_stats(argv: Sequence[str] | None = None) -> int:
    """The `data-stats` command (`modeling_mmretrieval.commands.data_stats.main`): prints catalogue statistics and
    returns the process exit status.

    Example:
    ```bash
    python -m modeling_mmretrieval.data.stats --split validation --num_queries 200
    ```
    """
    from ..commands.data_stats import main  # the command line lives with the other commands

    return main(argv, prog="data-stats")


if __name__ == "__main__":
    raise SystemExit(run_data_stats())
