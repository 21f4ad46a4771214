"""Rebuild the committed sample catalogue from the full fashion-products parquet files.

    python modeling_mmretrieval/data/sample/make_sample.py --source ../shared/data/fashion-products

Each split of the sample is drawn from the same split of the full data (so the sample keeps the full data's
hash-of-product-id split), stratified by article type: a type with `n` products gets a quota proportional to
`sqrt(n)`, capped at `n`, so common types keep many products (attribute-derived queries need several products
sharing attributes) while rare types are still represented. Products within a type are drawn uniformly with a
seeded generator, so the output depends only on the input files and `--seed`. The Arrow schema, including the
`huggingface` metadata that makes `image` a `datasets.Image` column, is copied unchanged.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SAMPLE_SIZES = {"train": 2800, "validation": 450, "test": 700}
DEFAULT_SEED = 20250113


def stratified_quotas(type_counts: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over types proportionally to sqrt(count), never above a type's count (largest remainder)."""
    remaining_types = dict(type_counts)
    quotas: dict[str, int] = {}
    budget = min(total, sum(type_counts.values()))
    # Types whose sqrt share exceeds their size take everything; the rest is re-shared among the others.
    while True:
        weight_sum = sum(math.sqrt(count) for count in remaining_types.values())
        capped = {
            name: count for name, count in remaining_types.items() if budget * math.sqrt(count) / weight_sum >= count
        }
        if not capped:
            break
        quotas.update(capped)
        budget -= sum(capped.values())
        for name in capped:
            del remaining_types[name]
    shares = {name: budget * math.sqrt(count) / weight_sum for name, count in remaining_types.items()}
    floors = {name: math.floor(share) for name, share in shares.items()}
    leftover = budget - sum(floors.values())
    by_remainder = sorted(shares, key=lambda name: (floors[name] - shares[name], name))
    for name in by_remainder[:leftover]:
        floors[name] += 1
    quotas.update(floors)
    return quotas


def sample_indices(table: pa.Table, size: int, seed: int) -> np.ndarray:
    """Row indices of a type-stratified sample of `table`, sorted by product id for a stable file order."""
    product_ids = np.array(table.column("product_id").to_pylist())
    article_types = np.array(table.column("article_type").to_pylist())
    order = np.argsort(product_ids, kind="stable")
    type_names, type_sizes = np.unique(article_types, return_counts=True)
    quotas = stratified_quotas(dict(zip(type_names.tolist(), type_sizes.tolist(), strict=True)), size)
    rng = np.random.default_rng(seed)
    chosen = []
    for name in sorted(quotas):
        members = order[article_types[order] == name]
        chosen.extend(rng.choice(members, size=quotas[name], replace=False).tolist())
    return np.array(sorted(chosen, key=lambda index: product_ids[index]))


def write_sample(source_dir: Path, output_dir: Path, seed: int) -> dict[str, int]:
    counts = {}
    for offset, (split, size) in enumerate(SAMPLE_SIZES.items()):
        table = pq.read_table(source_dir / f"{split}.parquet")
        sample = table.take(sample_indices(table, size, seed + offset))
        pq.write_table(sample, output_dir / f"{split}.parquet", compression="zstd")
        counts[split] = sample.num_rows
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/fashion-products"))
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    counts = write_sample(args.source, args.output, args.seed)
    for split, count in counts.items():
        size_mb = (args.output / f"{split}.parquet").stat().st_size / 1e6
        print(f"{split}: {count} products, {size_mb:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
