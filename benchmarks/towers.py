"""The towers every case is measured with, and how many FLOPs they spend.

`offline` towers are the real pretrained ones available without the Hub: all-MiniLM-L6-v2 (text) and
DINOv2-small (vision), with a `VisionTextDualEncoderModel` built from both as the 4tMM dual encoder (no
CLIP weights exist offline). `tiny` towers keep the real tokenizer and image preprocessing but shrink the
encoders to a couple of narrow layers, for smoke runs.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    Dinov2Config,
    Dinov2Model,
    PreTrainedModel,
    VisionTextDualEncoderModel,
)

from stand_in_towers import is_stand_in

from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.towers import get_dinov2_small_path, get_minilm_path

TOWER_KINDS = ("offline", "tiny")
ARCHITECTURES = ("text_only", "4tower", "3tower")
MAX_QUERY_LENGTH = 32
MAX_PRODUCT_LENGTH = 128


def _tiny_text_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=512,
    )


def _tiny_vision_config(image_size: int) -> Dinov2Config:
    return Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=image_size, patch_size=14
    )


@dataclass
class Towers:
    """Factories of fresh tower instances plus the tokenizer and image processor that go with them."""

    kind: str
    tokenizer: object
    image_processor: object
    seed: int = 0
    stand_in_weights: bool = False  # offline towers with random weights (benchmarks/stand_in_towers.py)

    @classmethod
    def load(cls, kind: str) -> "Towers":
        if kind not in TOWER_KINDS:
            raise ValueError(f"towers must be one of {TOWER_KINDS}, got {kind!r}")
        tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
        image_processor = AutoImageProcessor.from_pretrained(get_dinov2_small_path())
        stand_in = kind == "offline" and (is_stand_in(get_minilm_path()) or is_stand_in(get_dinov2_small_path()))
        return cls(kind, tokenizer, image_processor, stand_in_weights=stand_in)

    @property
    def image_size(self) -> int:
        return self.image_processor.crop_size["height"]

    def text_tower(self) -> PreTrainedModel:
        if self.kind == "offline":
            return AutoModel.from_pretrained(get_minilm_path(), attn_implementation="sdpa")
        torch.manual_seed(self.seed)
        return BertModel(_tiny_text_config(len(self.tokenizer)), add_pooling_layer=True)

    def vision_tower(self) -> PreTrainedModel:
        if self.kind == "offline":
            return AutoModel.from_pretrained(get_dinov2_small_path(), attn_implementation="sdpa")
        torch.manual_seed(self.seed + 1)
        return Dinov2Model(_tiny_vision_config(self.image_size))

    def dual_encoder(self) -> PreTrainedModel:
        torch.manual_seed(self.seed + 2)
        return VisionTextDualEncoderModel(vision_model=self.vision_tower(), text_model=self.text_tower())

    def image_tower(self, architecture: str) -> PreTrainedModel | None:
        """A fresh image tower for `architecture`: the dual encoder (4tMM), the vision tower (3tMM) or none."""
        if architecture == "4tower":
            return self.dual_encoder()
        if architecture == "3tower":
            return self.vision_tower()
        return None

    def retrieval_model(self, architecture: str, **config_kwargs) -> MultimodalRetrievalModel:
        """Our model with these towers (pretrained weights kept; fusion and projections initialised), with the
        speedups the trainer applies."""
        text_tower, image_tower = self.text_tower(), self.image_tower(architecture)
        torch.manual_seed(self.seed + 3)
        model = MultimodalRetrievalModel.from_towers_pretrained(
            text_tower,
            image_tower,
            architecture=architecture,
            max_query_length=MAX_QUERY_LENGTH,
            max_product_length=MAX_PRODUCT_LENGTH,
            **config_kwargs,
        )
        speedups.apply_to_model(model)
        return model

    def processor(self, architecture: str, fast_image_processing: bool = True) -> MultimodalRetrievalProcessor:
        """Our processor, with the batched image path the trainer and indexer apply (unless told not to)."""
        processor = MultimodalRetrievalProcessor(
            self.tokenizer,
            image_processor=self.image_processor if architecture != "text_only" else None,
            dual_tokenizer=self.tokenizer if architecture == "4tower" else None,
            max_query_length=MAX_QUERY_LENGTH,
            max_product_length=MAX_PRODUCT_LENGTH,
        )
        speedups.apply_to_processor(processor, fast_image_processing)
        return processor


class PaddedToMaxLengthProcessor(MultimodalRetrievalProcessor):
    """The processor without dynamic padding: every text is padded to the maximum length, as fixed-shape
    pipelines (and the baseline) do. Used only to measure what dynamic padding saves."""

    def _tokenize(self, tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))


def without_fast_paths(processor: MultimodalRetrievalProcessor) -> PaddedToMaxLengthProcessor:
    """A copy of `processor` that pads to the maximum length and uses the reference image processor."""
    return PaddedToMaxLengthProcessor(
        processor.tokenizer,
        image_processor=processor.image_processor,
        dual_tokenizer=processor.dual_tokenizer,
        max_query_length=processor.max_query_length,
        max_product_length=processor.max_product_length,
        product_text_fields=processor.product_text_fields,
        fast_image_processing=False,
    )


# ----- FLOPs --------------------------------------------------------------------------------------------------
def _encoder_of(tower: nn.Module) -> nn.Module:
    """The module whose layers every token passes through (BERT/DINOv2 `encoder`, CLIP `*_model.encoder`)."""
    for name in ("encoder", "text_model", "vision_model"):
        module = getattr(tower, name, None)
        if module is not None:
            return module if name == "encoder" else _encoder_of(module)
    raise ValueError(f"Cannot find the encoder of {type(tower).__name__}.")


def transformer_flops(tower: PreTrainedModel, sequence_lengths: Sequence[int]) -> float:
    """Useful forward FLOPs of an encoder over sequences of the given (unpadded) lengths.

    2 FLOPs per multiply-add: every token goes through each layer's linear maps, and attention costs
    4 * length^2 * hidden per layer (scores and weighted values). Embedding look-ups, norms, activations
    and the pooler are left out (under 1% for these towers).
    """
    encoder = _encoder_of(tower)
    config = tower.config
    per_token = sum(module.weight.numel() for module in encoder.modules() if isinstance(module, nn.Linear))
    attention = 4 * config.num_hidden_layers * config.hidden_size
    return float(sum(2 * per_token * length + attention * length * length for length in sequence_lengths))


def vision_flops(tower: PreTrainedModel, num_images: int, image_size: int) -> float:
    """Useful forward FLOPs of a ViT-style tower (DINOv2, CLIP vision) on `num_images` square images of
    `image_size` pixels (the processor's crop, not the size the position table was trained for)."""
    config = tower.config
    patches = (image_size // config.patch_size) ** 2
    tokens = patches + 1 + getattr(config, "num_register_tokens", 0)
    convolutions = (module for module in tower.modules() if isinstance(module, nn.Conv2d))
    patch_embedding = sum(2 * module.weight.numel() * patches for module in convolutions)
    return transformer_flops(tower, [tokens] * num_images) + patch_embedding * num_images


def product_tower_flops(
    model: MultimodalRetrievalModel, text_lengths: Sequence[int], num_images: int, image_size: int
) -> float:
    """Forward FLOPs of the towers that embed products: the text tower plus, for 4tMM/3tMM, the image tower."""
    flops = transformer_flops(model.product_text_model or model.text_model, text_lengths)
    if model.dual_encoder is not None:
        flops += vision_flops(model.dual_encoder.vision_model, num_images, image_size)
    elif model.vision_model is not None:
        flops += vision_flops(model.vision_model, num_images, image_size)
    return flops
