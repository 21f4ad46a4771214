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

Every flag is described in docs/training.md; the run itself is `modeling_mmretrieval.training.trainer`.
"""

import argparse
import sys

from ..data import SAMPLE_DATA_DIR
from ..training.checkpoints import CheckpointMismatchError
from ..training.model_builder import DEFAULT_3TOWER_FUSION, DEFAULT_DINOV2_IMAGE_SIZE, DEFAULT_VISUAL_WORD_DROPOUT
from ..training.optimization import SCHEDULER_TYPES, NonFiniteLossError
from ..training.trainer import run_training


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
    model.add_argument("--architecture", default="3tower", choices=["text_only", "4tower", "3tower"])
    model.add_argument("--text_model", default="minilm", help='Text tower (Hub id, folder, or "minilm" offline).')
    model.add_argument("--vision_model", default="dinov2-small",
                       help='3tower vision tower (Hub id, folder, or "dinov2-small" offline).')
    model.add_argument("--clip_model", help="4tower aligned dual encoder (CLIP/SigLIP Hub id or folder).")
    model.add_argument("--fusion", choices=["concat", "alpha_concat", "mlp", "residual"],
                       help="4tower: concat (default), alpha_concat, mlp (the paper's) or residual; 3tower: "
                            f"{DEFAULT_3TOWER_FUSION} (default) or mlp (the paper's). residual starts as the text "
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
    data.add_argument("--product_id_column", default="product_id")
    data.add_argument("--title_column", default="title")
    data.add_argument("--description_column", default="description", help='"none" if the catalogue has none.')
    data.add_argument("--image_column", default="image")
    data.add_argument("--query_column", default="query",
                      help="Queries paired with each row, used when present; otherwise queries are attribute-derived.")
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
    data.add_argument("--max_eval_queries", type=int, default=500,
                      help="Evaluation queries (attribute-derived ones use the held-out phrasing family).")
    data.add_argument("--cache_image_features", dest="cache_image_features", action="store_true", default=None,
                      help="Precompute frozen image-tower features once (default: on when the tower is frozen).")
    data.add_argument("--no_cache_image_features", dest="cache_image_features", action="store_false")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

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
    training.add_argument("--report_to", default="none", choices=["none", "tensorboard"])

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", help="Repository id (default: the output folder's name in your namespace).")
    hub.add_argument("--hub_token", help="Defaults to HF_TOKEN or the logged-in token.")
    hub.add_argument("--hub_private", action="store_true")
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
    if args.eval_split.lower() == "none":
        args.eval_split = None
    if args.description_column.lower() == "none":
        args.description_column = None
    if args.mini_batch_size is not None and args.mini_batch_size < 1:
        parser.error("--mini_batch_size must be positive")
    if not 0.0 <= args.visual_word_dropout <= 1.0:
        parser.error(f"--visual_word_dropout must lie in [0, 1], got {args.visual_word_dropout}")
    if args.architecture == "3tower" and args.fusion not in (None, "mlp", "residual"):
        parser.error(f"--fusion {args.fusion} is not a 3tower fusion; 3tower takes mlp or residual")
    if args.architecture == "4tower" and not (args.clip_model or args.model_name_or_path):
        parser.error("--architecture 4tower needs --clip_model (an aligned CLIP/SigLIP dual encoder)")
    return args


def run(argv=None, prog: str | None = None) -> dict:
    """Train with `argv` (default: the command line); returns what `results.json` holds, raises on failure.

    Example:
    ```python
    >>> results = run(["--output_dir", "outputs/main_job", "--max_train_steps", "10"])
    >>> results["training"]["completed_steps"]
    10
    ```
    """
    return run_training(parse_args(argv, prog))


def main(argv=None, prog: str | None = None) -> int:
    """The `mmretrieval train` command: trains with `argv` and returns the exit status (0, or 1 with an error line
    on stderr for a non-finite loss or a checkpoint of other settings).

    Example:
    ```python
    >>> main(["--output_dir", "outputs/main_job"])
    0
    ```
    """
    try:
        run(argv, prog)
    except (NonFiniteLossError, CheckpointMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """Runs the command line and exits with its status (`examples/train.py`)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
