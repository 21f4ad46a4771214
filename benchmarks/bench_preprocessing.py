"""Case 4: image preprocessing (images/s), decode included, on the real 60x80 catalogue JPEGs.

The processor's batched path (`fast_image_processing=True`) against transformers' per-image PIL
processors with the same settings: CLIP's (224 shortest edge, 224 crop) and DINOv2's (BiT: 256, 224).
"""

import torch
from common import CaseResult, Check, Context, Row, Target
from measure import keeping_results, measure_interleaved, paired_ratio
from transformers import CLIPImageProcessorPil

from modeling_mmretrieval import MultimodalRetrievalProcessor, speedups
from modeling_mmretrieval.speedups.fast_image_processing import FastImageProcessor, pixel_value_tolerance
from modeling_mmretrieval.data.images import load_product_image

IMAGES_PER_CALL = 64
PREPROCESSING_SPEEDUP_TARGET = 3.0


def catalogue_jpegs(ctx: Context, count: int) -> list[dict]:
    """Encoded product images (`{"bytes", "path"}`) of the validation split."""
    split = ctx.catalogue["validation"]
    return split.select(range(min(count, len(split))))["image"]


def _decode(encoded_images: list[dict]) -> list:
    return [load_product_image(encoded, on_error="raise").image for encoded in encoded_images]


def _in_calls(preprocess, encoded_images: list[dict]):
    """Decodes and preprocesses the images `IMAGES_PER_CALL` at a time (one collator batch each)."""

    def run() -> torch.Tensor:
        return torch.cat([
            preprocess(_decode(encoded_images[start : start + IMAGES_PER_CALL]))
            for start in range(0, len(encoded_images), IMAGES_PER_CALL)
        ])

    return run


def _settings_case(ctx: Context, name: str, reference, encoded_images: list[dict]) -> CaseResult:
    processor = MultimodalRetrievalProcessor(ctx.towers.tokenizer, image_processor=reference)
    speedups.apply_to_processor(processor, fast_image_processing=True)
    run_reference = _in_calls(
        lambda images: reference(images=images, return_tensors="pt")["pixel_values"], encoded_images
    )
    run_fast = _in_calls(lambda images: processor.encode_images(images)["pixel_values"], encoded_images)

    reference_name = type(reference).__name__
    timed_variants, outputs = keeping_results({reference_name: run_reference, "fast": run_fast})
    samples = measure_interleaved(timed_variants, ctx.repeats, torch.device("cpu"))
    difference = (outputs[reference_name] - outputs["fast"]).abs()
    tolerance = pixel_value_tolerance(FastImageProcessor.from_image_processor(reference))
    result = CaseResult()
    result.checks.append(Check(
        f"preprocessing/{name}: fast path matches {reference_name}",
        difference.max().item() <= tolerance,
        f"max |diff| {difference.max().item():.4f} <= {tolerance:.4f} (2 levels of 255 through the normalisation); "
        f"{100 * (difference > 1e-5).float().mean().item():.2f}% of values differ at all",
    ))
    count = len(encoded_images)
    for variant, label in ((reference_name, reference_name), ("fast", "processor fast path")):
        result.rows.append(Row.from_samples("preprocessing", f"{name}/{label}", samples[variant], count, "images/s"))
    result.targets.append(Target(
        f"preprocessing {name}: images/s vs {reference_name}",
        paired_ratio(samples[reference_name], samples["fast"]),
        PREPROCESSING_SPEEDUP_TARGET,
        f"{count} real JPEGs, decode included, {IMAGES_PER_CALL} per call",
    ))
    return result


def run(ctx: Context) -> CaseResult:
    encoded_images = catalogue_jpegs(ctx, 64 if ctx.quick else 512)
    result = CaseResult()
    for name, reference in (("clip", CLIPImageProcessorPil()), ("dinov2", ctx.towers.image_processor)):
        result.extend(_settings_case(ctx, name, reference, encoded_images))
    return result
