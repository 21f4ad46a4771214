"""Case 1: training throughput (query-product pairs/s) of our models against the three-tower baseline.

Both sides train the same towers at the same batch size, one optimizer step (forward, backward, AdamW)
per timed repeat, on pre-collated batches of real catalogue pairs. Ours runs with its fast paths: one
shared text tower for the joined product text, frozen image features cached once before training, sdpa
attention, dynamic padding, and text batches run in groups of similar length. The baseline (see
`baseline.py`) has none of them.
"""

import contextlib
import time
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from baseline import ThreeTowerBaseline, baseline_batch
from common import CaseResult, Check, Context, Row, Target
from measure import measure_interleaved, paired_ratio, synchronize
from torch import nn
from towers import ARCHITECTURES, transformer_flops, vision_flops, without_fast_paths

from modeling_mmretrieval import speedups
from modeling_mmretrieval.data.collator import RetrievalCollator
from modeling_mmretrieval.data import CatalogueColumns, make_training_pairs
from modeling_mmretrieval.speedups.length_groups import text_length_groups
from modeling_mmretrieval.training.image_feature_cache import image_features_for_rows

BATCH_SIZE = 32
LOSS_CHECK_PAIRS = 8
LOSS_TOLERANCE = 1e-4
TRAINING_SPEEDUP_TARGET = 3.0


def _batch_size(args: tuple, kwargs: dict) -> int:
    tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)]
    return tensors[0].shape[0] if tensors else 0


@contextlib.contextmanager
def counted_examples(modules: Mapping[str, nn.Module | None]) -> Iterator[Counter]:
    """Counts the examples (batch rows) each named module's forward passes see inside the block, however
    they are split into calls."""
    counts = Counter()
    handles = [
        module.register_forward_pre_hook(
            lambda _, args, kwargs, name=name: counts.update({name: _batch_size(args, kwargs)}), with_kwargs=True
        )
        for name, module in modules.items()
        if module is not None
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _our_towers(model) -> dict[str, nn.Module | None]:
    dual = model.dual_encoder
    return {
        "text": model.text_model,
        "product_text": model.product_text_model,
        "image": dual.vision_model if dual is not None else model.vision_model,
        "dual_text": dual.text_model if dual is not None else None,
    }


def _baseline_towers(baseline: ThreeTowerBaseline) -> dict[str, nn.Module | None]:
    image_tower = baseline.image_tower
    return {
        "query": baseline.query_tower,
        "title": baseline.title_tower,
        "description": baseline.description_tower,
        "image": image_tower.vision_model if baseline.is_dual_encoder else image_tower,
        "dual_text": image_tower.text_model if baseline.is_dual_encoder else None,
    }


def _tower_step_flops(
    tower: nn.Module | None, batch_size: int, padded_lengths: int | list[int], *, image_size: int = 0
) -> float:
    """FLOPs one training step spends in `tower` on `batch_size` inputs: its forward pass, plus the backward
    pass (about twice the forward) when the tower is trained. Padded tokens count: they are computed.
    `padded_lengths` is one length for the whole batch or the length each row was padded to."""
    if tower is None:
        return 0.0
    if image_size:
        forward = vision_flops(tower, batch_size, image_size)
    else:
        lengths = [padded_lengths] * batch_size if isinstance(padded_lengths, int) else padded_lengths
        forward = transformer_flops(tower, lengths)
    trained = any(parameter.requires_grad for parameter in tower.parameters())
    return 3 * forward if trained else forward


def _padded_lengths(model, attention_mask: torch.Tensor) -> list[int]:
    """The width each row is padded to in our towers: its group's (see `length_groups`)."""
    padded = [0] * attention_mask.shape[0]
    for rows, width in text_length_groups(attention_mask, training=model.training):
        for row in rows:
            padded[row] = width
    return padded


def _our_step_flops(model, batch: Mapping[str, torch.Tensor]) -> float:
    """Tower FLOPs of one of our steps on `batch` (image features cached, so no image tower)."""
    towers = _our_towers(model)
    size = len(batch["query_input_ids"])
    flops = _tower_step_flops(towers["text"], size, _padded_lengths(model, batch["query_attention_mask"]))
    product_tower = towers["product_text"] or towers["text"]
    flops += _tower_step_flops(product_tower, size, _padded_lengths(model, batch["product_attention_mask"]))
    if "query_dual_input_ids" in batch:
        flops += _tower_step_flops(towers["dual_text"], size, batch["query_dual_input_ids"].shape[1])
    return flops


def _baseline_step_flops(baseline: ThreeTowerBaseline, inputs: Mapping[str, torch.Tensor], image_size: int) -> float:
    towers = _baseline_towers(baseline)
    size = len(inputs["query_input_ids"])
    flops = sum(
        _tower_step_flops(towers[name], size, inputs[f"{name}_input_ids"].shape[1])
        for name in ("query", "title", "description")
    )
    flops += _tower_step_flops(towers["image"], size, 0, image_size=image_size)
    return flops + _tower_step_flops(towers["dual_text"], size, inputs["query_input_ids"].shape[1])


def training_rows(ctx: Context, count: int) -> list[dict]:
    """`count` (attribute-derived query, product) pairs from the real training split."""
    products = ctx.catalogue["train"].select(range(count))
    pairs = make_training_pairs(products, seed=0)
    return [pairs[position] for position in range(count)]


def _to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def _our_batch(model, processor, rows: list[dict], device) -> tuple[dict, float]:
    """The cached-feature training batch for `rows`, and the seconds the one-time feature cache took."""
    if not model.config.uses_images:
        return _to_device(RetrievalCollator(processor, uses_images=False)(rows), device), 0.0
    synchronize(device)
    start = time.perf_counter()
    # What training does once before its first epoch (examples/train.py, --cache_image_features).
    features = image_features_for_rows(model, processor, rows, CatalogueColumns())
    cache = {row["product_id"]: feature for row, feature in zip(rows, features)}
    synchronize(device)
    cache_seconds = time.perf_counter() - start
    cached = RetrievalCollator(processor, image_features=cache)
    return _to_device(cached(rows), device), cache_seconds


def _optimizer_step(compute_loss, model: nn.Module, ctx: Context):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)

    def step(batch: dict) -> None:
        with ctx.autocast():
            loss = compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _loss_check(model, processor, rows: list[dict], ctx: Context, architecture: str) -> Check:
    """Our fast paths change no number: the loss with sdpa, dynamic padding and cached image features
    equals the loss with eager attention, max-length padding and the image tower run live, on the same
    pixel values (float32, no dropout)."""
    model.eval()
    device = ctx.device
    fast_batch, _ = _our_batch(model, processor, rows, device)
    reference_batch = RetrievalCollator(without_fast_paths(processor), uses_images=False)(rows)
    if model.config.uses_images:
        # The same pixel values the cache was built from: only the tower run (live vs cached) differs.
        live = RetrievalCollator(processor)(rows)
        reference_batch.update(pixel_values=live["pixel_values"], image_mask=live["image_mask"])
    with torch.no_grad():
        fast_loss = model(**fast_batch).loss.item()
        model.set_attn_implementation("eager")
        try:
            reference_loss = model(**_to_device(reference_batch, device)).loss.item()
        finally:
            model.set_attn_implementation("sdpa")
            speedups.apply_to_model(model)  # sdpa resets the towers' attention to the plain implementation
    model.train()
    difference = abs(fast_loss - reference_loss)
    return Check(
        f"training/{architecture}: fast-path loss = reference loss",
        difference <= LOSS_TOLERANCE,
        f"{fast_loss:.6f} vs {reference_loss:.6f} (|diff| {difference:.2e} <= {LOSS_TOLERANCE:g}) on {len(rows)} pairs",
    )


def _baseline_training(ctx: Context, architecture: str, processor, rows: list[dict]):
    """The baseline's model, its optimizer step, and its inputs for `rows`."""
    towers = ctx.towers
    baseline = ThreeTowerBaseline(towers.text_tower(), towers.image_tower(architecture)).to(ctx.device).train()
    reference_images = towers.image_processor if architecture != "text_only" else None

    def inputs(batch_rows: list[dict]) -> dict:
        batch = baseline_batch(
            batch_rows, towers.tokenizer, reference_images,
            max_query_length=processor.max_query_length, max_text_length=processor.max_product_length,
        )
        return _to_device(batch, ctx.device)

    step = _optimizer_step(lambda batch: baseline(**batch), baseline, ctx)
    return baseline, step, inputs(rows)


def _tower_work_check(architecture: str, ours: dict[str, float], baseline: dict[str, float]) -> Check:
    return Check(
        f"training/{architecture}: no duplicated tower work per step",
        ours.get("text") == 2 and not ours.get("image") and ours.get("dual_text", 0) <= 1
        and not ours.get("product_text"),
        f"tower passes per pair and step: ours {ours} (one text tower for queries and products, image features "
        f"cached) vs baseline {baseline}",
    )


def _architecture_case(ctx: Context, architecture: str, rows: list[dict]) -> CaseResult:
    towers, device = ctx.towers, ctx.device
    result = CaseResult()
    model = towers.retrieval_model(architecture).to(device).train()
    processor = towers.processor(architecture)
    result.checks.append(_loss_check(model, processor, rows[:LOSS_CHECK_PAIRS], ctx, architecture))

    ours_step = _optimizer_step(lambda batch: model(**batch).loss, model, ctx)
    ours_batch, cache_seconds = _our_batch(model, processor, rows, device)
    baseline, baseline_step, baseline_inputs = _baseline_training(ctx, architecture, processor, rows)
    # One untimed step each on the measured batch: the first touches its activations' memory (page faults,
    # allocator growth), which a training run pays once, not per step.
    ours_step(ours_batch)
    baseline_step(baseline_inputs)

    with counted_examples(_our_towers(model)) as our_counts, counted_examples(_baseline_towers(baseline)) as baseline_counts:
        samples = measure_interleaved(
            {"ours": lambda: ours_step(ours_batch), "baseline": lambda: baseline_step(baseline_inputs)},
            ctx.repeats, device,
        )
    our_calls = {name: count / ctx.repeats / BATCH_SIZE for name, count in our_counts.items()}
    baseline_calls = {name: count / ctx.repeats / BATCH_SIZE for name, count in baseline_counts.items()}
    result.checks.append(_tower_work_check(architecture, our_calls, baseline_calls))

    extra = {"towers": towers.kind, "batch_size": BATCH_SIZE}
    result.rows.append(Row.from_samples(
        "training", f"{architecture}/ours", samples["ours"], BATCH_SIZE, "pairs/s", tower_calls=our_calls,
        image_cache_s_per_product=cache_seconds / BATCH_SIZE,
        padded_product_length=int(ours_batch["product_attention_mask"].shape[1]), **extra,
    ))
    result.rows.append(Row.from_samples(
        "training", f"{architecture}/baseline", samples["baseline"], BATCH_SIZE, "pairs/s",
        tower_calls=baseline_calls, padded_text_length=processor.max_product_length, **extra,
    ))
    # The ceiling at equal efficiency: how many times more tower work the baseline's step does than ours.
    work_ratio = _baseline_step_flops(baseline, baseline_inputs, towers.image_size) / _our_step_flops(model, ours_batch)
    result.rows[-1].extra["tower_work_ratio"] = work_ratio
    detail = f"{towers.kind} towers, batch {BATCH_SIZE}; the baseline's step does {work_ratio:.2f}x our tower FLOPs"
    if cache_seconds:
        detail += f"; image features cached once at {1e3 * cache_seconds / BATCH_SIZE:.1f} ms/product (not in the step)"
    result.targets.append(Target(
        f"training {architecture}: pairs/s vs baseline", paired_ratio(samples["baseline"], samples["ours"]),
        TRAINING_SPEEDUP_TARGET, detail,
    ))
    return result


def run(ctx: Context) -> CaseResult:
    rows = training_rows(ctx, BATCH_SIZE)
    result = CaseResult()
    for architecture in ARCHITECTURES:
        result.extend(_architecture_case(ctx, architecture, rows))
    return result
