"""Catalogue statistics and the `data-stats` command.

Per split: products, article types, attribute-derived evaluation queries and their relevance-set sizes, the
"image must matter" queries (colour absent from relevant titles) and, optionally, image decoding outcomes.

Example:
```bash
python -m modeling_mmretrieval data-stats --split validation   # or: python -m modeling_mmretrieval.data.stats
```
"""

import argparse
import statistics
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import datasets

from .catalogue import CatalogueColumns, default_data_dir, load_catalogue, normalise_value, with_lazy_images
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_product_image
from .queries import make_evaluation_queries


@dataclass(frozen=True)
class SplitStats:
    """Summary of one catalogue split; image counts are `None` when images were not decoded.

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=10, decode_images=False)
    >>> stats["validation"].images_ok is None
    True
    ```
    """

    products: int
    article_types: int
    derived_queries: int
    relevant_per_query_mean: float
    relevant_per_query_median: float
    relevant_per_query_max: int
    colour_absent_queries: int
    images_ok: int | None = None
    image_problems: dict[str, int] = field(default_factory=dict)


def count_image_problems(
    dataset: datasets.Dataset,
    *,
    columns: CatalogueColumns | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    batch_size: int = 512,
) -> tuple[int, dict[str, int]]:
    """Decode every image with `load_product_image`: (decodable count, {problem reason: count}).

    Example:
    ```python
    >>> products = datasets.Dataset.from_dict({"image": [None, b""]})
    >>> count_image_problems(products)
    (0, {'missing': 1, 'empty': 1})
    ```
    """
    columns = columns or CatalogueColumns()
    images = with_lazy_images(dataset, columns).select_columns([columns.image])
    problems: Counter[str] = Counter()
    decodable = 0
    for batch in images.iter(batch_size=batch_size):
        for value in batch[columns.image]:
            result = load_product_image(value, max_pixels=max_pixels)
            if result.has_image:
                decodable += 1
            else:
                problems[result.reason.value] += 1
    return decodable, dict(problems)


def catalogue_stats(
    catalogue: datasets.DatasetDict | datasets.Dataset,
    *,
    seed: int = 0,
    num_queries: int = 1000,
    columns: CatalogueColumns | None = None,
    decode_images: bool = True,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, SplitStats]:
    """Per-split statistics: products, article types, derived evaluation queries and their relevance-set sizes,
    "image must matter" queries (colour absent from relevant titles) and, optionally, image decoding outcomes.

    Example:
    ```python
    >>> stats = catalogue_stats(load_catalogue(split="validation"), num_queries=100, decode_images=False)
    >>> stats["validation"].derived_queries
    100
    ```
    """
    columns = columns or CatalogueColumns()
    splits = catalogue if isinstance(catalogue, datasets.DatasetDict) else {str(catalogue.split or "data"): catalogue}
    stats = {}
    for name, dataset in splits.items():
        queries = make_evaluation_queries(dataset, seed=seed, num_queries=num_queries, columns=columns)
        sizes = [len(query.relevant_ids) for query in queries] or [0]
        images_ok, image_problems = (
            count_image_problems(dataset, columns=columns, max_pixels=max_pixels) if decode_images else (None, {})
        )
        stats[name] = SplitStats(
            products=len(dataset),
            article_types=len({normalise_value(value) for value in dataset[columns.article_type] if value}),
            derived_queries=len(queries),
            relevant_per_query_mean=statistics.fmean(sizes),
            relevant_per_query_median=statistics.median(sizes),
            relevant_per_query_max=max(sizes),
            colour_absent_queries=sum(query.colour_absent_from_titles for query in queries),
            images_ok=images_ok,
            image_problems=image_problems,
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
                str(split.article_types),
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
    """`data-stats` command: print catalogue statistics. Returns the process exit status.

    Example:
    ```bash
    python -m modeling_mmretrieval.data.stats --split validation --num-queries 200
    ```
    """
    parser = argparse.ArgumentParser(
        prog="data-stats", description="Statistics of a product catalogue and of its attribute-derived queries."
    )
    parser.add_argument(
        "--source", default=None, help="directory, file(s) glob or Hub name (default: shared data, else the sample)"
    )
    parser.add_argument("--split", default=None, help="only this split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attribute-derived queries")
    parser.add_argument("--num-queries", type=int, default=1000, help="evaluation queries derived per split")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--skip-images", action="store_true", help="do not decode the images")
    args = parser.parse_args(argv)
    try:
        catalogue = load_catalogue(args.source, split=args.split)
    except (KeyError, FileNotFoundError, ValueError) as error:
        print(f"data-stats: {error}", file=sys.stderr)
        return 2
    stats = catalogue_stats(
        catalogue,
        seed=args.seed,
        num_queries=args.num_queries,
        decode_images=not args.skip_images,
        max_pixels=args.max_image_pixels,
    )
    print(f"source: {args.source or default_data_dir()}  (queries are attribute-derived, seed {args.seed})")
    print(format_stats_table(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_data_stats())
