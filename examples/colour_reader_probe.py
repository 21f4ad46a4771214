"""How well can a colour reader trained on the product photos themselves read colours, where the tagger's probe stops?

The visual-word tagger (`training.visual_tagger`) is a linear probe of frozen image features: DINOv2 and the
photo's colour histogram. Its accuracy saturates near 0.64 on the full training split
(`examples/visual_tagger_learning_curve.py`), and docs/results_analysis.md measures that the all-queries target would
need a reader right on about 0.88 to 0.92 of the products. This script asks whether learning from the pixels closes
that gap. It trains two readers on the photos of one split, with the tagger's own labels (`colour_labels`: the
colour column, lower-cased) and vocabulary (`colours_to_learn`), and judges them on another split, as the learning
curve does (a colour outside the vocabulary counts as wrong):

- colour histogram, linear: the tagger's linear fit (`fit_linear_classifier`) on the photo's colour histogram (the
  function the tagger's colour description uses, `colour_histogram_features`, here on the 60x80 photo rather than the
  image processor's crop), a frozen, whole-photo reading;
- garment-aware CNN: a small convolutional network trained from scratch on the photo (averaged down to 40x30 pixels)
  whose article type chooses where in the photo to look (attention over its feature map), so that the colour of
  jeans is read from the legs and not from the model's shirt.

```bash
python examples/colour_reader_probe.py --dataset ../shared/data/fashion-products --output outputs/colour_reader_probe.json
```

A shop's own catalogue names its columns with the same `--<name>_column` flags as the other commands (its colour
column, or colour words in its titles, give the labels; `--article_type_column` the garment).
"""

import argparse
import math
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling_mmretrieval.atomic_files import write_json_atomically
from modeling_mmretrieval.commands.common import (
    CliError,
    add_column_arguments,
    catalogue_columns_from_args,
    columns_for_catalogue,
    explicit_columns,
    load_catalogue_splits_from_args,
)
from modeling_mmretrieval.data.catalogue import CatalogueColumns, default_data_dir
from modeling_mmretrieval.data.images import load_product_image
from modeling_mmretrieval.modeling_mmretrieval import colour_histogram_features
from modeling_mmretrieval.training.visual_tagger import (
    DEFAULT_MIN_EXAMPLES,
    colour_labels,
    colours_to_learn,
    fit_linear_classifier,
    label_rows,
)

PHOTO_SIZE = (60, 80)  # (width, height): the shared catalogue's photos, which every photo is resized to
HISTOGRAM_LEVELS = 6  # the tagger's default colour description (`--colour_histogram_levels`)
UNKNOWN_GARMENT = 0  # the article-type index of products whose type is missing or too rare to learn


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default=None, help="Catalogue folder (default: `default_data_dir()`: ../shared "
                        "where present, else the committed sample).")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--evaluation_split", default="validation")
    parser.add_argument("--max_train_products", type=count, default=None, help="Use only the first N training products.")
    parser.add_argument("--min_examples", type=count, default=DEFAULT_MIN_EXAMPLES, help="Colours with fewer labelled "
                        "training products are left out of the vocabulary (the tagger's default), and article types "
                        "with fewer products share one garment.")
    parser.add_argument("--epochs", type=count, default=10, help="CNN training epochs.")
    parser.add_argument("--width", type=count, default=24, help="Channels of the CNN's first block (doubled per block).")
    parser.add_argument("--batch_size", type=count, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="Also write the results as JSON here.")
    add_column_arguments(parser.add_argument_group("catalogue columns (a shop's own names)"))
    return parser.parse_args(argv)


def count(text: str) -> int:
    """An argparse type: a whole number of 1 or more (argparse's one-line error otherwise)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


class ProbeError(ValueError):
    """A catalogue the probe cannot learn from (the script's one-line error, exit status 2)."""


def photos_and_labels(products, columns: CatalogueColumns, vocabulary: list[str], garments: dict[str, int]):
    """`(photos uint8 (n, 3, 80, 60), colour indices (n,), article-type indices (n,))` of the products (a catalogue or
    rows) with a readable photo and a colour label; a colour outside `vocabulary` gets index -1 (always wrong when
    judged), an article type outside `garments` `UNKNOWN_GARMENT`."""
    labels, _ = colour_labels(label_rows(products, columns), columns)
    index = {colour: position for position, colour in enumerate(vocabulary)}
    photos, colours, types = [], [], []
    for product, label in zip(products, labels):
        if label is None:
            continue
        image = load_product_image(product.get(columns.image) if columns.image else None).image
        if image is None:
            continue
        photos.append(np.asarray(image.resize(PHOTO_SIZE), dtype=np.uint8).transpose(2, 0, 1))
        colours.append(index.get(label, -1))
        garment = product.get(columns.article_type) if columns.article_type else None
        types.append(garments.get(garment, UNKNOWN_GARMENT))
    if not photos:
        return torch.zeros((0, 3, PHOTO_SIZE[1], PHOTO_SIZE[0]), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), \
            torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.stack(photos)), torch.tensor(colours), torch.tensor(types)


def article_types(products, columns: CatalogueColumns, min_examples: int) -> dict[str, int]:
    """Index (from 1) of each article type with at least `min_examples` products (a catalogue or rows); the others,
    and every product of a catalogue without the column, share `UNKNOWN_GARMENT`."""
    if not columns.article_type:
        return {}
    if hasattr(products, "column_names"):  # a catalogue: read the one column, not the photos
        values = products[columns.article_type] if columns.article_type in products.column_names else []
    else:
        values = [product.get(columns.article_type) for product in products]
    counts = Counter(value for value in values if value)
    frequent = sorted(value for value, count in counts.items() if count >= min_examples)
    return {value: position + 1 for position, value in enumerate(frequent)}


def histogram_features(photos: torch.Tensor) -> torch.Tensor:
    """The tagger's colour description of each photo (`colour_histogram_features` of pixels in [0, 1])."""
    pixels = photos.float() / 255.0
    return colour_histogram_features(pixels, [0.0] * 3, [1.0] * 3, HISTOGRAM_LEVELS)


class GarmentAwareColourReader(nn.Module):
    r"""
    A small CNN that reads a product's colour from its photo, looking where its article type says the product is.

    Three blocks of two 3x3 convolutions (max-pooled between blocks) turn the photo, averaged down to half size, into
    a feature map. The article type's learned vector scores every cell of that map; the softmax of those scores pools
    it, and the colour is read from that pooled vector beside the plain average of the map (the whole photo).

    Example:
    ```python
    >>> reader = GarmentAwareColourReader(num_garments=5, num_colours=12)
    >>> reader(torch.zeros(2, 3, 80, 60, dtype=torch.uint8), torch.tensor([1, 3])).shape
    torch.Size([2, 12])
    ```
    """

    def __init__(self, num_garments: int, num_colours: int, width: int = 24):
        super().__init__()

        def block(inputs: int, outputs: int) -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
                nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(),
            )

        self.blocks = nn.ModuleList([block(3, width), block(width, 2 * width), block(2 * width, 4 * width)])
        self.garment_queries = nn.Embedding(num_garments + 1, 4 * width)  # + UNKNOWN_GARMENT
        self.head = nn.Linear(8 * width, num_colours)

    def attention(self, photos: torch.Tensor, garments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(feature map (n, channels, cells), attention over its cells (n, cells))`."""
        hidden = F.avg_pool2d((photos.float() / 255.0 - 0.5) / 0.25, 2)  # colour needs no fine detail
        for position, block in enumerate(self.blocks):
            hidden = block(hidden if position == 0 else F.max_pool2d(hidden, 2))
        cells = hidden.flatten(2)
        scores = torch.einsum("nc,ncs->ns", self.garment_queries(garments), cells) / math.sqrt(cells.shape[1])
        return cells, torch.softmax(scores, dim=-1)

    def forward(self, photos: torch.Tensor, garments: torch.Tensor) -> torch.Tensor:
        cells, attention = self.attention(photos, garments)
        looked_at = torch.einsum("ncs,ns->nc", cells, attention)
        return self.head(torch.cat([looked_at, cells.mean(-1)], dim=-1))


def train_cnn_reader(photos: torch.Tensor, colours: torch.Tensor, garments: torch.Tensor, num_garments: int,
                     num_colours: int, *, epochs: int, width: int, batch_size: int, seed: int,
                     on_epoch=None) -> GarmentAwareColourReader:
    """Trains a `GarmentAwareColourReader` (AdamW, one-cycle learning rate, label smoothing 0.1, photos mirrored at
    random), seeded without touching the caller's random state; `on_epoch(epoch, reader)` is called after each
    epoch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the layers' initialisation draws from the global generator
        torch.manual_seed(seed)
        reader = GarmentAwareColourReader(num_garments, num_colours, width=width)
    optimiser = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(photos) / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        reader.train()
        order = torch.randperm(len(photos), generator=generator)
        for start in range(0, len(photos), batch_size):
            batch = order[start:start + batch_size]
            mirrored = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
            batch_photos = torch.where(mirrored, photos[batch].flip(-1), photos[batch])
            loss = F.cross_entropy(reader(batch_photos, garments[batch]), colours[batch], label_smoothing=0.1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch, reader)
    return reader.eval()


@torch.no_grad()
def accuracy(predict, count: int, colours: torch.Tensor, batch_size: int = 512) -> float:
    """Share of the `count` products whose most likely colour (`predict(start, end)` gives logits) is theirs."""
    predicted = torch.cat([predict(start, min(start + batch_size, count)).argmax(-1)
                           for start in range(0, count, batch_size)])
    return (predicted == colours).float().mean().item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.dataset, args.split = str(args.dataset or default_data_dir()), None  # every split is read
    try:
        try:
            splits = load_catalogue_splits_from_args(args)
            for flag, split in (("--train_split", args.train_split), ("--evaluation_split", args.evaluation_split)):
                if split not in splits:
                    raise ProbeError(f"--dataset {args.dataset} has no split {split!r} ({flag}); it has "
                                     f"{sorted(splits)}")
            train, evaluation = splits[args.train_split], splits[args.evaluation_split]
            columns = columns_for_catalogue(catalogue_columns_from_args(args), train.column_names,
                                            explicit=explicit_columns(args), where=f"split {args.train_split!r}",
                                            needs_queries=False)
        except CliError as error:  # its one line names the flag
            raise ProbeError(str(error)) from error
        if args.max_train_products:
            train = train.select(range(min(args.max_train_products, len(train))))
        vocabulary = colours_to_learn(train, columns, min_examples=args.min_examples)
        if len(vocabulary) < 2:
            raise ProbeError(f"--dataset {args.dataset}: fewer than 2 colours have {args.min_examples} labelled "
                             f"{args.train_split} products (--min_examples)")
        garments = article_types(train, columns, args.min_examples)
        started = time.perf_counter()
        train_photos, train_colours, train_garments = photos_and_labels(train, columns, vocabulary, garments)
        eval_photos, eval_colours, eval_garments = photos_and_labels(evaluation, columns, vocabulary, garments)
        known = train_colours >= 0
        train_photos, train_colours, train_garments = train_photos[known], train_colours[known], train_garments[known]
        if len(train_photos) == 0 or len(eval_photos) == 0:
            raise ProbeError(f"--dataset {args.dataset}: no product with both a photo and a colour label in the "
                             f"{args.train_split if len(train_photos) == 0 else args.evaluation_split} split")
    except ProbeError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(train_photos)} {args.train_split} and {len(eval_photos)} {args.evaluation_split} products with a "
          f"photo and a colour; {len(vocabulary)} colours, {len(garments)} article types "
          f"({time.perf_counter() - started:.0f} s to read the photos)", flush=True)

    started = time.perf_counter()
    train_histograms, eval_histograms = histogram_features(train_photos), histogram_features(eval_photos)
    weight, bias = fit_linear_classifier(train_histograms, train_colours, len(vocabulary), args.seed)
    readers = [{"reader": "colour histogram, linear",
                "accuracy": accuracy(lambda a, b: eval_histograms[a:b] @ weight.T + bias, len(eval_photos),
                                     eval_colours),
                "seconds": time.perf_counter() - started}]
    print(f"colour histogram, linear: accuracy {readers[0]['accuracy']:.3f}", flush=True)

    started = time.perf_counter()

    def report(epoch: int, reader: GarmentAwareColourReader) -> None:
        reader.eval()
        value = accuracy(lambda a, b: reader(eval_photos[a:b], eval_garments[a:b]), len(eval_photos), eval_colours)
        print(f"garment-aware CNN, epoch {epoch + 1}/{args.epochs}: accuracy {value:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    cnn = train_cnn_reader(train_photos, train_colours, train_garments, len(garments), len(vocabulary),
                           epochs=args.epochs, width=args.width, batch_size=args.batch_size, seed=args.seed,
                           on_epoch=report)
    readers.append({"reader": "garment-aware CNN",
                    "accuracy": accuracy(lambda a, b: cnn(eval_photos[a:b], eval_garments[a:b]), len(eval_photos),
                                         eval_colours),
                    "seconds": time.perf_counter() - started})
    results = {"dataset": args.dataset, "train_split": args.train_split, "evaluation_split": args.evaluation_split,
               "train_products": len(train_photos), "evaluated_products": len(eval_photos),
               "colours": len(vocabulary), "article_types": len(garments), "epochs": args.epochs, "width": args.width,
               "seed": args.seed, "readers": readers}
    print("\n| reader | accuracy |\n|---|---|")
    for row in readers:
        print(f"| {row['reader']} | {row['accuracy']:.3f} |")
    if args.output:
        write_json_atomically(args.output, results)
    return results


if __name__ == "__main__":
    main()
