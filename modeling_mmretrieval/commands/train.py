"""Train a multimodal product retriever (text-only, 4tMM or 3tMM) with 🤗 Accelerate.

Without flags this is the README's main job: a 3-tower model (all-MiniLM-L6-v2 text tower + a frozen DINOv2-small
vision tower, both available offline) trained for one epoch on the committed fashion sample, with the image
features cached once, evaluated before and after training on the validation split, saved to
`--output_dir/final` and summarised in a table and `results.json`.

```bash
mmretrieval train --output_dir outputs/main_job        # or: python examples/train.py --output_dir ...
# full catalogue, two GPUs, bf16, checkpoints every 500 steps, resumable after a crash:
accelerate launch --num_processes 2 examples/train.py --dataset ../shared/data/fashion-products \
    --mixed_precision bf16 --checkpointing_steps 500 --resume_from_checkpoint latest --output_dir outputs/full
```

Any catalogue with an id and some text trains: every column is named by a flag (`--<name>_column`, `none` to turn
an optional one off); queries come from its `query` column, or are attribute-derived from its article type and
other attributes. A catalogue without a validation split gets a seeded hold-out (`--validation_share`). The
catalogue and the flags are checked before any model is loaded (exit status 2 and one line naming the product,
column and flag); `--skip_bad_rows` leaves bad products out, listed in `<output_dir>/bad_rows.jsonl`.

Every flag is described in docs/training.md; the run itself is `modeling_mmretrieval.training.trainer`.
"""

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from types import SimpleNamespace

from ..configuration_mmretrieval import MAX_COLOUR_HISTOGRAM_LEVELS
from ..data import SAMPLE_DATA_DIR
from ..data.catalogue import known_value
from ..data.images import ImageFailureError
from ..data.product_checks import BadProduct, find_bad_products
from ..training.checkpoints import CheckpointMismatchError
from ..training.dual_encoder_alignment import ALIGN_ON_TRAINING_PRODUCTS, AlignmentError
from ..training.model_builder import (
    DEFAULT_3TOWER_FUSION,
    DEFAULT_4TOWER_FUSION,
    DEFAULT_ARCHITECTURE,
    DEFAULT_COLOUR_HISTOGRAM_LEVELS,
    DEFAULT_DINOV2_IMAGE_SIZE,
    DEFAULT_VISUAL_WORD_DROPOUT,
)
from ..training.model_card import hub_license
from ..training.visual_tagger import DEFAULT_MIN_PROBABILITY, VisualTaggerError
from ..training.image_branch_weight import (
    CANDIDATE_IMAGE_BRANCH_WEIGHTS, ImageBranchWeightError, image_branch_weight, parse_image_branch_weight,
)
from ..training.text_tower_anchor import DEFAULT_TEXT_TOWER_ANCHOR, TextTowerAnchorError, text_tower_anchor_weight
from ..training.visual_word_restoration import (
    DEFAULT_VISUAL_WORD_RESTORATION, VisualWordRestorationError, restoration_weight,
)
from ..training.optimization import SCHEDULER_TYPES, NonFiniteLossError
from ..training.trainer import run_training, trackers_for
from .common import (
    BAD_ROWS_FILENAME,
    CliError,
    add_bad_rows_argument,
    add_column_arguments,
    add_image_arguments,
    catalogue_columns_from_args,
    check_image_arguments,
    check_images_exist,
    check_text_lengths,
    columns_for_catalogue,
    explicit_columns,
    load_catalogue_splits_from_args,
    text_tower_positions,
    write_bad_rows,
)

DEFAULT_VALIDATION_SHARE = 0.1


def _image_branch_weight_flag(text: str) -> float | str:
    try:
        return parse_image_branch_weight(text)
    except ValueError as error:  # argparse names the flag: "argument --image_branch_weight: must be ..."
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The train command's argument parser; `prog` names the program in usage and error lines.

    Example:
    ```python
    >>> build_parser().parse_args(["--architecture", "text_only"]).architecture
    'text_only'
    ```
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", help="Trained retriever (Hub id or folder); overrides the tower flags.")
    model.add_argument("--architecture", choices=["text_only", "4tower", "3tower"],
                       help=f"default {DEFAULT_ARCHITECTURE} (the best multimodal configuration of docs/results.md); "
                            "text_only for a catalogue without an image column")
    model.add_argument("--text_model", default="minilm", help='Text tower (Hub id, folder, or "minilm" offline).')
    model.add_argument("--vision_model", default="dinov2-small",
                       help='Vision tower of 3tower models, and of the 4tower pair that --clip_model aligned builds '
                            '(Hub id, folder, or "dinov2-small" offline).')
    model.add_argument("--clip_model", help='4tower aligned dual encoder (CLIP/SigLIP Hub id or folder), or "aligned" '
                       "(the default for 4tower): align --text_model and --vision_model on the training products first "
                       "(linear adapters on their frozen features, saved in <output_dir>/aligned_pair; "
                       "`mmretrieval align-pair`).")
    model.add_argument("--fusion", choices=["concat", "alpha_concat", "mlp", "residual"],
                       help=f"4tower: {DEFAULT_4TOWER_FUSION} (default), or concat, alpha_concat, mlp (the paper's); "
                            f"3tower: {DEFAULT_3TOWER_FUSION} (default) or mlp (the paper's). residual starts as the text "
                            "model (zero-initialised image branch) and can only add to it.")
    model.add_argument("--fusion_alpha", type=float, default=0.5)
    model.add_argument("--projection_dim", type=int, help="Linear projection after the text tower (default: none).")
    model.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    model.add_argument("--share_text_towers", dest="share_text_towers", action="store_true", default=True)
    model.add_argument("--separate_text_towers", dest="share_text_towers", action="store_false")
    model.add_argument("--freeze_image_towers", dest="freeze_image_towers", action="store_true", default=None,
                       help="Freeze the image tower (default for new models; a loaded model keeps its setting).")
    model.add_argument("--train_image_towers", dest="freeze_image_towers", action="store_false")
    model.add_argument("--train_dual_text_tower", action="store_true",
                       help="4tower: train the dual encoder's text tower and projections against its locked vision "
                            "tower (LiT-style alignment of a text tower to a frozen image tower).")
    model.add_argument("--max_query_length", type=int, help="Query tokens (default 24, or the checkpoint's).")
    model.add_argument("--max_product_length", type=int, help="Product-text tokens (default 64, or the checkpoint's).")
    model.add_argument("--product_text_fields", nargs="+", help="Product fields joined into its text "
                       "(default: title description).")
    model.add_argument("--image_size", type=int,
                       help=f"Image side in pixels (default: {DEFAULT_DINOV2_IMAGE_SIZE} for a DINOv2 tower built from "
                            "--vision_model, else the image processor's own size).")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Recompute tower activations in backward.")
    model.add_argument("--fast_image_processing", dest="fast_image_processing", action="store_true", default=None,
                       help="Preprocess images with the batched fast path (default: on for a new model whose image "
                            "processor it reproduces; a --model_name_or_path checkpoint keeps its own setting).")
    model.add_argument("--no_fast_image_processing", dest="fast_image_processing", action="store_false")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=str(SAMPLE_DATA_DIR),
                      help="Catalogue: folder of train/validation/test files, file(s), or a Hub dataset name "
                           "(default: the committed fashion sample).")
    data.add_argument("--train_split", default="train")
    data.add_argument("--eval_split", default="validation", help='Held-out split to evaluate on, or "none".')
    data.add_argument("--validation_share", type=float, default=DEFAULT_VALIDATION_SHARE,
                      help="Share of the training products held out (seeded) for evaluation when the catalogue has no "
                           "--eval_split, e.g. a single data file (0: refuse instead).")
    # --query_column: queries paired with each row, used when present; otherwise queries are attribute-derived.
    add_column_arguments(data)
    data.add_argument("--attribute_keys", nargs="+", help="Keys of the attributes JSON that derived queries may use.")
    data.add_argument("--max_train_products", type=int, help="Train on a seeded random subset of this many rows.")
    data.add_argument("--queries_per_product", type=int, default=1, help="Attribute-derived queries per product.")
    data.add_argument("--num_hard_negatives", type=int, default=0, help="Same-type, other-colour/gender products "
                      "added to each query's candidates (products without any are dropped).")
    data.add_argument("--no_mask_false_negatives", dest="mask_false_negatives", action="store_false",
                      help="Keep in-batch products that also match a query's attributes as negatives.")
    data.add_argument("--visual_word_dropout", type=float, default=DEFAULT_VISUAL_WORD_DROPOUT,
                      help="Strip colour and pattern words from the text of this share of the training products (a "
                           "seeded draw per product and epoch), so matching them sometimes needs the image "
                           f"(default {DEFAULT_VISUAL_WORD_DROPOUT}: see docs/results.md for what it trades).")
    data.add_argument("--visual_word_restoration", type=float,
                      help="Weight of a second loss in which the image fusion alone learns to restore the colour and "
                           "pattern words stripped from every training product's text; the text towers are left "
                           f"alone (default {DEFAULT_VISUAL_WORD_RESTORATION} for 3tower and 4tower models with a "
                           "residual or mlp fusion, 0 otherwise; 0 turns it off; docs/training.md).")
    data.add_argument("--text_tower_anchor", type=float,
                      help="Weight of the text-only model's loss on the text towers' own vectors, added to the fused "
                           "model's loss, so that the towers stay retrievers of their own while the image fusion "
                           f"trains (default {DEFAULT_TEXT_TOWER_ANCHOR} for 3tower and 4tower models with the "
                           "residual fusion, else 0, and 0 with --mini_batch_size; 0 turns it off; docs/training.md).")
    data.add_argument("--image_branch_weight", type=_image_branch_weight_flag,
                      help="Weight on what the residual fusion's image branch adds, set on the final model once "
                           "training ends, so that it evaluates, saves and searches with it: a number of 0 or more, "
                           "or 'auto' (the default for models with the residual fusion): of "
                           f"{', '.join(map(str, CANDIDATE_IMAGE_BRANCH_WEIGHTS))}, the one with the best nDCG@10 on "
                           "the evaluation split's products, with training-phrased queries (without an evaluation "
                           "split, the model's own weight: 1 for a new model). 1 keeps the model as trained, and is "
                           "the only weight of other fusions (docs/training.md).")
    data.add_argument("--visual_tags", dest="visual_tags", action="store_true", default=None,
                      help="Fit a visual-word tagger on the frozen image features (colour from the catalogue's colour "
                           "column, else from the colour words of the titles) that writes the colour it reads off a "
                           "product's image into the product text when the text names none (default: on for 3tower "
                           "and 4tower models with a frozen image tower; docs/training.md).")
    data.add_argument("--no_visual_tags", dest="visual_tags", action="store_false")
    data.add_argument("--tag_among_named_colours", action=argparse.BooleanOptionalAction, default=False,
                      help="The visual-word tagger also writes a colour into a product text that names several "
                           "colours (\"navy blue and white striped\"): the one of those it names that the image "
                           "favours, so that the text tower can tell the product's own colour from its trims "
                           "(default: off; docs/training.md).")
    data.add_argument("--visual_tag_min_probability", type=float, default=DEFAULT_MIN_PROBABILITY,
                      help="The tagger writes a colour only above this probability "
                           f"(default {DEFAULT_MIN_PROBABILITY}).")
    data.add_argument("--colour_histogram_levels", type=int, default=None, metavar="N",
                      help="Append a description of each photo's colours (an N x N x N RGB histogram of the product's "
                           "pixels, with their mean and spread) to the image features the visual-word tagger reads; "
                           "0 turns it off. Only for models built from towers (default "
                           f"{DEFAULT_COLOUR_HISTOGRAM_LEVELS} where the tagger is fitted, else 0; docs/training.md).")
    data.add_argument("--colour_histogram_in_fusion", action="store_true",
                      help="Let the mlp/residual fusion read the colour description too (default: the tagger alone).")
    data.add_argument("--max_eval_queries", type=int, default=500,
                      help="Evaluation queries (attribute-derived ones use the held-out phrasing family).")
    data.add_argument("--cache_image_features", dest="cache_image_features", action="store_true", default=None,
                      help="Precompute frozen image-tower features once (default: on when the tower is frozen).")
    data.add_argument("--no_cache_image_features", dest="cache_image_features", action="store_false")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    add_bad_rows_argument(data)
    add_image_arguments(parser)

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", default="outputs/mmretrieval")
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--per_device_train_batch_size", type=int, default=32)
    training.add_argument("--per_device_eval_batch_size", type=int, default=64)
    training.add_argument("--gradient_accumulation_steps", type=int, default=1)
    training.add_argument("--mini_batch_size", type=int,
                          help="GradCache: embed the batch in chunks of this size (same gradients, less memory).")
    training.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    training.add_argument("--tower_learning_rate", type=float, default=2e-5)
    training.add_argument("--head_learning_rate", type=float, default=1e-3,
                          help="Fusion MLPs, projections, missing-image embedding and logit scale.")
    training.add_argument("--weight_decay", type=float, default=0.01)
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 disables).")
    training.add_argument("--lr_scheduler_type", default="linear", choices=list(SCHEDULER_TYPES))
    training.add_argument("--warmup_ratio", type=float, default=0.1)
    training.add_argument("--warmup_steps", type=int, help="Overrides --warmup_ratio.")
    training.add_argument("--num_train_epochs", type=float, default=1.0)
    training.add_argument("--max_train_steps", type=int, help="Overrides --num_train_epochs.")
    training.add_argument("--eval_steps", type=int, help="Also evaluate every N optimizer steps.")
    training.add_argument("--logging_steps", type=int, default=10)
    training.add_argument("--checkpointing_steps", type=int, help="Save a resumable checkpoint every N steps.")
    training.add_argument("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints.")
    training.add_argument("--resume_from_checkpoint", help='"latest" (newest complete one, if any) or a path.')
    training.add_argument("--nan_policy", default="stop", choices=["stop", "skip"],
                          help="On a NaN/inf loss: stop the run, or skip that optimizer step.")
    training.add_argument("--report_to", nargs="+", default=["none"],
                          help="Experiment trackers, as accelerate supports them: tensorboard, wandb, mlflow, trackio, "
                               "comet_ml, aim, clearml, dvclive, swanlab (several, or comma-separated), all (every one "
                               "installed) or none. A tracker whose package is missing is an error.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", help="Repository id (default: the output folder's name in your namespace).")
    hub.add_argument("--hub_token", help="Defaults to HF_TOKEN or the logged-in token.")
    hub.add_argument("--hub_private", action="store_true")
    hub.add_argument("--license", type=hub_license, metavar="LICENSE",
                     help="The model card's licence, a Hub licence id such as apache-2.0, mit or cc-by-4.0 (default: "
                          "the towers' common licence, or the initial checkpoint's).")
    return parser


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """The train command's arguments (default: the command line), checked and normalised ("none" -> None).

    Example:
    ```python
    >>> parse_args(["--eval_split", "none"]).eval_split is None
    True
    ```
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # Unset, the architecture follows the catalogue: text_only when it has no image column (`check_catalogue`).
    args.architecture_given = args.architecture is not None
    args.architecture = args.architecture or DEFAULT_ARCHITECTURE
    if args.eval_split.lower() == "none":
        args.eval_split = None
    # The column flags as names (None: turned off); `check_catalogue` fits them to the catalogue.
    args.explicit_columns = explicit_columns(args)
    args.catalogue_columns = catalogue_columns_from_args(args)
    _set_column_args(args, args.catalogue_columns)
    if args.mini_batch_size is not None and args.mini_batch_size < 1:
        parser.error("--mini_batch_size must be positive")
    if not 0.0 <= args.visual_word_dropout <= 1.0:
        parser.error(f"--visual_word_dropout must lie in [0, 1], got {args.visual_word_dropout}")
    if args.visual_word_restoration is not None and not args.visual_word_restoration >= 0:
        parser.error(f"--visual_word_restoration must be >= 0, got {args.visual_word_restoration}")
    if args.text_tower_anchor is not None and not args.text_tower_anchor >= 0:
        parser.error(f"--text_tower_anchor must be >= 0, got {args.text_tower_anchor}")
    if args.text_tower_anchor and args.mini_batch_size:
        parser.error("--text_tower_anchor does not combine with --mini_batch_size (GradCache); drop one of them")
    if not args.model_name_or_path:
        # A new model's architecture and fusion are known before it is built: the settings that need an image
        # fusion are refused now, by the same rules the run applies to the built model.
        fusion = args.fusion or (DEFAULT_4TOWER_FUSION if args.architecture == "4tower" else DEFAULT_3TOWER_FUSION)
        planned = SimpleNamespace(architecture=args.architecture, fusion=fusion,
                                  uses_images=args.architecture != "text_only")
        for resolve, requested in ((restoration_weight, args.visual_word_restoration),
                                   (text_tower_anchor_weight, args.text_tower_anchor),
                                   (image_branch_weight, args.image_branch_weight)):
            try:
                resolve(requested, planned)
            except ValueError as error:
                parser.error(str(error))
    if not 0.0 <= args.visual_tag_min_probability <= 1.0:
        parser.error(f"--visual_tag_min_probability must lie in [0, 1], got {args.visual_tag_min_probability}")
    if args.visual_tags and args.architecture == "text_only" and not args.model_name_or_path:
        parser.error("--visual_tags reads colours off product images: it needs --architecture 3tower or 4tower")
    if args.tag_among_named_colours and (args.visual_tags is False or (
            args.architecture == "text_only" and not args.model_name_or_path)):
        parser.error("--tag_among_named_colours is a setting of the visual-word tagger: it needs --visual_tags "
                     "and --architecture 3tower or 4tower")
    if args.visual_tags and (args.freeze_image_towers is False or args.train_dual_text_tower):
        parser.error("--visual_tags reads the features of a frozen image tower: it cannot be combined with "
                     "--train_image_towers or --train_dual_text_tower")
    if args.colour_histogram_levels is not None:
        if not 0 <= args.colour_histogram_levels <= MAX_COLOUR_HISTOGRAM_LEVELS:
            parser.error(f"--colour_histogram_levels must lie in [0, {MAX_COLOUR_HISTOGRAM_LEVELS}], got "
                         f"{args.colour_histogram_levels}")
        if args.model_name_or_path:
            parser.error("--colour_histogram_levels shapes a new model's image features: a checkpoint "
                         "(--model_name_or_path) keeps its own")
        if args.colour_histogram_levels and args.architecture == "text_only":
            parser.error("--colour_histogram_levels describes product photos: it needs --architecture 3tower or 4tower")
    if args.colour_histogram_in_fusion and args.colour_histogram_levels == 0:
        parser.error("--colour_histogram_in_fusion needs a colour description (--colour_histogram_levels N > 0)")
    if args.architecture == "3tower" and args.fusion not in (None, "mlp", "residual"):
        parser.error(f"--fusion {args.fusion} is not a 3tower fusion; 3tower takes mlp or residual")
    if args.architecture == "4tower" and not (args.clip_model or args.model_name_or_path):
        args.clip_model = ALIGN_ON_TRAINING_PRODUCTS
    return args


def _set_column_args(args: argparse.Namespace, columns) -> None:
    """Writes the resolved column names back to `args.<name>_column`, where the trainer reads them."""
    for field in dataclasses.fields(columns):
        if field.name != "attribute_keys":
            setattr(args, f"{field.name}_column", getattr(columns, field.name))


# Flags that must be positive when given, and those that must be >= 0.
_POSITIVE_FLAGS = (
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps",
    "eval_steps", "checkpointing_steps", "checkpoints_total_limit", "max_train_steps", "max_train_products",
    "queries_per_product", "max_eval_queries", "projection_dim", "image_size",
)
_NON_NEGATIVE_FLAGS = (
    "num_hard_negatives", "dataloader_num_workers", "warmup_steps", "tower_learning_rate", "head_learning_rate",
    "weight_decay", "max_grad_norm",
)


def check_flags(args: argparse.Namespace) -> None:
    """The numeric flags, checked before anything runs: step counts and sizes positive, rates and weights finite
    and non-negative, shares within [0, 1], `--report_to` trackers installed.

    Example: `check_flags(parse_args(["--logging_steps", "0"]))` raises `CliError("--logging_steps must be a
    positive integer, got 0")`.
    """
    for name in _POSITIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name} must be a positive integer, got {value}")
    for name in _NON_NEGATIVE_FLAGS:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise CliError(f"--{name} must be a finite number >= 0, got {value}")
    if not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        raise CliError(f"--num_train_epochs must be positive, got {args.num_train_epochs}")
    for name in ("warmup_ratio", "fusion_alpha"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise CliError(f"--{name} must lie in [0, 1], got {value}")
    if not (math.isfinite(args.validation_share) and 0.0 <= args.validation_share < 1.0):
        raise CliError(f"--validation_share must lie in [0, 1), got {args.validation_share}")
    check_image_arguments(args)
    try:
        trackers_for(args.report_to)
    except ValueError as error:
        raise CliError(str(error)) from error


def check_text_tower(args: argparse.Namespace) -> None:
    """`--max_query_length` and `--max_product_length` within the text tower's position embeddings, read from its
    config alone (no weights are loaded).

    Example: `check_text_tower(parse_args(["--max_product_length", "600"]))` raises `CliError`: MiniLM has 512.
    """
    from ..towers import MissingOfflineTowerError
    from ..training.model_builder import resolve_tower

    try:
        tower = args.model_name_or_path or resolve_tower(args.text_model)[0]
    except MissingOfflineTowerError as error:
        raise CliError(f"--text_model {args.text_model}: {error}") from error
    lengths = {"--max_query_length": args.max_query_length, "--max_product_length": args.max_product_length}
    check_text_lengths(lengths, text_tower_positions(tower), tower)


def _derivation_problems(dataset, columns) -> list[BadProduct]:
    """Products from which no query can be derived: they lack an article type."""
    return [
        BadProduct(str(product_id), columns.article_type, "no article type, so no query can be derived", row)
        for row, (product_id, article_type) in enumerate(
            zip(dataset[columns.product_id], dataset[columns.article_type], strict=True)
        )
        if known_value(article_type) is None
    ]


def _bad_products(dataset, columns, trained_on: bool) -> list[BadProduct]:
    """The bad products of a split: ids and texts; queries when it has a query column (where a product may be
    in several rows), else, for the training split, whether a query can be derived."""
    if columns.query is not None and columns.query in dataset.column_names:
        return [
            bad for bad in find_bad_products(dataset, columns, check_queries=True)
            # (query, product) rows repeat products on purpose.
            if not (bad.column == columns.product_id and bad.reason.startswith("duplicate id"))
        ]
    derivation = _derivation_problems(dataset, columns) if trained_on else []
    return sorted(find_bad_products(dataset, columns) + derivation, key=lambda bad: bad.row)


def check_catalogue(args: argparse.Namespace) -> None:
    """The catalogue of `args`, checked before any model is loaded: its splits, its columns (fitted to the
    `--<name>_column` flags and written back to `args`), and its products. A bad product is a `CliError`, or
    with `--skip_bad_rows` it is listed in `<output_dir>/bad_rows.jsonl` and its rows are recorded in
    `args.bad_rows` (`{split: rows}`) for `load_training_data` to leave out.

    Example: `check_catalogue(parse_args(["--dataset", "shop.csv", "--title_column", "name"]))`.
    """
    splits = load_catalogue_splits_from_args(argparse.Namespace(**vars(args), split=None, max_products=None))
    available = f"it has {sorted(splits)}"
    if args.train_split not in splits:
        raise CliError(f"the catalogue has no split {args.train_split!r} (--train_split); {available}")
    if args.eval_split is not None and args.eval_split not in splits and not args.validation_share:
        raise CliError(f"the catalogue has no split {args.eval_split!r} (--eval_split); {available}; pass "
                       "--eval_split none, or --validation_share to hold out part of the training split")
    train = splits[args.train_split]
    columns = columns_for_catalogue(
        args.catalogue_columns, train.column_names, explicit=args.explicit_columns,
        where=f"split {args.train_split!r}", needs_queries=True,
    )
    if columns.query is None:
        # No queries to read: derived ones are written to this column of the training pairs.
        derived = args.catalogue_columns.query or "query"
        columns = dataclasses.replace(columns, query=derived if derived not in train.column_names else "derived_query")
    args.catalogue_columns = columns
    _set_column_args(args, columns)
    check_images_exist(columns, args, where=f"split {args.train_split!r}")
    if columns.image is None and args.architecture != "text_only" and not args.architecture_given:
        print(f"split {args.train_split!r} has no image column: training a text_only model (pass --architecture to "
              "choose another)", file=sys.stderr)
        args.architecture, args.clip_model = "text_only", None
    checked = [args.train_split] + ([args.eval_split] if args.eval_split in splits else [])
    bad = {name: _bad_products(splits[name], columns, trained_on=name == args.train_split) for name in checked}
    all_bad = [product for name in checked for product in bad[name]]
    if all_bad and not args.skip_bad_rows:
        more = f" (and {len(all_bad) - 1} more)" if len(all_bad) > 1 else ""
        raise CliError(f"{all_bad[0].line()}{more}; fix the catalogue or pass --skip_bad_rows")
    args.bad_rows = {name: sorted({product.row for product in bad[name]}) for name in checked if bad[name]}
    if all_bad:
        path = write_bad_rows(Path(args.output_dir) / BAD_ROWS_FILENAME, all_bad)
        print(f"--skip_bad_rows: leaving out {len(all_bad)} bad products, listed in {path}", file=sys.stderr)
    pairs = (len(train) - len(args.bad_rows.get(args.train_split, ())))
    if columns.query not in train.column_names:
        pairs *= args.queries_per_product
    if args.eval_split is not None and args.eval_split not in splits:
        pairs -= math.ceil(args.validation_share * pairs)  # about what the hold-out takes
    if args.max_train_products is not None:
        pairs = min(pairs, args.max_train_products * args.queries_per_product)
    if pairs < args.per_device_train_batch_size:
        raise CliError(f"--per_device_train_batch_size {args.per_device_train_batch_size} is more than the about "
                       f"{max(pairs, 0)} training pairs of split {args.train_split!r}; lower it")


def run(argv=None, prog: str | None = None) -> dict:
    """Train with `argv` (default: the command line); returns what `results.json` holds, raises on failure
    (`CliError` for bad flags or a bad catalogue, before any model is loaded).

    Example:
    ```python
    >>> results = run(["--output_dir", "outputs/main_job", "--max_train_steps", "10"])
    >>> results["training"]["completed_steps"]
    10
    ```
    """
    args = parse_args(argv, prog)
    check_flags(args)
    check_text_tower(args)
    check_catalogue(args)
    return run_training(args)


def main(argv=None, prog: str | None = None) -> int:
    """The `mmretrieval train` command: trains with `argv` and returns the exit status (0; 2 with one error line on
    stderr for bad flags or a bad catalogue, found before any model is loaded; 1 for a non-finite loss or a
    checkpoint of other settings).

    Example:
    ```python
    >>> main(["--output_dir", "outputs/main_job"])
    0
    ```
    """
    try:
        run(argv, prog)
    except (CliError, ImageFailureError, AlignmentError, VisualTaggerError, TextTowerAnchorError,
            VisualWordRestorationError, ImageBranchWeightError) as error:
        # ImageFailureError: --strict_images (or too many failed images) found while caching or training.
        print(f"{prog or Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Runs the command line and exits with its status (`examples/train.py`)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
