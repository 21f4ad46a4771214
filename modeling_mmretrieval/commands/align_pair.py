"""Build an aligned text-image pair for 4tower models from two frozen towers (no CLIP weights needed).

Linear adapters on the frozen towers' cached features, trained on a catalogue's (title, image) pairs
(`training.dual_encoder_alignment`); the folder it writes is what `mmretrieval train --architecture 4tower
--clip_model` takes.

```bash
mmretrieval align-pair --output_dir outputs/aligned_pair
mmretrieval train --architecture 4tower --clip_model outputs/aligned_pair --fusion residual --output_dir outputs/4tmm
```
"""

import argparse
import json
import sys
from pathlib import Path

from ..data import SAMPLE_DATA_DIR, CatalogueColumns, load_catalogue
from ..training.dual_encoder_alignment import align_dual_encoder
from ..training.model_builder import DEFAULT_DINOV2_IMAGE_SIZE


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The align-pair command's options.

    Example:
    ```python
    >>> build_parser().parse_args(["--output_dir", "pair"]).epochs
    30
    ```
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Folder of the aligned VisionTextDualEncoderModel.")
    parser.add_argument("--text_model", default="minilm", help='Text tower (Hub id, folder, or "minilm" offline).')
    parser.add_argument("--vision_model", default="dinov2-small",
                        help='Image tower (Hub id, folder, or "dinov2-small" offline).')
    parser.add_argument("--dataset", default=str(SAMPLE_DATA_DIR), help="Catalogue of (title, image) pairs.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--product_id_column", default="product_id")
    parser.add_argument("--title_column", default="title")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--max_products", type=int, help="Align on a seeded random subset of this many products.")
    parser.add_argument("--image_size", type=int, default=DEFAULT_DINOV2_IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--held_out_share", type=float, default=0.1,
                        help="Share of the products kept out of training to report the alignment's recall.")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None, prog: str | None = None) -> int:
    """Command line: align, save, and print the alignment report as JSON.

    Example: `main(["--output_dir", "outputs/aligned_pair"])` returns 0 and prints the held-out recalls.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for flag in ("epochs", "batch_size", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.max_products is not None and args.max_products < 4:
        parser.error(f"--max_products must be at least 4, got {args.max_products}")
    if not 0.0 <= args.held_out_share < 1.0:
        parser.error(f"--held_out_share must lie in [0, 1), got {args.held_out_share}")
    if args.image_column.lower() in ("", "none", "null"):
        parser.error("align-pair learns from (title, image) pairs: it needs an --image_column")
    columns = CatalogueColumns(product_id=args.product_id_column, title=args.title_column, image=args.image_column)
    try:
        catalogue = load_catalogue(args.dataset, split=args.split)
    except (KeyError, FileNotFoundError, ValueError) as error:
        parser.error(f"--dataset {args.dataset} --split {args.split}: {error}")
    missing = [column for column in (columns.product_id, columns.title, columns.image)
               if column not in catalogue.column_names]
    if missing:
        parser.error(f"the catalogue has no column {missing[0]!r} (columns: {', '.join(catalogue.column_names)}); "
                     "name it with --product_id_column / --title_column / --image_column")
    if args.max_products and args.max_products < len(catalogue):
        catalogue = catalogue.shuffle(seed=args.seed).select(range(args.max_products))
    try:
        report = align_dual_encoder(
            args.text_model, args.vision_model, catalogue, args.output_dir, columns=columns,
            image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
            learning_rate=args.learning_rate, held_out_share=args.held_out_share, seed=args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    (Path(args.output_dir) / "alignment.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
