"""How well the visual-word tagger reads colours as it is fitted on more labelled products.

The tagger (`training.visual_tagger`) is what moves the text-silent and degraded slices in docs/results.md; this
measures what more catalogue labels buy it. For each size, the tagger of a trained checkpoint is refitted on that many
products of the training split (a seeded shuffle, the checkpoint's own frozen image features) and judged on the
products of another split:
- accuracy: its most probable colour is the catalogue's (a colour outside its vocabulary counts as wrong);
- written: the share of products whose colour it would write (probability above the checkpoint's threshold);
- precision: how many of those written colours are right.

```bash
python examples/visual_tagger_learning_curve.py \
    --model outputs/images_that_pay/4tMM_residual_plus_restoration_plus_visual_tags_plus_colour_histogram_for_the_tagger/seed0/final \
    --dataset ../shared/data/fashion-products --sizes 2800 8000 16000 33410
```
"""

import argparse
import json
import random
import sys

import torch

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.data.catalogue import CatalogueColumns, load_catalogue
from modeling_mmretrieval.retrieval.image_feature_store import ImageFeatureStore
from modeling_mmretrieval.training.image_feature_cache import precompute_image_features
from modeling_mmretrieval.training.visual_tagger import (
    VisualTaggerError,
    colour_labels,
    fit_visual_tagger,
    label_rows,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A trained checkpoint with a frozen image tower.")
    parser.add_argument("--dataset", default=None, help="Catalogue folder (default: `default_data_dir()`: ../shared where "
                        "present, else the committed sample).")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--evaluation_split", default="validation")
    parser.add_argument("--sizes", nargs="+", type=int, default=[700, 1400, 2800])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.sizes):
        parser.error("--sizes must be positive product counts")
    return args


def judged(model, features: dict, products, columns: CatalogueColumns) -> dict:
    """The fitted tagger's accuracy, written share and precision on `products` with an image and a colour (`None`
    where there is nothing to judge)."""
    labels, _ = colour_labels(label_rows(products, columns), columns)
    rows = [(features[str(row[columns.product_id])], label) for row, label in zip(products, labels)
            if label is not None and features.get(str(row[columns.product_id])) is not None]
    if not rows:
        return {"evaluated_products": 0, "accuracy": None, "written": None, "precision": None}
    probabilities = model.visual_tagger(torch.stack([feature for feature, _ in rows]))
    best, chosen = probabilities.max(dim=-1)
    tags = model.config.visual_tags
    right = torch.tensor([tags[index] == label for index, (_, label) in zip(chosen.tolist(), rows)])
    written = best > model.config.visual_tag_min_probability  # as the model decides to write
    return {"evaluated_products": len(rows), "accuracy": right.float().mean().item(),
            "written": written.float().mean().item(),
            "precision": right[written].float().mean().item() if written.any() else None}


def _figure(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    model = MultimodalRetrievalModel.from_pretrained(args.model)
    processor = MultimodalRetrievalProcessor.from_pretrained(args.model)
    if not model.config.visual_tags or model.image_tower is None:
        print(f"error: --model {args.model}: not a checkpoint with a visual-word tagger", file=sys.stderr)
        sys.exit(2)
    if processor.fast_image_processing:  # the saved preference: the training run's pixels, so its stored features
        speedups.apply_to_processor(processor)
    columns, store = CatalogueColumns(), ImageFeatureStore()
    train = load_catalogue(args.dataset, split=args.train_split, needs_queries=False)
    evaluation = load_catalogue(args.dataset, split=args.evaluation_split, needs_queries=False)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    train = train.select(order[: max(args.sizes)])
    train_features = precompute_image_features(model, processor, train, store=store)
    evaluation_features = precompute_image_features(model, processor, evaluation, store=store)
    rows = []
    for size in sorted(set(args.sizes)):
        subset = train.select(range(min(size, len(train))))
        try:
            report = fit_visual_tagger(model, processor.tokenizer, train_features, subset, columns, seed=args.seed,
                                       min_probability=model.config.visual_tag_min_probability)
        except VisualTaggerError as error:  # too few labelled products at this size: said, and the curve goes on
            rows.append({"products": len(subset), "labelled_products": None, "colours": None, "error": str(error)})
            print(f"{len(subset):>6} products: {error}", flush=True)
            continue
        row = {"products": len(subset), "labelled_products": report.fitted_products, "colours": len(report.tags),
               **judged(model, evaluation_features, evaluation, columns)}
        rows.append(row)
        print(f"{len(subset):>6} products ({row['labelled_products']} labelled, {row['colours']} colours): accuracy "
              f"{_figure(row['accuracy'])}, written {_figure(row['written'])}, precision {_figure(row['precision'])} "
              f"(on {row['evaluated_products']} {args.evaluation_split} products)", flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": args.model, "dataset": args.dataset, "evaluation_split": args.evaluation_split,
                       "rows": rows}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
