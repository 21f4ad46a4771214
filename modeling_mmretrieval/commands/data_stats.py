"""Print the statistics of a product catalogue: products, article types, evaluation queries and their
relevance-set sizes, the "image must matter" slice, and how its images decode (ok, missing, undecodable,
refused, with example product ids).

Every column is named by a flag, as in the other commands; a catalogue without attribute columns gets its
product and image counts, and its queries come from its query column when it has one.

```bash
mmretrieval data-stats --split validation --num_queries 200
mmretrieval data-stats --dataset shop.csv --product_id_column sku --title_column name --image_column img_path
```
"""

import argparse
import logging
import sys
from pathlib import Path

from ..data import DEFAULT_MAX_IMAGE_PIXELS, default_data_dir
from ..data.stats import catalogue_stats, format_stats_table
from .common import (
    CliError,
    add_catalogue_arguments,
    catalogue_columns_from_args,
    columns_for_catalogue,
    explicit_columns,
    load_catalogue_splits_from_args,
)


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The data-stats command's arguments (the catalogue's, and the spellings of earlier versions: `--source`,
    `--num-queries`, `--skip-images`, `--max-image-pixels`).

    Example: `parse_args(["--split", "test", "--skip_images"]).skip_images` is True.
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_catalogue_arguments(parser)
    parser.add_argument("--source", dest="dataset", default=argparse.SUPPRESS, help="same as --dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attribute-derived queries")
    parser.add_argument("--num_queries", "--num-queries", type=int, default=1000, help="evaluation queries per split")
    parser.add_argument("--max_image_pixels", "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS)
    parser.add_argument("--skip_images", "--skip-images", action="store_true", help="do not decode the images")
    parser.add_argument("--fetch_images", action="store_true",
                        help="download http(s) image URLs to check them (default: count them as refused)")
    args = parser.parse_args(argv)
    if args.num_queries < 0:
        parser.error(f"--num_queries must be >= 0, got {args.num_queries}")
    return args


def data_stats(args: argparse.Namespace) -> None:
    """Prints the statistics table of `args`' catalogue and, when images are decoded, one image line per split.

    Example: `data_stats(parse_args(["--dataset", "shop.csv", "--title_column", "name"]))`.
    """
    splits = load_catalogue_splits_from_args(args)
    requested, explicit = catalogue_columns_from_args(args), explicit_columns(args)
    stats, image_less = {}, set()
    for name, dataset in splits.items():
        columns = columns_for_catalogue(
            requested, dataset.column_names, explicit=explicit, where=f"split {name!r}", needs_queries=False
        )
        if columns.image is None:
            image_less.add(name)
        if args.max_products is not None:
            if args.max_products < 1:
                raise CliError(f"--max_products must be positive, got {args.max_products}")
            dataset = dataset.select(range(min(args.max_products, len(dataset))))
        stats.update(catalogue_stats(
            {name: dataset}, seed=args.seed, num_queries=args.num_queries, columns=columns,
            decode_images=not args.skip_images, max_pixels=args.max_image_pixels, fetch_urls=args.fetch_images,
        ))
    sources = sorted({split.query_source for split in stats.values()})
    print(f"source: {args.dataset or default_data_dir()}  (queries: {', '.join(sources)}; seed {args.seed})")
    print(format_stats_table(stats))
    for name, split in stats.items():
        if split.image_report is not None:
            print(f"{name}: {split.image_report.summary()}")
        elif name in image_less and not args.skip_images:
            print(f"{name}: images: none (no image column, --image_column): every product is text-only")


def main(argv=None, prog: str | None = None) -> int:
    """Runs the data-stats command; 0 on success, 2 (one line on stderr) on a user error.

    Example: `main(["--split", "validation", "--skip_images"])`.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    prog = prog or Path(sys.argv[0]).name
    args = parse_args(argv, prog)
    try:
        data_stats(args)
    except CliError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
