"""Configuration for multimodal product retrievers (text-only, 4tMM and 3tMM).

The three architectures follow "Multimodal Semantic Retrieval for Product Search" (Liu & Lopez Ramos,
arXiv:2501.07365):

* ``text_only``: a bi-encoder; query = T(query), product = T(product text).
* ``4tower`` (4tMM): query = [T(query) ; D_text(query)], product = [T(product text) ; D_image(image)],
  where D is an aligned text-image dual encoder (CLIP, SigLIP or a `VisionTextDualEncoderModel`),
  fused by ``concat``, ``alpha_concat`` or a jointly trained ``mlp``.
* ``3tower`` (3tMM): query = T(query), product = MLP([T(product text) ; V(image)]) mapped into the query
  space, where V is a standalone vision tower (CLIP vision, SigLIP vision, DINOv2, ViT).
"""

import math
import re

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

ARCHITECTURES = ("text_only", "4tower", "3tower")
FUSIONS = ("concat", "alpha_concat", "mlp", "residual")
# Fusions through a learned MLP (they own `query_fusion`/`product_fusion` layers and a missing-image embedding).
MLP_FUSIONS = ("mlp", "residual")
POOLINGS = ("mean", "cls")
# 16 levels is already 4,096 colour cells; more would dwarf the tower's own features.
MAX_COLOUR_HISTOGRAM_LEVELS = 16
# Model types whose models expose both `get_text_features` and `get_image_features` in one space.
DUAL_ENCODER_MODEL_TYPES = ("clip", "siglip", "siglip2", "vision-text-dual-encoder", "chinese_clip", "altclip")
# A Hub model id ("name" or "owner/name"); anything else in a `_name_or_path` is a local path.
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def without_local_paths(settings):
    """`settings` (a config dict, at any depth) with every `_name_or_path` that is a local path blanked.

    The towers' sub-configs remember the folder each tower was loaded from; saved as is, config.json would carry
    the training machine's absolute paths (cache, virtual environment, data folders) to the Hub. Hub ids are kept:
    they say where a tower came from. Loading never reads these fields.

    Example:
    ```python
    >>> without_local_paths({"text_config": {"_name_or_path": "/home/me/.cache/minilm", "hidden_size": 384}})
    {'text_config': {'_name_or_path': '', 'hidden_size': 384}}
    ```
    """
    if isinstance(settings, dict):
        return {
            key: "" if key == "_name_or_path" and isinstance(value, str) and not _HUB_MODEL_ID.match(value)
            else without_local_paths(value)
            for key, value in settings.items()
        }
    if isinstance(settings, list):
        return [without_local_paths(value) for value in settings]
    return settings


@strict
class MultimodalRetrievalConfig(PreTrainedConfig):
    r"""
    Configuration of a [`MultimodalRetrievalModel`].

    Args:
        architecture (`str`, defaults to `"text_only"`):
            `"text_only"`, `"4tower"` (text tower + aligned dual encoder) or `"3tower"` (text tower + vision
            tower fused by an MLP on the product side).
        text_config (`dict` or `PreTrainedConfig`):
            Config of the query text tower (any `AutoModel` text encoder: BERT, MiniLM, ...). Also the
            product text tower when `share_text_towers=True`.
        product_text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of a separate product text tower, used only when `share_text_towers=False`. Defaults
            to a copy of `text_config`.
        dual_encoder_config (`dict` or `PreTrainedConfig`, *optional*):
            Aligned text-image dual encoder for `"4tower"` (CLIP, SigLIP, `VisionTextDualEncoderModel`).
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Standalone vision tower for `"3tower"` (CLIP vision, SigLIP vision, DINOv2, ViT).
        share_text_towers (`bool`, defaults to `True`):
            Query and product text go through one set of text-tower weights (saved once).
        freeze_image_towers (`bool`, defaults to `True`):
            Freeze the vision tower (3tower) or the whole dual encoder (4tower), as in the paper. Frozen
            towers run in eval mode without autograd, and their features may be precomputed.
        train_dual_text_tower (`bool`, defaults to `False`):
            4tower only: with `freeze_image_towers=True`, still train the dual encoder's text tower and its
            projections while its vision tower stays locked (LiT-style alignment of a text tower to a frozen
            image tower).
        pooling (`str`, defaults to `"mean"`):
            How the text tower's token states become one vector: `"mean"` (masked mean) or `"cls"`.
        projection_dim (`int`, *optional*):
            Size of a linear projection after the text tower. `None` keeps the tower's hidden size and
            adds no parameters.
        fusion (`str`, defaults to `"concat"`):
            4tower fusion: `"concat"` of the normalised halves, `"alpha_concat"` (alpha * v1 ⊕ (1 - alpha)
            * v2), a jointly trained `"mlp"` (the paper's fusions), or `"residual"`: the normalised text vector
            plus an MLP of `[text ; other]` whose last layer starts at zero, so a new model ranks exactly as
            its text tower does and the image can only add what training finds useful. 3tower fuses the
            product side with `"mlp"` or `"residual"`.
        fusion_alpha (`float`, defaults to 0.5):
            Weight of the text-tower half in `"alpha_concat"`; `0.0` ranks by the dual encoder alone.
        fusion_hidden_size (`int`, defaults to 512):
            Hidden width of the fusion MLP.
        fusion_num_layers (`int`, defaults to 2):
            Number of linear layers in the fusion MLP (GELU between them).
        fusion_output_dim (`int`, *optional*):
            Output size of the 4tower `"mlp"` fusion (defaults to the text embedding size). 3tower always maps
            products into the query space, and `"residual"` always outputs the text embedding size.
        fusion_dropout (`float`, defaults to 0.0):
            Dropout inside the fusion MLP.
        image_branch_weight (`float`, defaults to 1.0):
            Weight on what a `"residual"` fusion's MLP adds to the text vector (`text + weight * MLP([text ;
            other])`): 1 as trained, 0 the text towers alone. The train command sets it on the final model
            (`--image_branch_weight`); see `MultimodalRetrievalModel.set_image_branch_weight`.
        logit_scale_init_value (`float`, defaults to 20.0):
            Initial `scale = 1 / temperature` of the NT-Xent loss (20.0 is temperature 0.05).
        learn_logit_scale (`bool`, defaults to `True`):
            Train the scale (stored as its log) or keep it fixed.
        max_logit_scale (`float`, defaults to 100.0):
            Upper clamp of the learned scale, as in CLIP.
        max_query_length (`int`, defaults to 32):
            Maximum query length in text-tower tokens.
        max_product_length (`int`, defaults to 128):
            Maximum product text length in text-tower tokens.
        product_text_fields (`list[str]`, defaults to `["title", "description"]`):
            Product fields joined into the product text, in order.
        visual_tags (`list[str]`, *optional*):
            Vocabulary of the visual-word tagger (e.g. the catalogue's colours): words read off a product's image
            features and written into its text tokens when the text names no colour (see `VisualWordTagger`).
            `None` (the default) has no tagger. Set by `training.visual_tagger.fit_visual_tagger`, with:
        visual_tag_token_ids (`list[list[int]]`, *optional*):
            Each tag's token ids in the product tokenizer (no special tokens).
        visual_tag_mention_token_ids (`list[list[int]]`, *optional*):
            Token ids of the colour phrases whose presence in a product text means it already names its colour.
        visual_tag_named_token_ids (`list[list[list[int]]]`, *optional*):
            Each tag's forms (token id sequences) as a product text names it. When given, a text naming several of
            the tags ("navy blue and white striped") also gets a tag: the one of those it names that the image
            favours. `None` (the default, and checkpoints saved before it) leaves such texts alone.
        visual_tag_end_token_id (`int`, *optional*):
            The token closing a product sequence (BERT's `[SEP]`); tags are written before it.
        visual_tag_pad_token_id (`int`, defaults to 0):
            Padding id of the product tokenizer.
        visual_tag_min_probability (`float`, defaults to 0.5):
            A tag is written only when the tagger gives it more than this probability (at least 1 / number of tags).
        colour_histogram_levels (`int`, defaults to 0):
            When above 0, `get_image_features` appends a description of the image's colours to the image tower's
            features: the share of the foreground (not near-white) pixels in each of `levels**3` RGB cells, square-
            rooted, then their mean and standard deviation per channel. Image towers trained with colour jitter
            (DINOv2) barely keep colour, which a photo of a product shows plainly. The visual-word tagger reads it,
            and the `mlp`/`residual` fusions too when `colour_histogram_in_fusion`; concatenations and image queries
            keep the tower's features alone.
        colour_histogram_in_fusion (`bool`, defaults to `False`):
            Whether the `mlp`/`residual` fusions read the colour description too, or only the visual-word tagger does.
        colour_histogram_pixel_mean (`list[float]`, *optional*), colour_histogram_pixel_std (`list[float]`, *optional*):
            The image processor's per-channel normalisation, undone to recover the pixels' colours in [0, 1]; required
            when `colour_histogram_levels > 0`.

    Example:

    ```python
    >>> from transformers import BertConfig, Dinov2Config
    >>> from modeling_mmretrieval import MultimodalRetrievalConfig, MultimodalRetrievalModel
    >>> config = MultimodalRetrievalConfig(
    ...     architecture="3tower",
    ...     text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                            intermediate_size=64),
    ...     vision_config=Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                                image_size=28, patch_size=14),
    ... )
    >>> model = MultimodalRetrievalModel(config)
    ```
    """

    model_type = "mmretrieval"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "product_text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
        "dual_encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="clip", optional=True),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", optional=True),
    }

    architecture: str = "text_only"
    text_config: PreTrainedConfig | dict | None = None
    product_text_config: PreTrainedConfig | dict | None = None
    dual_encoder_config: PreTrainedConfig | dict | None = None
    vision_config: PreTrainedConfig | dict | None = None
    share_text_towers: bool = True
    freeze_image_towers: bool = True
    train_dual_text_tower: bool = False
    pooling: str = "mean"
    projection_dim: int | None = None
    fusion: str = "concat"
    fusion_alpha: float = 0.5
    fusion_hidden_size: int = 512
    fusion_num_layers: int = 2
    fusion_output_dim: int | None = None
    fusion_dropout: float = 0.0
    image_branch_weight: float = 1.0
    logit_scale_init_value: float = 20.0
    learn_logit_scale: bool = True
    max_logit_scale: float = 100.0
    max_query_length: int = 32
    max_product_length: int = 128
    product_text_fields: list[str] | None = None
    visual_tags: list[str] | None = None
    visual_tag_token_ids: list[list[int]] | None = None
    visual_tag_mention_token_ids: list[list[int]] | None = None
    visual_tag_named_token_ids: list[list[list[int]]] | None = None
    visual_tag_end_token_id: int | None = None
    visual_tag_pad_token_id: int = 0
    visual_tag_min_probability: float = 0.5
    colour_histogram_levels: int = 0
    colour_histogram_pixel_mean: list[float] | None = None
    colour_histogram_pixel_std: list[float] | None = None
    colour_histogram_in_fusion: bool = False

    def __post_init__(self, **kwargs):
        if self.product_text_fields is None:
            self.product_text_fields = ["title", "description"]
        super().__post_init__(**kwargs)
        if not self.share_text_towers and self.product_text_config is None:
            self.product_text_config = self.text_config.__class__(**self.text_config.to_dict())

    # Validators run after __init__ (huggingface_hub `strict`): each raises a ValueError naming the setting.
    def validate_choices(self):
        for name, value, allowed in (
            ("architecture", self.architecture, ARCHITECTURES),
            ("fusion", self.fusion, FUSIONS),
            ("pooling", self.pooling, POOLINGS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}={value!r}` is not supported; choose one of {list(allowed)}.")

    def validate_towers(self):
        if self.architecture == "4tower":
            if self.dual_encoder_config is None:
                raise ValueError(
                    "`architecture='4tower'` needs `dual_encoder_config`: an aligned text-image model such as "
                    "CLIP, SigLIP or a VisionTextDualEncoderModel."
                )
            if self.dual_encoder_config.model_type not in DUAL_ENCODER_MODEL_TYPES:
                raise ValueError(
                    f"`dual_encoder_config` has model_type {self.dual_encoder_config.model_type!r}; 4tower needs an "
                    f"aligned text-image dual encoder, one of {list(DUAL_ENCODER_MODEL_TYPES)}. For a standalone "
                    "vision model use `architecture='3tower'` with `vision_config`."
                )
            if self.vision_config is not None:
                raise ValueError("`architecture='4tower'` takes `dual_encoder_config`, not `vision_config`.")
        elif self.architecture == "3tower":
            if self.vision_config is None:
                raise ValueError(
                    "`architecture='3tower'` needs `vision_config` (e.g. CLIP vision, SigLIP vision, DINOv2)."
                )
            if self.dual_encoder_config is not None:
                raise ValueError("`architecture='3tower'` takes `vision_config`, not `dual_encoder_config`.")
            if self.fusion not in MLP_FUSIONS:
                raise ValueError(
                    f"`architecture='3tower'` maps products into the query space with an MLP; `fusion` must be "
                    f"one of {list(MLP_FUSIONS)}, got {self.fusion!r}."
                )
        elif self.dual_encoder_config is not None or self.vision_config is not None:
            raise ValueError(
                "`architecture='text_only'` takes no image tower; set `architecture='4tower'` (dual encoder) "
                "or `'3tower'` (vision tower)."
            )

    def validate_dual_text_training(self):
        if self.train_dual_text_tower and self.architecture != "4tower":
            raise ValueError("`train_dual_text_tower=True` needs `architecture='4tower'` (a dual encoder).")

    def validate_text_towers(self):
        if self.share_text_towers and self.product_text_config is not None:
            raise ValueError(
                "`product_text_config` is given but `share_text_towers=True`; set `share_text_towers=False` to "
                "use a separate product text tower."
            )
        if (
            not self.share_text_towers
            and self.projection_dim is None
            and self.product_text_config.hidden_size != self.text_config.hidden_size
        ):
            raise ValueError(
                f"Separate text towers of different widths ({self.text_config.hidden_size} vs "
                f"{self.product_text_config.hidden_size}) need `projection_dim` to meet in one space."
            )

    def validate_numbers(self):
        if not 0.0 <= self.fusion_alpha <= 1.0:
            raise ValueError(f"`fusion_alpha` must lie in [0, 1], got {self.fusion_alpha}.")
        if self.logit_scale_init_value <= 0 or self.logit_scale_init_value > self.max_logit_scale:
            raise ValueError(
                f"`logit_scale_init_value` (scale = 1 / temperature) must lie in (0, max_logit_scale="
                f"{self.max_logit_scale}], got {self.logit_scale_init_value}."
            )
        for name in ("max_query_length", "max_product_length", "fusion_hidden_size", "fusion_num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in ("projection_dim", "fusion_output_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be a positive integer or None, got {value}.")
        if self.fusion == "residual" and self.fusion_output_dim is not None:
            raise ValueError(
                "`fusion='residual'` adds the fusion MLP's output to the text vector, so its size is the text "
                f"embedding's; leave `fusion_output_dim` unset (got {self.fusion_output_dim})."
            )
        if not 0.0 <= self.fusion_dropout < 1.0:
            raise ValueError(f"`fusion_dropout` must lie in [0, 1), got {self.fusion_dropout}.")
        if not (math.isfinite(self.image_branch_weight) and self.image_branch_weight >= 0):
            raise ValueError(f"`image_branch_weight` must be 0 or more, got {self.image_branch_weight}.")
        if not self.product_text_fields or not all(isinstance(f, str) and f for f in self.product_text_fields):
            raise ValueError(f"`product_text_fields` must be a non-empty list of column names, got "
                             f"{self.product_text_fields!r}.")

    def validate_visual_tags(self):
        if not self.visual_tags:
            return
        if not self.uses_images:
            raise ValueError("`visual_tags` are read off product images; `architecture='text_only'` has none.")
        token_ids = self.visual_tag_token_ids or []
        if len(token_ids) != len(self.visual_tags) or not all(ids for ids in token_ids):
            raise ValueError(
                f"`visual_tag_token_ids` must give a non-empty token list for each of the {len(self.visual_tags)} "
                f"`visual_tags`, got {len(token_ids)} lists."
            )
        mention_ids = self.visual_tag_mention_token_ids
        if not isinstance(mention_ids, list) or not all(isinstance(ids, list) for ids in mention_ids):
            raise ValueError("`visual_tag_mention_token_ids` must be a list of token lists (it may be empty).")
        named_ids = self.visual_tag_named_token_ids
        if named_ids is not None and not (
            isinstance(named_ids, list) and len(named_ids) == len(self.visual_tags)
            and all(isinstance(forms, list) and all(isinstance(ids, list) for ids in forms) for forms in named_ids)
        ):
            raise ValueError(
                f"`visual_tag_named_token_ids` must give a list of token lists for each of the {len(self.visual_tags)} "
                "`visual_tags` (or be None)."
            )
        if not 1.0 / len(self.visual_tags) <= self.visual_tag_min_probability < 1.0:
            raise ValueError(
                f"`visual_tag_min_probability` must lie in [1 / {len(self.visual_tags)} tags, 1), so that a tagger that "
                f"cannot tell the tags apart writes nothing; got {self.visual_tag_min_probability}."
            )

    def validate_colour_histogram(self):
        levels = self.colour_histogram_levels
        if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= MAX_COLOUR_HISTOGRAM_LEVELS:
            raise ValueError(f"`colour_histogram_levels` must be an integer in [0, {MAX_COLOUR_HISTOGRAM_LEVELS}], got "
                             f"{levels!r}.")
        if not levels:
            return
        if not self.uses_images:
            raise ValueError("`colour_histogram_levels` describes product images; `architecture='text_only'` has none.")
        for name in ("colour_histogram_pixel_mean", "colour_histogram_pixel_std"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"`{name}` must be the image processor's three per-channel values, got {value!r}.")
        if not all(value > 0 for value in self.colour_histogram_pixel_std):
            raise ValueError(f"`colour_histogram_pixel_std` must be positive, got {self.colour_histogram_pixel_std}.")

    @property
    def uses_images(self) -> bool:
        return self.architecture != "text_only"

    def to_dict(self) -> dict:
        # Every serialisation (config.json, the Hub) goes through here: local tower paths stay on this machine.
        return without_local_paths(super().to_dict())


__all__ = ["MultimodalRetrievalConfig"]
