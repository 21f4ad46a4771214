"""Tiny random tower configs and batches shared by the tests (realistic shapes, seconds to run)."""

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPConfig, CLIPVisionConfig, Dinov2Config, Dinov2Model

from modeling_mmretrieval import MultimodalRetrievalConfig

VOCAB_SIZE = 120
IMAGE_SIZE = 28


def tiny_bert() -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64,
    )


def tiny_clip() -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=IMAGE_SIZE,
            patch_size=14,
        ),
        projection_dim=24,
    )


def tiny_dinov2() -> Dinov2Config:
    return Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=IMAGE_SIZE,
        patch_size=14,
    )


def tiny_clip_vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=IMAGE_SIZE,
        patch_size=14,
    )


# (id, config kwargs): every architecture and every fusion it supports.
ARCHITECTURE_CASES = {
    "text_only": dict(architecture="text_only"),
    "4tower-concat": dict(architecture="4tower", fusion="concat", dual_encoder=tiny_clip),
    "4tower-alpha_concat": dict(architecture="4tower", fusion="alpha_concat", fusion_alpha=0.7, dual_encoder=tiny_clip),
    "4tower-mlp": dict(architecture="4tower", fusion="mlp", fusion_hidden_size=40, dual_encoder=tiny_clip),
    "3tower-dinov2": dict(architecture="3tower", fusion="mlp", fusion_hidden_size=40, vision=tiny_dinov2),
    "3tower-clip-vision": dict(architecture="3tower", fusion="mlp", projection_dim=16, vision=tiny_clip_vision),
    "4tower-residual": dict(architecture="4tower", fusion="residual", fusion_hidden_size=40, dual_encoder=tiny_clip),
    "3tower-residual": dict(architecture="3tower", fusion="residual", fusion_hidden_size=40, vision=tiny_dinov2),
    # The photos' colour description appended to the image features (read by the residual fusion).
    "4tower-residual-colours": dict(architecture="4tower", fusion="residual", fusion_hidden_size=40, dual_encoder=tiny_clip,
                                    colour_histogram_levels=2, colour_histogram_pixel_mean=[0.485, 0.456, 0.406],
                                    colour_histogram_pixel_std=[0.229, 0.224, 0.225]),
}


def make_config(case: str, **overrides) -> MultimodalRetrievalConfig:
    kwargs = dict(ARCHITECTURE_CASES[case])
    dual = kwargs.pop("dual_encoder", None)
    vision = kwargs.pop("vision", None)
    if dual is not None:
        kwargs["dual_encoder_config"] = dual()
    if vision is not None:
        kwargs["vision_config"] = vision()
    kwargs.update(overrides)
    return MultimodalRetrievalConfig(text_config=tiny_bert(), **kwargs)


def make_batch(config: MultimodalRetrievalConfig, num_pairs: int = 4, num_negatives: int = 0, seed: int = 0) -> dict:
    """A fixed training batch; products are the positives then `num_negatives` hard negatives per query."""
    generator = torch.Generator().manual_seed(seed)
    num_products = num_pairs * (1 + num_negatives)

    def token_batch(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(3, VOCAB_SIZE, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[::2, length - 2 :] = 0  # every other row is padded, so masking is exercised
        return ids * mask, mask

    query_ids, query_mask = token_batch(num_pairs, 6)
    product_ids, product_mask = token_batch(num_products, 10)
    batch = dict(
        query_input_ids=query_ids, query_attention_mask=query_mask,
        product_input_ids=product_ids, product_attention_mask=product_mask,
    )
    if config.architecture == "4tower":
        batch["query_dual_input_ids"], batch["query_dual_attention_mask"] = token_batch(num_pairs, 8)
    if config.uses_images:
        batch["pixel_values"] = torch.randn(num_products, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        image_mask = torch.ones(num_products, dtype=torch.bool)
        image_mask[1] = False  # one image-less product in every batch
        batch["image_mask"] = image_mask
    return batch


def query_inputs(batch: dict) -> dict:
    inputs = dict(input_ids=batch["query_input_ids"], attention_mask=batch["query_attention_mask"])
    if "query_dual_input_ids" in batch:
        inputs.update(dual_input_ids=batch["query_dual_input_ids"], dual_attention_mask=batch["query_dual_attention_mask"])
    return inputs


def product_inputs(batch: dict) -> dict:
    inputs = dict(input_ids=batch["product_input_ids"], attention_mask=batch["product_attention_mask"])
    if "pixel_values" in batch:
        inputs.update(pixel_values=batch["pixel_values"], image_mask=batch["image_mask"])
    return inputs


def dinov2_preprocessor(image_size: int = IMAGE_SIZE) -> dict:
    """The DINOv2 evaluation transform (as in the converted DINOv2-small folder), at the tiny tower's size."""
    return {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
    }


def save_tiny_pretrained_towers(root: Path, image_size: int = IMAGE_SIZE, text_layers: int = 2) -> tuple[Path, Path]:
    """Tiny "pretrained" tower folders a model can be composed from: a BERT of the real MiniLM tokenizer's vocabulary
    (saved with that tokenizer, so product texts tokenize as in production) and a DINOv2 with its preprocessor."""
    from modeling_mmretrieval.towers import get_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(get_minilm_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=text_layers,
                         num_attention_heads=2, intermediate_size=48, max_position_embeddings=128)).save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                             image_size=image_size, patch_size=14)).save_pretrained(root / "vision")
    (root / "vision" / "preprocessor_config.json").write_text(json.dumps(dinov2_preprocessor(image_size)))
    return root / "text", root / "vision"


def real_tokenizers(folder: Path):
    """`(MiniLM tokenizer, CLIP tokenizer)`: the real tokenizers of the offline towers (the CLIP one built into `folder`),
    so product texts and queries tokenize as in production."""
    from modeling_mmretrieval.towers import build_clip_tokenizer, get_minilm_path

    return AutoTokenizer.from_pretrained(get_minilm_path()), AutoTokenizer.from_pretrained(build_clip_tokenizer(folder))


def save_tiny_checkpoint(case: str, folder: Path, tokenizers, **processor_settings):
    """A tiny model of `case` (random weights) with the `real_tokenizers`, saved with its processor into `folder`;
    returns `(model, processor)`. `processor_settings` go to `MultimodalRetrievalProcessor` (e.g. `max_product_length`)."""
    from transformers import CLIPImageProcessorPil

    from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor

    tokenizer, clip_tokenizer = tokenizers
    config = make_config(case)
    config.text_config.vocab_size = tokenizer.vocab_size
    dual_tokenizer = None
    if config.architecture == "4tower":
        dual_tokenizer = clip_tokenizer
        dual_text = config.dual_encoder_config.text_config
        dual_text.vocab_size = len(clip_tokenizer)
        dual_text.bos_token_id, dual_text.eos_token_id = clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id
        dual_text.pad_token_id = clip_tokenizer.pad_token_id
    image_processor = None
    if config.uses_images:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    processor = MultimodalRetrievalProcessor(tokenizer, image_processor, dual_tokenizer, max_dual_length=24,
                                             **processor_settings)
    model = MultimodalRetrievalModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def noisy_png(rgb, seed: int, size: tuple[int, int] = (60, 80)) -> bytes:
    """A real PNG filled with the colour plus per-pixel noise (seeded), so no two product photos are alike."""
    import io
    import random

    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", size)
    image.putdata([tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rgb) for _ in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def compose_from_tiny_towers(towers: Path, architecture: str = "3tower", **settings):
    """`(model, processor)` composed from the `save_tiny_pretrained_towers` folders under `towers`, residual fusion,
    eval mode; `settings` go to the model's config."""
    from modeling_mmretrieval import MultimodalRetrievalModel, MultimodalRetrievalProcessor

    settings = {"fusion": "residual", "max_product_length": 32, **settings}
    model = MultimodalRetrievalModel.from_towers_pretrained(
        str(towers / "text"), str(towers / "vision"), architecture=architecture, **settings).eval()
    processor = MultimodalRetrievalProcessor.from_towers_pretrained(str(towers / "text"), str(towers / "vision"),
                                                                    config=model.config)
    return model, processor


def write_csv_catalogue(path: Path, products: list[dict]) -> Path:
    """Writes `products` (dicts with the same keys) as a CSV catalogue at `path`, the way a shop exports one."""
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(products[0]))
        writer.writeheader()
        writer.writerows(products)
    return path
